"""Where batch-1 generation spends the small scales: the transformer's scale steps 0-8 of d30 @1024 (1x1 to
16x16 tokens, 2 rows with guidance), replayed from their CUDA graphs as ``generate(cuda_graphs=True,
compile_blocks=True)`` runs them, kernel by kernel.

At these sizes a block's work is reading its weights (~88 MB in bf16 at d30, ~20 us at the H200's
bandwidth), yet the sixth comparison measured ~110 us per block call (docs/performance.md). This script
times each scale's graph, prints the kernels of one replay of all of them (count per block call, mean
duration), and times the same steps with other SDPA backends preferred at capture (the self- and
cross-attention run outside the compiled regions, so the backend is chosen when the graph is captured).
Last, the floor of the matrix products: the six linear layers of every block alone at the small scales' row
counts, from one CUDA graph, with cuBLAS (``F.linear``) and split in K (one batched product over S chunks of
the weight, then a sum), and the rate at which each form reads the weights.

    python benchmarks/bench_small_scales.py --json $OUT/small_scales.json     # H200, ~2 min (compiles)
    python benchmarks/bench_small_scales.py --tiny                            # CPU smoke run (tiny model)
"""
from __future__ import annotations

import collections
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
from bench_generator import (P1024, TINY_P256, device_name, kernel_bench_device, kernel_bench_parser,  # noqa: E402
                             write_results)
from bench_tokenizer import timed  # noqa: E402  (CUDA-event median of a call)
from profile_generate import kernel_events  # noqa: E402

from starkit.generator import ScaleTransformer  # noqa: E402
from starkit.generator.graphs import StaticScaleSteps  # noqa: E402
from starkit.generator.sampling import autocast_for  # noqa: E402
from starkit.positional import NormalizedRoPE2D  # noqa: E402

#: SDPA backend priority lists tried at capture ("default": PyTorch's own choice)
PRIORITIES = {
    "default": None,
    "flash first": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                    SDPBackend.MATH],
    "efficient first": [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                        SDPBackend.MATH],
    "math first": [SDPBackend.MATH, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                   SDPBackend.CUDNN_ATTENTION],
}


def build(tiny: bool, dev: torch.device):
    """The d30 transformer of 1024 px (random weights; tiny: 2 blocks of width 32) in eval mode."""
    torch.manual_seed(0)
    patch_nums = TINY_P256 if tiny else P1024
    depth, width, heads = (2, 32, 2) if tiny else (30, 1920, 30)
    with torch.device(dev):
        net = ScaleTransformer(patch_nums, 16 if tiny else 4096, 8 if tiny else 32, 32 if tiny else 1024,
                               depth=depth, width=width, num_heads=heads,
                               positional=NormalizedRoPE2D(width, heads, patch_nums))
    return net.to(dev).eval(), patch_nums


def inputs(net: ScaleTransformer, patch_nums, scales, dev, text_len: int = 77, real_tokens: int = 12):
    """Rows 2 (batch 1 with guidance): each scale's input tokens, the text keys/values and the padding bias."""
    from starkit.generator.blocks import key_padding_bias
    g = torch.Generator(device=dev).manual_seed(0)
    text_dim = net.blocks[0].cross_attn.mat_kv.weight.shape[1]
    tokens = torch.randn(2, text_len, text_dim, device=dev, generator=g)
    mask = torch.arange(text_len, device=dev)[None].expand(2, -1) < real_tokens
    text_kvs = net.text_kv(tokens)
    bias = key_padding_bias(mask).to(text_kvs[0][1].dtype)
    latent_dim = net.word_embed.weight.shape[1]
    xs = [net.start_tokens(torch.randn(2, text_dim, device=dev, generator=g)) if k == 0 else
          net.scale_tokens(torch.randn(2, patch_nums[k] ** 2, latent_dim, device=dev, generator=g), k)
          for k in scales]
    return xs, text_kvs, bias


def capture_steps(net, xs, text_kvs, bias, scales, priority, dev):
    """A StaticScaleSteps with the given scales run once (captured on CUDA) under the SDPA priority."""
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    steps = StaticScaleSteps(net, 2, text_kvs, bias, dtype, fused=True)
    context = sdpa_kernel(priority, set_priority=True) if priority else torch.autocast("cpu", enabled=False)
    with context:
        for k, x in zip(scales, xs):
            steps.run(k, x, text_kvs, bias)
    return steps


def time_scales(steps, xs, text_kvs, bias, scales, dev, warmup: int, repeats: int) -> dict:
    """Median ms of each scale's replay (CUDA events; on the CPU the eager step)."""
    out = {}
    for k, x in zip(scales, xs):
        fn = (lambda: steps.graphs[k].replay()) if dev.type == "cuda" else (lambda: steps.run(k, x, text_kvs, bias))
        out[k] = 1000 * timed(fn, warmup, repeats, dev)
    return out


