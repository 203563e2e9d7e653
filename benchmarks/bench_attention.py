"""Attention kernels at the shapes starkit runs: which backend of
``torch.nn.functional.scaled_dot_product_attention`` (FlashAttention-2, cuDNN, memory-efficient)
and FlexAttention are fastest, and how far their outputs are from each other.

    python benchmarks/bench_attention.py --json $OUT/attention.json        # H200, ~2 min
    python benchmarks/bench_attention.py --tiny                            # CPU smoke run

Shapes (bf16, head dim 64):

* ``gen-self``: one scale's self-attention with the KV cache (no mask), d30 @1024 at batch 1
  and 16 with guidance (2B rows): the 48x48 and 64x64 scales against every cached key.
* ``gen-cross``: the same queries against the 77 text keys with a key-padding bias.
* ``head``: the stable sampler head's full attention within the 64x64 scale (+1 prefix token).
* ``train-mask``: the d16 @256 training pass (680 tokens, batch 64, 16 heads), block-causal
  mask, forward + backward; FlexAttention with the block mask beside the dense-mask backends.

Times are CUDA events around ``--repeats`` calls after a warm-up; TFLOP/s counts the pairs the
mask allows. ``max |diff|`` is against the first backend that ran for the shape.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
from bench_generator import device_name, kernel_bench_device, kernel_bench_parser, write_results  # noqa: E402
from bench_tokenizer import P1024, P256, timed  # noqa: E402  (CUDA-event median of a call)

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def cases(tiny: bool):
    """(name, B, H, Lq, Lk, mask kind, backward) per shape."""
    if tiny:
        return [("gen-self b1 64x64 (tiny)", 2, 2, 16, 30, None, False),
                ("train-mask (tiny)", 2, 2, 30, 30, "block_causal", True)]
    seen = lambda k: sum(p * p for p in P1024[: k + 1])  # noqa: E731
    out = []
    for b in (1, 16):
        for k in (12, 13):
            pn = P1024[k]
            out.append((f"gen-self b{b} {pn}x{pn}", 2 * b, 30, pn * pn, seen(k), None, False))
        out.append((f"gen-cross b{b} 64x64", 2 * b, 30, 4096, 77, "text", False))
        out.append((f"head b{b} 64x64", 2 * b, 30, 4097, 4097, None, False))
    out.append(("train-mask d16@256 b64", 64, 16, 680, 680, "block_causal", True))
    return out


def block_causal(patch_nums, device):
    levels = torch.cat([torch.full((p * p,), i, device=device) for i, p in enumerate(patch_nums)])
    return levels[:, None] >= levels[None, :], levels  # (L, L) True = attend


def run_case(case, dev, dtype, warmup, repeats):
    name, B, H, Lq, Lk, mask_kind, backward = case
    d = 64
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(B, H, Lq, d, device=dev, dtype=dtype, generator=g)
    k = torch.randn(B, H, Lk, d, device=dev, dtype=dtype, generator=g)
    v = torch.randn(B, H, Lk, d, device=dev, dtype=dtype, generator=g)
    q, k = F.normalize(q, dim=-1) * 8, F.normalize(k, dim=-1)  # QK-normed, as in the model
    mask, pairs, flex_mask = None, Lq * Lk, None
    if mask_kind == "text":
        keep = torch.arange(Lk, device=dev)[None, :] < torch.randint(5, Lk, (B, 1), device=dev, generator=g)
        mask = torch.zeros(B, 1, 1, Lk, device=dev, dtype=dtype).masked_fill(~keep[:, None, None], float("-inf"))
        pairs = Lq * Lk  # kernels compute every pair anyway
    elif mask_kind == "block_causal":
        pn = (1, 2, 3, 4) if Lq == 30 else P256
        allowed, levels = block_causal(pn, dev)
        mask = allowed
        pairs = int(allowed.sum())
        if dev.type == "cuda":
            from torch.nn.attention.flex_attention import create_block_mask
            lv = levels

            def mod(b, h, qi, ki):
                return lv[qi] >= lv[ki]
            flex_mask = create_block_mask(mod, None, None, Lq, Lk, device=dev)
    flops = 4 * B * H * pairs * d * (3.5 if backward else 1)  # backward ~2.5x forward
    rows, ref = [], None

    def make(call):
        if not backward:
            return lambda: call(q, k, v)
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        grad = torch.randn(B, H, Lq, d, device=dev, dtype=dtype, generator=g)

        def step():
            qq.grad = kk.grad = vv.grad = None  # no accumulation across calls
            out = call(qq, kk, vv)
            out.backward(grad)
            return torch.cat([out.detach().flatten(), qq.grad.flatten(), kk.grad.flatten(), vv.grad.flatten()])
        return step

    candidates = [(n, b) for n, b in BACKENDS.items()] if dev.type == "cuda" else [("math", SDPBackend.MATH)]
    for bname, backend in candidates:
        def call(qq, kk, vv, backend=backend):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=1.0)
        rows.append(measure(name, bname, make(call), flops, warmup, repeats, dev))
    if flex_mask is not None:
        from starkit.generator.blocks import flex_attention_fn
        flex = flex_attention_fn(dev)
        rows.append(measure(name, "flex", make(lambda qq, kk, vv: flex(qq, kk, vv, block_mask=flex_mask, scale=1.0)),
                            flops, warmup, repeats, dev))
    for r in rows:  # numeric agreement with the first backend that ran (output, and gradients with backward)
        out = r.pop("_out", None)
        if out is None:
            continue
        if ref is None:
            ref = out
        r["max_abs_diff"] = float((out.float() - ref.float()).abs().max())
    return rows


def measure(name, bname, fn, flops, warmup, repeats, dev):
    row = {"shape": name, "backend": bname}
    try:
        with torch.no_grad() if "train" not in name else torch.enable_grad():
            out = fn()
            t = timed(fn, warmup, repeats, dev)
        row.update(ms=t * 1000, tflops=flops / t / 1e12, _out=out.detach())
    except Exception as err:  # noqa: BLE001 - a backend refusing a shape is a result
        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
    return row


def model_layout_choices(dev, dtype) -> list:
    """Which kernel SDPA picks by default for the tensors as the model lays them out: q from the fused
    qkv projection (a permuted view), k/v slices of the preallocated KV cache; and the reason cuDNN
    gives when it refuses (its warning)."""
    import warnings
    names = {int(b): b.name for b in SDPBackend.__members__.values()}
    out = []
    for B, H, l, L_seen, L_max in ((2, 16, 256, 680, 680), (2, 30, 4096, 9451, 9451), (32, 30, 4096, 9451, 9451),
                                   (2, 16, 1, 1, 680)):
        d = 64
        qkv = torch.randn(B, l, 3, H, d, device=dev, dtype=dtype)
        q, k_new, v_new = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, l, d) views, as SelfAttention makes them
        cache_k = torch.zeros(B, H, L_max, d, device=dev, dtype=dtype)
        cache_v = torch.zeros_like(cache_k)
        k, v = cache_k[:, :, :L_seen], cache_v[:, :, :L_seen]
        for label, (qq, kk, vv) in (("model layout", (q, k, v)),
                                    ("contiguous q", (q.contiguous(), k, v)),
                                    ("all contiguous", (q.contiguous(), k.contiguous(), v.contiguous()))):
            choice = names.get(int(torch._fused_sdp_choice(qq, kk, vv, None, 0.0, False, scale=1.0)), "?")
            with warnings.catch_warnings(record=True) as caught, sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                warnings.simplefilter("always")
                try:
                    F.scaled_dot_product_attention(qq, kk, vv, scale=1.0)
                    why = "cuDNN accepts"
                except RuntimeError:
                    why = "; ".join(str(w.message).splitlines()[0][:150] for w in caught) or "refused"
            out.append({"shape": f"B{B} H{H} q{l} kv{L_seen}/{L_max}", "layout": label, "choice": choice, "cudnn": why})
    return out


def main(argv=None) -> None:
    ap = kernel_bench_parser(__doc__, repeats=10, tiny_help="CPU smoke run on tiny shapes")
    ap.add_argument("--layout-only", action="store_true", help="only which kernel SDPA picks for the model's layouts")
    args = ap.parse_args(argv)
    dev = kernel_bench_device(args, shrink_tiny=False)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    rows = []
    layout = model_layout_choices(dev, dtype) if dev.type == "cuda" else []
    for r in layout:
        print(f"{r['shape']} {r['layout']}: SDPA picks {r['choice']} ({r['cudnn']})", flush=True)
    for case in ([] if args.layout_only else cases(args.tiny)):
        rows += run_case(case, dev, dtype, args.warmup, args.repeats)
        r = rows[-1]
        print(f"{case[0]}: done", flush=True)
    name = device_name(dev)
    if args.json:
        write_results(args.json, name, args, rows, layout_choices=layout)
    print(f"\n### Attention kernels ({name}, torch {torch.__version__})\n")
    print("| shape | backend | ms | TFLOP/s | max abs diff |")
    print("|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['shape']} | {r['backend']} | {r['error']} | | |")
        else:
            diff = r.get("max_abs_diff", 0)
            print(f"| {r['shape']} | {r['backend']} | {r['ms']:.3f} | {r['tflops']:.0f} | {diff:.2e} |")


if __name__ == "__main__":
    main()
