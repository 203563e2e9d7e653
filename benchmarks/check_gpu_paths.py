"""Do the compiled inference paths give the eager results on this GPU? A quick check (71 s on an H200 on
2026-11-29, compiling included) to run before timing them: d16 @256 with random weights, bf16 autocast as generate() runs.

    python benchmarks/check_gpu_paths.py            # on the GPU machine
    python benchmarks/check_gpu_paths.py --tiny     # CPU smoke run

Checks (the table is printed last; "ok" compares against the bf16 tolerance given):
  * compile_blocks: every scale's hidden states, fused regions vs eager blocks, same inputs and caches;
  * the names of the attention kernels the KV-cached scale steps run (on an H200 with torch 2.11: cuDNN's
    fused kernel, and FlashAttention-2 at the first scale, whose single key cuDNN does not take);
  * compile_blocks + cuda_graphs: the same tokens as compile_blocks alone (the same kernels, replayed);
  * cuda_graphs: the same tokens as the eager loop (issue 7's first check, kept here);
  * compile_head: the stable sampler head's logits, compiled (StableSampler(compile_head=True)) vs eager;
  * the head's sampling form (SamplerHead.for_scale: fixed inputs once per scale, the last block on the
    wanted rows only) vs its forward;
  * the stable sampler head's reveal step replayed from a CUDA graph (``generate(cuda_graphs=True)``,
    starkit.samplers.head_graphs): its logits against the same step without the graph, twice with new inputs,
    and a whole generation's tokens with the head steps from graphs and launched (both under cuda_graphs=True);
  * fc1_gelu: the FFN's first layer with GELU in cuBLASLt's epilogue vs linear + tanh GELU;
  * compile text: the CLIP tower's pooled features, compiled vs eager (a random CLIP of SD-2.1's size).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
import bench_generator as bg  # noqa: E402
from bench_generate import stable_for  # noqa: E402


class PrintedRows(list):
    """A list of (check, result, ok) rows that prints each row when it is appended."""

    def append(self, row) -> None:
        super().append(row)
        print(f"[check] {row[0]}: {row[1]} ({'ok' if row[2] else 'NOT OK'})", flush=True)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |a|, in float32."""
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--tolerance", type=float, default=0.05, help="largest relative difference called ok (bf16)")
    ap.add_argument("--only-head-graphs", action="store_true",
                    help="only the whole-generation row of the head steps from CUDA graphs (a short GPU run)")
    ap.add_argument("--only-text-graph", action="store_true",
                    help="only the rows of the text encoder (CLIP) replayed from a CUDA graph (a short GPU run)")
    ap.add_argument("--only-whole-graph", action="store_true",
                    help="only the rows of cuda_graphs='whole' against the per-step graphs (a short GPU run)")
    args = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    workdir = tempfile.mkdtemp(prefix="check_gpu_paths_")
    rows = PrintedRows()  # each row is printed as soon as it is known (a time limit keeps what was done)
    prompts = [bg.CAPTIONS[i] for i in range(2)]

    def text_graph_rows():  # -> the CLIP encoder it built (the compile-text row reuses it)
        """CLIP replayed from a CUDA graph (encode(cuda_graphs=True)) against launched, twice with new prompts."""
        clip = bg.build_text_encoder("clip", args.tiny, dev, workdir)[0]
        for batch in (prompts, [bg.CAPTIONS[i] for i in range(2, 4)]):
            launched, replayed = clip.encode(batch), clip.encode(batch, cuda_graphs=True)
            same = torch.equal(launched.tokens, replayed.tokens) and torch.equal(launched.pooled, replayed.pooled)
            rows.append(("text encoder (CLIP) from a CUDA graph: tokens and pooled equal to launched",
                         "equal" if same else f"max rel. diff {rel_diff(launched.pooled, replayed.pooled):.2e}",
                         same))
        clip.release_cuda_graphs()
        return clip

    try:
        if args.only_text_graph:
            text_graph_rows()
            return
        pn = bg.TINY_P256 if args.tiny else bg.P256
        text, _ = bg.build_text_encoder("random", args.tiny, dev, workdir)
        tok = bg.build_tokenizer(args.tiny, pn, dev)
        gen = bg.build_generator("d16", args.tiny, pn, tok, text, dev).eval()
        net = gen.transformer
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
        with torch.no_grad(), amp:
            emb = gen.text_encoder.encode(prompts).to(dev)
            kvs = net.text_kv(emb.tokens)
            from starkit.generator.blocks import key_padding_bias
            bias = key_padding_bias(emb.mask).to(kvs[0][1].dtype)
            dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
            caches = [net.new_caches(2, dev, dtype), net.new_caches(2, dev, dtype)]
            worst = 0.0
            g = torch.Generator(dev).manual_seed(0)
            for k, p in enumerate(net.patch_nums):
                x = net.start_tokens(emb.pooled) if k == 0 else torch.randn(2, p * p, net.width, device=dev, generator=g)
                eager = net.forward_scale(x, k, caches[0], kvs, bias)
                fused = net.forward_scale(x, k, caches[1], kvs, bias, fused=True)
                worst = max(worst, rel_diff(eager, fused))
        rows.append(("compile_blocks: hidden states, all scales (max rel. diff)", f"{worst:.2e}", worst <= args.tolerance))
        if args.only_head_graphs or args.only_whole_graph:
            rows.clear()  # (the regions compiled above serve the generation below)

        if dev.type == "cuda":  # which attention kernels the KV-cached scale steps ran, by name
            cache = net.new_caches(2, dev, dtype)
            with torch.no_grad(), amp, torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for k, p in enumerate(net.patch_nums):
                    x = net.start_tokens(emb.pooled) if k == 0 else torch.randn(2, p * p, net.width, device=dev)
                    net.forward_scale(x, k, cache, kvs, bias)
                torch.cuda.synchronize()
            names = sorted({e.key[:60] for e in prof.key_averages()
                            if any(w in e.key.lower() for w in ("flash", "fmha", "sdpa", "attention"))})
            rows.append(("attention kernels of the scale steps (informative)", "; ".join(names) or "none", bool(names)))

        def tokens(seed=0, **kw):
            _, idx = gen.generate(prompts, seed=seed, return_indices=True, **kw)
            return torch.cat([i.flatten() for i in idx])

        def whole_graph_tokens(sampler=None) -> None:
            """cuda_graphs='whole' (one graph of the generation) against the per-step graphs, all compiled paths on,
            at two seeds (the graph's generator is re-seeded at each replay) and per-image seeds."""
            name = "stable, compiled head" if sampler is not None else "parallel"
            kw = dict(sampler=sampler, compile_blocks=True)
            for seed in (0, 1, [3, 4]):
                steps = tokens(seed=seed, cuda_graphs=True, **kw)
                whole = tokens(seed=seed, cuda_graphs="whole", **kw)
                rows.append((f"cuda_graphs='whole' ({name}, compile_blocks, seed {seed}): tokens equal to the "
                             f"per-step graphs", f"{(steps == whole).float().mean():.1%} equal",
                             bool(torch.equal(steps, whole))))
            gen.release_cuda_graphs()

        def head_graph_tokens(sampler) -> None:
            """A whole generation with cuda_graphs=True, the head's steps from graphs or launched: the same compiled
            head (the autocast cache, off under graphs, is in its guards: without cuda_graphs it is another graph)."""
            launched = tokens(sampler=sampler.with_settings(compile_head=True, head_graphs=False), compile_blocks=True,
                              cuda_graphs=True)
            replayed = tokens(sampler=sampler.with_settings(compile_head=True, head_graphs=True), compile_blocks=True,
                              cuda_graphs=True)
            rows.append(("stable sampler, compiled head, cuda_graphs: tokens with the head steps from CUDA graphs "
                         "equal to launched", f"{(launched == replayed).float().mean():.1%} equal",
                         bool(torch.equal(launched, replayed))))
            gen.release_cuda_graphs()

        if args.only_head_graphs:
            head_graph_tokens(stable_for(gen, pn, dev))
            return
        whole_graph_tokens()
        whole_graph_tokens(stable_for(gen, pn, dev).with_settings(compile_head=True))
        if args.only_whole_graph:
            text_graph_rows()
            return
        plain, graphs = tokens(), tokens(cuda_graphs=True)
        rows.append(("cuda_graphs: tokens equal to the eager loop", f"{(plain == graphs).float().mean():.1%} equal",
                     bool(torch.equal(plain, graphs))))
        fused, fused_graphs = tokens(compile_blocks=True), tokens(compile_blocks=True, cuda_graphs=True)
        rows.append(("compile_blocks + cuda_graphs: tokens equal to compile_blocks",
                     f"{(fused == fused_graphs).float().mean():.1%} equal", bool(torch.equal(fused, fused_graphs))))
        gen.release_cuda_graphs()

        sampler = stable_for(gen, pn, dev)
        head, C = sampler.head, net.width
        l = pn[-1] ** 2
        with torch.no_grad(), amp:
            hidden = torch.randn(2, l, C, device=dev)
            shown = torch.randn(2, l, tok.embed_dim, device=dev)
            pooled = torch.randn(2, gen.text_encoder.dim, device=dev)
            rot, first = net.positional.rotary(slice(0, l)), net.positional.rotary(slice(0, 1))
            d = rel_diff(head(hidden, shown, pooled, len(pn) - 1, first, rot),
                         head.compiled_forward()(hidden, shown, pooled, len(pn) - 1, first, rot))
        rows.append(("compile_head: head logits (max rel. diff)", f"{d:.2e}", d <= args.tolerance))
        with torch.no_grad(), amp:  # sampling's form: fixed inputs once per scale, the last block on some rows
            positions = torch.rand(2, l, device=dev).argsort(dim=1)[:, :l // 3].sort(dim=1).values  # (2, h)
            full = head(hidden, shown, pooled, len(pn) - 1, first, rot)  # (2, l, V)
            want = full.gather(1, positions[..., None].expand(-1, -1, full.shape[-1]))
            fused_d = rel_diff(want, head.for_scale(hidden, pooled, len(pn) - 1, first, rot, fused=True)(shown, positions))
            compiled_d = rel_diff(want, head.for_scale(hidden, pooled, len(pn) - 1, first, rot, compiled=True)(
                shown, positions))
        for form, d in (("fused", fused_d), ("compiled", compiled_d)):
            rows.append((f"head for_scale, {form}, a third of the rows: logits (max rel. diff)", f"{d:.2e}",
                         d <= args.tolerance))
        from starkit.samplers.head_graphs import HeadStepGraphs
        with torch.no_grad(), amp:  # a reveal step replayed from a CUDA graph, then again with new inputs
            step_graphs, worst, bitwise = HeadStepGraphs(), 0.0, True
            for revealed in (shown, shown.flip(1)):
                want = head.for_scale(hidden, pooled, len(pn) - 1, first, rot, compiled=True)(revealed, positions)
                got = head.for_scale(hidden, pooled, len(pn) - 1, first, rot, compiled=True,
                                     graphs=step_graphs)(revealed, positions)
                worst, bitwise = max(worst, rel_diff(want, got)), bitwise and bool(torch.equal(want, got))
        rows.append(("head step from a CUDA graph (compiled head), twice with new inputs: logits (max rel. diff)",
                     f"{worst:.2e} ({'bitwise equal' if bitwise else 'not bitwise equal'})", worst <= args.tolerance))
        head_graph_tokens(sampler)

        from starkit.generator.blocks import fc1_gelu
        import torch.nn.functional as F
        fc1 = net.blocks[0].ffn.fc1
        for dt in (torch.float32, torch.bfloat16):  # float32 shows the GELU's form: tanh (ok) or exact
            h = torch.randn(3, 300, C, device=dev, generator=g).to(dt)
            w, b = fc1.weight.detach().to(dt), fc1.bias.detach().to(dt) + 0.5
            with torch.no_grad():
                got = fc1_gelu(h, w, b)
                tanh_d = rel_diff(F.gelu(F.linear(h, w, b).float(), approximate="tanh"), got)
                erf_d = rel_diff(F.gelu(F.linear(h, w, b).float()), got)
            rows.append((f"fc1_gelu (GELU in the matrix product's epilogue), {str(dt)[6:]}: max rel. diff to "
                         f"tanh GELU / exact GELU", f"{tanh_d:.2e} / {erf_d:.2e}",
                         tanh_d <= args.tolerance and (dt != torch.float32 or tanh_d < erf_d)))

        clip = text_graph_rows()
        a = clip.encode(prompts)
        clip.compile_model = True
        b = clip.encode(prompts)
        d = rel_diff(a.pooled, b.pooled)
        rows.append(("compile text: CLIP pooled features (max rel. diff)", f"{d:.2e}", d <= args.tolerance))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        print_rows(rows, dev)


def print_rows(rows, dev: torch.device) -> None:
    name = bg.device_name(dev)
    print(f"\n### Compiled inference paths against eager ({name}, torch {torch.__version__})\n")
    print("| check | result | ok |\n|---|---|---|")
    for check, result, ok in rows:
        print(f"| {check} | {result} | {'yes' if ok else 'NO'} |")


if __name__ == "__main__":
    main()
