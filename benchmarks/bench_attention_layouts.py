"""Memory layouts of the self-attention step of generation (d30 @1024, the 64x64 scale, KV-cached), each as
one compiled region for the attention inputs (LayerNorm -> qkv -> QK-norm, rotary), then the KV-cache write,
cuDNN's SDPA and the output projection:

* ``BHLD, append``: queries and keys returned as contiguous ``(B, H, l, d)``, the cache (``(B, H, L, d)`` in
  memory) written by two copies, SDPA's output (query layout) transposed by a copy before the projection;
* ``q token-major, append``: the queries laid out ``(B, l, H, d)`` in memory, so SDPA's output is too and the
  projection's input is a view;
* ``q token-major, KV in region``: and the keys and values written into the cache slots by the region;
* ``all token-major, append``: queries and keys ``(B, l, H, d)`` in memory, the cache too;
* ``all token-major, KV in region``: the same with the keys and values written by the region;
* ``... KV index_copy in region``: the region writes the keys and values by ``index_copy_`` into the whole cache
  (no view with a varying offset as input).

``--dynamic`` marks the rows and tokens dimensions symbolic, as starkit's compiled regions do.

    python benchmarks/bench_attention_layouts.py --json $OUT/layouts.json    # H200, ~60 s (compiles)
    python benchmarks/bench_attention_layouts.py --tiny                      # CPU smoke run (small shapes)
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
from bench_generator import device_name, kernel_bench_device, kernel_bench_parser, write_results  # noqa: E402
from bench_tokenizer import timed  # noqa: E402  (CUDA-event median of a call)

from starkit.generator.blocks import token_major  # noqa: E402
from starkit.positional import rotate_float32  # noqa: E402


def _norm_rotate(t: torch.Tensor, rotary, scale=None) -> torch.Tensor:
    """L2-norm over the head dim, optional scale, rotary; float32 ``(B, H, l, d)`` (any memory layout)."""
    t = F.normalize(t.float(), dim=-1)
    return rotate_float32(t if scale is None else t.mul(scale), rotary)


def region(x, w, b, scale, rotary, heads: int, q_major: bool, k_major: bool, k_slot=None, v_slot=None,
           positions=None):
    """The attention inputs of one block in a given layout; with slots, k and v are written there (the
    slots are the new positions' views of the cache, or with ``positions`` the whole cache, written by
    ``index_copy_``)."""
    B, l, C = x.shape
    h = F.layer_norm(x.float(), (C,), eps=1e-6).to(w.dtype)
    q, k, v = F.linear(h, w, b).view(B, l, 3, heads, C // heads).permute(2, 0, 3, 1, 4).unbind(0)
    qf, kf = _norm_rotate(q, rotary, scale).to(w.dtype), _norm_rotate(k, rotary).to(w.dtype)
    qf = token_major(qf) if q_major else qf.contiguous()
    kf = token_major(kf) if k_major else kf.contiguous()
    if k_slot is None:
        return qf, kf, v
    if positions is not None:
        k_slot.index_copy_(2, positions, kf)
        v_slot.index_copy_(2, positions, v)
    else:
        k_slot.copy_(kf)
        v_slot.copy_(v)
    return qf


VARIANTS = {  # name: (queries token-major, keys token-major and the cache too, KV written by the region)
    "BHLD, append": (False, False, False),
    "q token-major, append": (True, False, False),
    "q token-major, KV in region": (True, False, True),
    "q token-major, KV index_copy in region": (True, False, "index"),
    "all token-major, append": (True, True, False),
    "all token-major, KV in region": (True, True, True),
    "all token-major, KV index_copy in region": (True, True, "index"),
}


def _mark_dynamic(*tensors_and_dims) -> None:
    """As starkit's compiled regions do: the rows and tokens dimensions symbolic (``--dynamic``)."""
    for t, dims in tensors_and_dims:
        for dim in dims:
            torch._dynamo.maybe_mark_dynamic(t, dim)


def run(tiny: bool, dev: torch.device, warmup: int, repeats: int, dynamic: bool = False) -> list:
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    g = torch.Generator(device=dev).manual_seed(0)
    C, H, side, before = (128, 2, 8, 30) if tiny else (1920, 30, 64, 5355)  # tokens of the scales before
    d, l = C // H, side * side
    compiled = torch.compile(region, dynamic=False) if dev.type == "cuda" else region
    w = (torch.randn(3 * C, C, device=dev, generator=g) * C ** -0.5).to(dt)
    b = torch.zeros(3 * C, device=dev, dtype=dt)
    proj = (torch.randn(C, C, device=dev, generator=g) * C ** -0.5).to(dt)
    scale = torch.full((1, H, 1, 1), 4.0, device=dev)
    angles = torch.rand(l, d // 2, device=dev, generator=g) * 6.28
    rotary = (angles.cos(), angles.sin())
    rows = []
    for batch, rows_label in ((2, "batch 1 (2 rows)"), (32, "batch 16 (32 rows)")):
        x = torch.randn(batch, l, C, device=dev, generator=g)
        reference = None
        cached = [torch.randn(batch, H, before + l, d, device=dev, generator=g).to(dt) for _ in range(2)]
        for name, (q_major, k_major, in_region) in VARIANTS.items():
            # the same cached keys and values in each layout: logical (B, H, L, d), token-major buffers or not
            k_cache, v_cache = (token_major(t) if k_major else t.clone() for t in cached)
            k_slot, v_slot = k_cache[:, :, before:], v_cache[:, :, before:]
            positions = torch.arange(before, before + l, device=dev)
            if dynamic:
                _mark_dynamic((x, (0, 1)), (rotary[0], (0,)), (rotary[1], (0,)), (k_slot, (0, 2)), (v_slot, (0, 2)),
                              (positions, (0,)))

            def step():
                if in_region == "index":
                    q = compiled(x, w, b, scale, rotary, H, q_major, k_major, k_cache, v_cache, positions)
                elif in_region:
                    q = compiled(x, w, b, scale, rotary, H, q_major, k_major, k_slot, v_slot)
                else:
                    q, k, v = compiled(x, w, b, scale, rotary, H, q_major, k_major)
                    k_slot.copy_(k)
                    v_slot.copy_(v)
                out = F.scaled_dot_product_attention(q, k_cache, v_cache, scale=1.0)  # (B, H, l, d)
                return F.linear(out.transpose(1, 2).reshape(batch, l, C), proj)

            with torch.no_grad():
                result = step().float()
                reference = result if reference is None else reference
                err = float((result - reference).abs().max())
                seconds = timed(step, warmup, repeats, dev)
            rows.append({"case": rows_label, "layout": name, "ms": seconds * 1e3, "max_abs_diff_to_first": err})
    return rows


def main(argv=None) -> None:
    from starkit.utils.compiling import recompile_limit
    ap = kernel_bench_parser(__doc__, repeats=20)
    ap.add_argument("--dynamic", action="store_true",
                    help="rows and tokens symbolic in the compiled region, as in starkit's generation")
    args = ap.parse_args(argv)
    dev = kernel_bench_device(args)
    with torch.no_grad(), recompile_limit(64):  # a graph per layout and batch
        rows = run(args.tiny, dev, args.warmup, args.repeats, args.dynamic)
    name = device_name(dev)
    if args.json:
        write_results(args.json, name, args, rows)
    print(f"\n### Self-attention step layouts, d30 @1024 64x64 scale ({name}; dynamic={args.dynamic})\n")
    print("| case | layout | ms | max abs diff to the first |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['layout']} | {r['ms']:.3f} | {r['max_abs_diff_to_first']:.2e} |")


if __name__ == "__main__":
    main()