def kernel_table(steps, xs, text_kvs, bias, scales, depth: int, dev, rows: int = 30) -> list:
    """The kernels of one replay of every scale: name, launches per block call, mean us, total ms."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for k, x in zip(scales, xs):
            steps.graphs[k].replay() if dev.type == "cuda" else steps.run(k, x, text_kvs, bias)
        if dev.type == "cuda":
            torch.cuda.synchronize()
    totals, counts = collections.defaultdict(float), collections.defaultdict(int)
    for e in kernel_events(prof.key_averages()):
        totals[e.key] += e.self_device_time_total / 1000
        counts[e.key] += e.count
    calls = depth * len(scales)
    table = [{"kernel": name[:90], "per_block_call": counts[name] / calls, "mean_us": 1000 * ms / counts[name],
              "total_ms": ms} for name, ms in sorted(totals.items(), key=lambda kv: -kv[1])]
    return table[:rows] + ([{"kernel": "(all)", "per_block_call": sum(counts.values()) / calls,
                             "mean_us": 1000 * sum(totals.values()) / max(1, sum(counts.values())),
                             "total_ms": sum(totals.values())}] if table else [])


def weight_bytes(net) -> int:
    """Bytes of one block's weights in bf16 (what a block call at tiny row counts must read)."""
    return 2 * sum(p.numel() for p in net.blocks[0].parameters())


def block_linears(block) -> list:
    """The (weight, bias) of the six linear layers a block runs per sampling step, in the inference dtype."""
    cross = block.cross_attn
    qkv_bias = torch.cat((block.attn.q_bias, torch.zeros_like(block.attn.q_bias), block.attn.v_bias))
    return [(block.attn.mat_qkv.weight, qkv_bias), (block.attn.proj.weight, block.attn.proj.bias),
            (cross.mat_q.weight, cross.q_bias), (cross.proj.weight, cross.proj.bias),
            (block.ffn.fc1.weight, block.ffn.fc1.bias), (block.ffn.fc2.weight, block.ffn.fc2.bias)]


