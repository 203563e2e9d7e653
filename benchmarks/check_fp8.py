"""How far do FP8 products (``generate(fp8=True)``) move the transformer's outputs, against bf16's own error?

The KV-cached scale steps of a random-weight STAR transformer (d30 @1024 by default) run on the same random
inputs three ways: float32 eager (the reference), bf16 autocast with the compiled block regions (what
``generate(compile_blocks=True)`` runs), and the same with the blocks' products in FP8. Printed per scale:
the relative RMS error of the hidden states and of the logits against float32, and how often the logits'
top token agrees with float32's, for bf16 and for FP8. On CUDA also the Triton kernel that applies the GELU and
quantizes fc2's input (``starkit.generator.fp8_kernels``) against PyTorch's operations (compiled): the share of
equal e4m3 codes, the largest scale difference, and the time of each at d30's FFN width.

    python benchmarks/check_fp8.py --json $OUT/check_fp8.json          # H200, ~1 min
    python benchmarks/check_fp8.py --tiny                              # CPU smoke run

Random weights say how the rounding propagates through 30 blocks, not how images change: for that, a trained
model's score (``python benchmarks/eval_shapes.py models/demo --fp8``).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
import bench_generator as bg  # noqa: E402
from bench_generate import PATCH_NUMS, TINY_PATCH_NUMS  # noqa: E402

from starkit.generator.blocks import key_padding_bias  # noqa: E402
from starkit.generator.fp8 import fp8_layers  # noqa: E402


def run_scales(net, text, inputs, mode: str, dev: torch.device):
    """Hidden states and logits of every scale ``[(hidden, logits)]`` in ``mode`` (fp32 / bf16 / fp8)."""
    B = text.pooled.shape[0]
    autocast = torch.autocast(dev.type, torch.bfloat16, enabled=mode != "fp32" and dev.type == "cuda")
    fused = mode != "fp32"
    out = []
    with torch.no_grad(), autocast, (fp8_layers([net]) if mode == "fp8" else contextlib.nullcontext()):
        kvs, bias = net.text_kv(text.tokens), key_padding_bias(text.mask)
        caches = net.new_caches(B, dev, torch.bfloat16 if autocast._enabled else torch.float32)  # noqa: SLF001
        for k in range(len(net.patch_nums)):
            x = net.start_tokens(text.pooled) if k == 0 else net.scale_tokens(inputs[k], k)
            hidden = net.forward_scale(x, k, caches, kvs, bias, fused=fused)
            out.append((hidden.float(), net.logits(hidden).float()))
    return out


def kernel_rows(dev: torch.device) -> list:
    """The GELU + row quantization kernel against ``quantize_rows(gelu(x))`` compiled, at 4C = 7680."""
    import torch.nn.functional as F
    from bench_tokenizer import timed
    from starkit.generator import fp8, fp8_kernels
    if dev.type != "cuda" or not fp8_kernels.AVAILABLE:
        return []
    reference = torch.compile(lambda x: fp8.quantize_rows(F.gelu(x, approximate="tanh")), dynamic=False)
    rows = []
    for M in (2 * 4097, 32 * 4097):
        x = (torch.randn(M, 7680, device=dev) * 2).to(torch.bfloat16)
        q, s = torch.ops.starkit.gelu_quantize_rows(x)
        rq, rs = reference(x)
        t_kernel = timed(lambda: torch.ops.starkit.gelu_quantize_rows(x), 3, 20, dev)
        t_ref = timed(lambda: reference(x), 3, 20, dev)
        rows.append({"rows": M, "codes_equal": float((q.view(torch.uint8) == rq.view(torch.uint8)).float().mean()),
                     "scale_max_rel_diff": float(((s - rs).abs() / rs).max()), "kernel_ms": t_kernel * 1e3,
                     "inductor_ms": t_ref * 1e3, "kernel_gb_s": M * 7680 * 3 / t_kernel / 1e9})
    return rows


def rel_rms(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).norm() / ref.norm().clamp_min(1e-30))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="d30@1024", choices=sorted(PATCH_NUMS))
    ap.add_argument("--prompts", type=int, default=1, help="prompts (rows: twice, with guidance's empty prompt)")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    pn = (TINY_PATCH_NUMS if args.tiny else PATCH_NUMS)[args.config]
    tok = bg.build_tokenizer(args.tiny, pn, dev)
    text, _ = bg.build_text_encoder("random", args.tiny, dev, "")
    gen = bg.build_generator(args.config.split("@")[0], args.tiny, pn, tok, text, dev).eval()
    net = gen.transformer
    captions = [bg.CAPTIONS[i % len(bg.CAPTIONS)] for i in range(args.prompts)] + [""] * args.prompts
    encoded = text.encode(captions)
    g = torch.Generator(device="cpu").manual_seed(0)
    Cvae = net.word_embed.in_features
    inputs = [None] + [torch.randn(len(captions), p * p, Cvae, generator=g).to(dev) for p in pn[1:]]
    results = {mode: run_scales(net, encoded, inputs, mode, dev) for mode in ("fp32", "bf16", "fp8")}
    rows = []
    for k, p in enumerate(pn):
        ref_h, ref_l = results["fp32"][k]
        row = {"scale": k, "side": p}
        for mode in ("bf16", "fp8"):
            h, lg = results[mode][k]
            row[f"{mode}_hidden_err"] = rel_rms(h, ref_h)
            row[f"{mode}_logits_err"] = rel_rms(lg, ref_l)
            row[f"{mode}_top1"] = float((lg.argmax(-1) == ref_l.argmax(-1)).float().mean())
        rows.append(row)
    name = bg.device_name(dev)
    kernels = kernel_rows(dev)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": name, "config": args.config, "torch": torch.__version__, "rows": rows,
                       "kernel": kernels}, fh, indent=2)
    if kernels:
        print(f"\n### GELU + row quantization of fc2's input, (M, 7680) bf16 ({name})\n")
        print("| rows | e4m3 codes equal | largest scale difference | Triton kernel ms (GB/s) | Inductor ms |")
        print("|---|---|---|---|---|")
        for r in kernels:
            print(f"| {r['rows']} | {100 * r['codes_equal']:.3f}% | {r['scale_max_rel_diff']:.1e} | "
                  f"{r['kernel_ms']:.3f} ({r['kernel_gb_s']:.0f}) | {r['inductor_ms']:.3f} |")
    print(f"\n### FP8 and bf16 against float32, {args.config} random weights, {len(captions)} rows ({name})\n")
    print("| scale | side | bf16 hidden err | fp8 hidden err | bf16 logits err | fp8 logits err | bf16 top-1 = fp32 "
          "| fp8 top-1 = fp32 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['scale']} | {r['side']} | {r['bf16_hidden_err']:.4f} | {r['fp8_hidden_err']:.4f} | "
              f"{r['bf16_logits_err']:.4f} | {r['fp8_logits_err']:.4f} | {100 * r['bf16_top1']:.1f}% | "
              f"{100 * r['fp8_top1']:.1f}% |")


if __name__ == "__main__":
    main()