def split_k_linear(x: torch.Tensor, w_split: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``x @ W.T + b`` with the K dimension in S chunks (one batched product, then a sum): ``x`` ``(M, K)``,
    ``w_split`` ``(S, K/S, N)`` (W transposed and split once) -> ``(M, N)``."""
    S, chunk, _ = w_split.shape
    return torch.bmm(x.view(x.shape[0], S, chunk).transpose(0, 1), w_split).sum(0) + bias


def reduction_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``x @ W.T + b`` written as a product summed over K, output ``(N, M)`` first so that neighbouring programs
    of the reduction kernel ``torch.compile`` writes share a weight row (read once): ``(M, K)`` -> ``(M, N)``,
    float32 accumulation."""
    return ((weight.float()[:, None, :] * x.float()[None]).sum(-1).t() + bias.float()).to(x.dtype)


def matmul_floor(net, dev, rows_list, splits, warmup: int, repeats: int) -> list:
    """The six linear layers of every block at ``rows`` rows (the small scales' row counts), as one CUDA graph
    per form (cuBLAS's ``F.linear``, split-K in S chunks): us per block and the weights' read rate. A split-K
    form's largest difference from ``F.linear`` is in the row."""
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    layers = [[(w.to(dtype), b.to(dtype)) for w, b in block_linears(block)] for block in net.blocks]
    weight_bytes = sum(w.numel() * w.element_size() for block in layers for w, _ in block)
    out = []
    for rows in rows_list:
        x = torch.randn(rows, net.width, device=dev, dtype=dtype)
        hidden = torch.randn(rows, layers[0][4][0].shape[0], device=dev, dtype=dtype)  # fc2's input
        inputs = [x, x, x, x, x, hidden]
        reference = [F.linear(i, w, b) for i, (w, b) in zip(inputs, layers[0])]
        for S in splits:
            if S == "triton":  # benchmarks/few_rows_gemm.py: a Triton product for <= 64 rows, tuned per shape
                if rows > 64:
                    continue
                from few_rows_gemm import few_rows_linear
                forms = layers
                fn = lambda: [few_rows_linear(i, w, b) for block in forms for i, (w, b) in zip(inputs, block)]  # noqa: E731
            elif S == "reduce":  # one compiled reduction kernel per layer (compiled per shape, dynamic=False)
                forms = layers
                torch._dynamo.config.recompile_limit = 64  # one graph per layer shape and row count
                compiled = torch.compile(reduction_linear, dynamic=False)
                fn = lambda: [compiled(i, w, b) for block in forms for i, (w, b) in zip(inputs, block)]  # noqa: E731
            elif any(w.shape[1] % S for w, _ in layers[0]):
                continue
            elif S == 1:
                forms = layers
                fn = lambda: [F.linear(i, w, b) for block in forms for i, (w, b) in zip(inputs, block)]  # noqa: E731
            else:
                forms = [[(w.t().reshape(S, w.shape[1] // S, w.shape[0]).contiguous(), b) for w, b in block]
                         for block in layers]
                fn = lambda: [split_k_linear(i, w, b) for block in forms for i, (w, b) in zip(inputs, block)]  # noqa: E731
            diff = max((y - r).abs().max().item() for y, r in zip(fn()[:6], reference))
            call = fn
            if dev.type == "cuda":
                from starkit.utils.cuda_graphs import capture, warm_up
                warm_up(fn, dev)
                graph, _ = capture(fn, torch.cuda.graph_pool_handle())
                call = graph.replay
            seconds = timed(call, warmup, repeats, dev)
            out.append({"rows": rows, "split_k": S, "us_per_block": 1e6 * seconds / len(layers),
                        "tb_per_s": weight_bytes / seconds / 1e12, "max_diff_vs_linear": diff})
            del forms
    return out


def main(argv=None) -> None:
    ap = kernel_bench_parser(__doc__, repeats=20)
    ap.add_argument("--scales", default="0-8", help="first-last scale index to run (default 0-8)")
    ap.add_argument("--priorities", default=",".join(PRIORITIES), help="comma-separated keys of PRIORITIES")
    ap.add_argument("--matmul-rows", default="2,32,512",
                    help="row counts for the matrix-product floor (the six linear layers of every block alone)")
    ap.add_argument("--splits", default="1,2,4,8",
                    help="split-K chunk counts tried for it (1: F.linear); 'reduce': the product as a compiled "
                         "reduction (reduction_linear); 'triton': benchmarks/few_rows_gemm.py (<= 64 rows; needs "
                         "Triton, on a CPU TRITON_INTERPRET=1)")
    args = ap.parse_args(argv)
    dev = kernel_bench_device(args)
    net, patch_nums = build(args.tiny, dev)
    first, last = (int(s) for s in args.scales.split("-"))
    scales = list(range(first, min(last, len(patch_nums) - 1) + 1))
    if scales[0] != 0:
        raise SystemExit("--scales must start at 0 (the KV caches fill scale by scale)")
    results, kernels = [], []
    with torch.no_grad(), autocast_for(dev, cache_enabled=False):
        xs, text_kvs, bias = inputs(net, patch_nums, scales, dev)
        for name in [p for p in args.priorities.split(",") if p not in ("", "none")]:  # none: the floor alone
            try:
                steps = capture_steps(net, xs, text_kvs, bias, scales, PRIORITIES[name], dev)
                ms = time_scales(steps, xs, text_kvs, bias, scales, dev, args.warmup, args.repeats)
            except Exception as err:  # noqa: BLE001 - a backend that cannot run these shapes is a result
                results.append({"priority": name, "error": f"{type(err).__name__}: {str(err)[:200]}"})
                print(f"{name}: {results[-1]['error']}", flush=True)
                continue
            row = {"priority": name, "ms_per_scale": ms, "ms_all": sum(ms.values()),
                   "us_per_block_call": 1000 * sum(ms.values()) / (net.depth * len(scales))}
            results.append(row)
            print(row, flush=True)
            if name == "default":
                kernels = kernel_table(steps, xs, text_kvs, bias, scales, net.depth, dev)
            del steps
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        floor = matmul_floor(net, dev, [int(r) for r in args.matmul_rows.split(",")],
                             [k if k in ("reduce", "triton") else int(k) for k in args.splits.split(",")], args.warmup,
                             args.repeats)
    bound_us = weight_bytes(net) / 4.0e12 * 1e6  # at ~4 TB/s, a realistic share of the H200's 4.8 TB/s
    if args.json:
        write_results(args.json, device_name(dev), args, results, kernels=kernels, matmul_floor=floor,
                      block_weight_bytes=weight_bytes(net))
    print(f"\n### Small scales {scales[0]}-{scales[-1]} of d30 @1024, batch 1 with guidance ({device_name(dev)})\n")
    print(f"one block's weights: {weight_bytes(net) / 1e6:.1f} MB (bf16), read at 4 TB/s in {bound_us:.1f} us\n")
    print("| kernel (default backends, one replay of every scale) | per block call | mean us | total ms |")
    print("|---|---|---|---|")
    for r in kernels:
        print(f"| {r['kernel']} | {r['per_block_call']:.2f} | {r['mean_us']:.1f} | {r['total_ms']:.2f} |")
    print("\n| SDPA priority at capture | " + " | ".join(f"scale {k}" for k in scales) + " | all ms | us per block call |")
    print("|---|" + "---|" * (len(scales) + 2))
    for r in results:
        if "error" in r:
            print(f"| {r['priority']} | error: {r['error'][:80]} |")
            continue
        print(f"| {r['priority']} | " + " | ".join(f"{r['ms_per_scale'][k]:.3f}" for k in scales)
              + f" | {r['ms_all']:.2f} | {r['us_per_block_call']:.1f} |")
    print("\n| the six linear layers alone: rows | split-K chunks | us per block | weights read, TB/s | max diff vs F.linear |")
    print("|---|---|---|---|---|")
    for r in floor:
        print(f"| {r['rows']} | {r['split_k']} | {r['us_per_block']:.1f} | {r['tb_per_s']:.2f} | "
              f"{r['max_diff_vs_linear']:.2e} |")


if __name__ == "__main__":
    main()
