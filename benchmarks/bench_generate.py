"""End-to-end text -> image latency of starkit and of the OFFICIAL STAR-T2I code, in one run on one
GPU, with the ratio: the benchmark of issue 7 (random weights, real architectures, no downloads).

    python benchmarks/bench_generate.py --official-root .official/STAR --json $OUT/bench_generate.json
    python benchmarks/bench_generate.py --configs d30@1024 --batches 1,16 --official-root .official/STAR
    python benchmarks/bench_generate.py --tiny --official-root /path/to/STAR        # CPU smoke run (~1 min)
    ... --cuda-graphs      # also starkit with generate(cuda_graphs=True): rows "starkit graphs"
    ... --cuda-graphs --compile-decoder   # those rows with the compiled VQ decoder as well
    ... --compile-head     # and rows with the stable sampler's head compiled (first call compiles, untimed warm-up)
    ... --compile-blocks   # and rows with generate(compile_blocks=True): the blocks' element-wise work compiled
    ... --compile-text     # and rows with the CLIP text encoder compiled; with two or more --compile-*: all together
    ... --fp8              # and the all-compiled rows again with generate(fp8=True) (float8 products; an approximation)

For each config (d16@256, d30@512, d30@1024), sampler (parallel, stable) and batch (1, 16):
  * starkit: ``ScaleWiseGenerator.generate(prompts, cfg, top_k, top_p, seed)`` under bf16 autocast
    (text encoding with a CLIP of SD-2.1's size, all scales with the KV cache and batched CFG, VQ
    decode), built by benchmarks/bench_generator.py's helpers; the stable sampler has a random head
    marked trained, revealing the same scales in the same number of steps as the official one;
  * official: benchmarks/official_star.py (sample.py's path, fp16 autocast as it runs; the stable
    sampler as demo_gradio.py builds it: ``sample_from_idx=9``, so scales 9.. are causal).
Both use cfg 4.0, top_k 600, top_p 0.8. Timing: host clock around synchronised calls, ``--warmup``
untimed first, median of ``--repeats``. Each model is built, timed and freed before the next, so
peak memory is each one's own. TFLOP/s from benchmarks/flops.py (one forward over the 2B guided
rows; the official and starkit transformers do the same work), against the bf16 matmul ceiling
measured at the start of the run (8192^3, bf16). The markdown table is printed last.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
import bench_generator as bg  # noqa: E402
from flops import GeneratorArch, generate_flops  # noqa: E402

PATCH_NUMS = {"d16@256": bg.P256, "d30@512": bg.P512, "d30@1024": bg.P1024}
TINY_PATCH_NUMS = {"d16@256": tuple(range(1, 11)), "d30@512": tuple(range(1, 11)), "d30@1024": tuple(range(1, 15))}
SAMPLE_FROM = 9  # the official stable sampler's first causal scale (demo_gradio.py / train_sampler.py)


def matmul_ceiling(dev: torch.device, n: int = 8192, repeats: int = 20) -> float | None:
    """Measured bf16 matmul TFLOP/s (the denominator of '% of ceiling')."""
    if dev.type != "cuda":
        return None
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    torch.cuda.synchronize(dev)
    return 2 * n ** 3 * repeats / (start.elapsed_time(end) / 1000) / 1e12


def stable_for(gen, patch_nums, dev):
    """starkit's StableSampler revealing what the official one reveals: scales SAMPLE_FROM.. (8 steps,
    15 on the last scale, 5 of them from the main logits); a random head marked trained."""
    from starkit.samplers import StableSampler
    tr = gen.transformer
    sampler = StableSampler(**bg.SAMPLING, causal_scales=max(len(patch_nums) - SAMPLE_FROM, 0), steps=8,
                            steps_last=15, random_steps=5)
    sampler.build(tr.width, gen.text_encoder.dim, gen.tokenizer.embed_dim, gen.tokenizer.codebook_size,
                  tr.num_heads, gen.patch_nums)
    sampler.head_trained.fill_(1)
    return sampler.to(dev).eval()


def time_ours(config: str, args, dev, text, ceiling) -> list:
    tiny = args.tiny
    pn = (TINY_PATCH_NUMS if tiny else PATCH_NUMS)[config]
    tok = bg.build_tokenizer(tiny, pn, dev)
    gen = bg.build_generator(config.split("@")[0], tiny, pn, tok, text, dev).eval()
    rows = []
    samplers = {"parallel": None, "stable": stable_for(gen, pn, dev)}
    arch = GeneratorArch.from_transformer(gen.transformer, text_len=gen.text_encoder.max_length)
    plain = [] if args.skip_plain else [True] if args.cuda_graphs and args.skip_eager else \
        [False, True] if args.cuda_graphs else [False]
    if args.cuda_graphs and args.compile_decoder and dev.type == "cuda" and not plain:
        tok.optimize_for_inference(channels_last=True)
    for graphs in plain:
        if graphs and args.compile_decoder and dev.type == "cuda":
            tok.optimize_for_inference(channels_last=True)  # the "starkit graphs" rows: compiled VQ decoder too
        for sampler_name in args.samplers.split(","):
            for B in batches(args):
                prompts = [bg.CAPTIONS[i % len(bg.CAPTIONS)] for i in range(B)]

                def call():
                    with torch.no_grad():  # generate() sets its own bf16 autocast on CUDA
                        gen.generate(prompts, seed=0, sampler=samplers[sampler_name], cuda_graphs=graphs,
                                     **bg.SAMPLING)

                row = timed("starkit graphs" if graphs else "starkit", config, sampler_name, B, call, args,
                            dev, generate_flops(arch, B, guided=True), ceiling)
                row["compiled_decoder"] = bool(graphs and args.compile_decoder and dev.type == "cuda")
                rows.append(row)
    # extra rows, with or without graphs as asked: each compiled path alone (the text encoder,
    # HFTextEncoder(compile=True); the stable sampler's head, StableSampler(compile_head=True); the blocks'
    # element-wise work, generate(compile_blocks=True)), then all the asked ones together
    text_ok = args.compile_text and hasattr(text, "compile_model")  # a random text encoder has nothing to compile
    variants = [(name, h, b, t, True, True) for name, h, b, t, on in (
        ("compiled text", False, False, True, text_ok), ("compiled head", True, False, False, args.compile_head),
        ("compiled blocks", False, True, False, args.compile_blocks)) if on]
    if len(variants) > 1:
        all_on = ("all compiled", args.compile_head, args.compile_blocks, text_ok, True, True)
        variants = [all_on] if args.only_all_compiled else variants + [all_on]
        if args.head_in_regions and args.compile_head and args.compile_blocks:  # the head through the block regions
            variants.append(("all compiled, head in regions", False, True, text_ok, True, True))
        if args.without_head_graphs and args.cuda_graphs:  # the head's steps launched from Python
            variants.append(("all compiled, head steps without graphs", args.compile_head, args.compile_blocks,
                             text_ok, False, True))
    if args.whole_graph and args.cuda_graphs:  # the whole generation after the text encoding as one CUDA graph
        variants += [(label + ", whole graph", h, b, t, hg, "whole") for label, h, b, t, hg, _ in variants
                     if label.startswith("all compiled") and hg]
    if args.without_text_graph and args.cuda_graphs and hasattr(text, "cuda_graph"):  # CLIP launched from Python
        variants += [(label + ", text without graph", h, b, t, hg, mode) for label, h, b, t, hg, mode in variants
                     if label.startswith("all compiled") and hg]
    if args.fp8:  # the same all-compiled variants with the blocks' products in float8 (generate(fp8=True))
        variants += [(label + ", fp8", h, b, t, hg, mode) for label, h, b, t, hg, mode in variants
                     if label.startswith("all compiled") or (label == "compiled blocks" and len(variants) == 1)]
    for label, head, blocks, compile_text, head_graphs, graphs_mode in variants:
        for sampler_name in args.samplers.split(","):
            if sampler_name != "stable" and not (blocks or compile_text):
                continue  # the head exists only in the stable sampler
            sampler = samplers[sampler_name]
            if sampler_name == "stable":
                sampler = sampler.with_settings(compile_head=head, head_graphs=head_graphs)
            if hasattr(text, "compile_model"):
                text.compile_model = compile_text
            if hasattr(text, "cuda_graph"):
                text.cuda_graph = not label.endswith("text without graph")
            for B in batches(args):
                prompts = [bg.CAPTIONS[i % len(bg.CAPTIONS)] for i in range(B)]

                def call():
                    with torch.no_grad():
                        gen.generate(prompts, seed=0, sampler=sampler,
                                     cuda_graphs=graphs_mode if args.cuda_graphs else False,
                                     compile_blocks=blocks, fp8=label.endswith(", fp8"), **bg.SAMPLING)

                impl = ("starkit graphs, " if args.cuda_graphs else "starkit, ") + label
                row = timed(impl, config, sampler_name, B, call, args, dev, generate_flops(arch, B, guided=True),
                            ceiling)
                row.update(compiled_decoder=bool(args.cuda_graphs and args.compile_decoder and dev.type == "cuda"),
                           compiled_text=compile_text, compiled_head=head and sampler_name == "stable",
                           head_graphs=head_graphs and sampler_name == "stable" and args.cuda_graphs,
                           compiled_blocks=blocks, whole_graph=graphs_mode == "whole" and args.cuda_graphs,
                           fp8=label.endswith(", fp8"),
                           text_graph=bool(getattr(text, "cuda_graph", False) and args.cuda_graphs))
                rows.append(row)
            if hasattr(text, "compile_model"):
                text.compile_model = False
            if hasattr(text, "cuda_graph"):
                text.cuda_graph = True
    del gen, tok, samplers
    bg.free_memory(dev)
    return rows


def time_official(config: str, args, dev, ceiling) -> list:
    from official_star import build_official
    rows = []
    for sampler_name in args.samplers.split(","):
        model = build_official(args.official_root, config, device=dev, sampler=sampler_name, tiny=args.tiny,
                               sampling=dict(bg.SAMPLING, seed=0))
        for B in batches(args):
            rows.append(timed("official", config, sampler_name, B, lambda: model.generate(B, seed=0), args, dev,
                              None, ceiling))
        del model
        bg.free_memory(dev)
    return rows


def timed(impl: str, config: str, sampler: str, B: int, call, args, dev, flops, ceiling) -> dict:
    """One row: median latency of ``call`` (an OOM becomes an ``error`` row, via bench_generator.run_guarded)."""
    row = {"impl": impl, "config": config, "sampler": sampler, "batch": B}
    bg.free_memory(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    def measure() -> dict:
        times = bg.time_calls(call, args.warmup, args.repeats, dev)
        t = statistics.median(times)
        out = dict(latency_s=t, latency_all=times, s_per_image=t / B, images_per_s=B / t, peak_gib=bg.peak_gib(dev),
                   flops=flops, tflops=flops / t / 1e12 if flops else None)
        if flops and ceiling:
            out["pct_of_ceiling"] = 100 * flops / t / 1e12 / ceiling
        return out

    result: list = []
    if impl != "starkit":  # experimental paths (graphs, compiled head): any failure becomes an error row, the run goes on
        import traceback

        def measure_or_error() -> dict:
            try:
                return measure()
            except Exception as err:  # noqa: BLE001
                if bg.is_oom(err):
                    raise
                traceback.print_exc()
                return {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"}
        bg.run_guarded(measure_or_error, result, f"{impl} {config} {sampler}", "generate", B, dev)
    else:
        bg.run_guarded(measure, result, f"{impl} {config} {sampler}", "generate", B, dev)
    return {**result[-1], **row}  # an OOM row keeps this row's impl, config, sampler and batch


def batches(args) -> list:
    out = [int(b) for b in args.batches.split(",") if b]
    return [min(b, 2) for b in out] if args.tiny else out


def table(rows: list, device_name: str, ceiling) -> str:
    official = {(r["config"], r["sampler"], r["batch"]): r for r in rows if r["impl"] == "official" and "error" not in r}
    ceil = f"{ceiling:.0f} TFLOP/s measured bf16 matmul" if ceiling else "no ceiling (CPU)"
    lines = [f"### End-to-end generation, starkit vs official STAR-T2I ({device_name}; {ceil})", "",
             "| config | impl | sampler | batch | starkit s/image | official s/image | speed-up | starkit TFLOP/s (% ceiling) "
             "| starkit peak GiB | official peak GiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r["impl"].startswith("starkit"):
            continue
        o = official.get((r["config"], r["sampler"], r["batch"]))
        if "error" in r:
            lines.append(f"| {r['config']} | {r['impl']} | {r['sampler']} | {r['batch']} | {r['error']} | | | | | |")
            continue
        fmt = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731
        speed = f"{o['s_per_image'] / r['s_per_image']:.2f}x" if o else "n/a"
        tf = fmt(r.get("tflops"), ".1f") + (f" ({r['pct_of_ceiling']:.0f}%)" if r.get("pct_of_ceiling") else "")
        lines.append(f"| {r['config']} | {r['impl']} | {r['sampler']} | {r['batch']} | {r['s_per_image']:.4f} | "
                     f"{fmt(o and o['s_per_image'], '.4f')} | {speed} | {tf} | {fmt(r['peak_gib'], '.1f')} | "
                     f"{fmt(o and o.get('peak_gib'), '.1f')} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="d16@256,d30@512,d30@1024")
    ap.add_argument("--samplers", default="parallel,stable")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--official-root", default=None, help="a checkout of STAR-T2I (not committed); none: ours only")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny models")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="also time starkit with generate(cuda_graphs=True) (rows 'starkit graphs')")
    ap.add_argument("--compile-decoder", action="store_true",
                    help="with --cuda-graphs: the 'starkit graphs' rows also use tokenizer.optimize_for_inference("
                         "channels_last=True) (compiled VQ decoder)")
    ap.add_argument("--skip-eager", action="store_true", help="with --cuda-graphs: no rows without graphs")
    ap.add_argument("--compile-head", action="store_true",
                    help="also rows with the stable sampler's head under torch.compile (StableSampler(compile_head=True))")
    ap.add_argument("--compile-text", action="store_true",
                    help="also rows with the CLIP text encoder compiled (HFTextEncoder(compile=True))")
    ap.add_argument("--compile-blocks", action="store_true",
                    help="also rows with generate(compile_blocks=True) (with the compiled head too under --compile-head)")
    ap.add_argument("--only-all-compiled", action="store_true",
                    help="with several --compile-* paths: only the row with all of them (not each alone)")
    ap.add_argument("--head-in-regions", action="store_true",
                    help="with --compile-head and --compile-blocks: also the all-compiled row without compile_head "
                         "(the stable sampler's head then runs through the blocks' compiled regions)")
    ap.add_argument("--without-head-graphs", action="store_true",
                    help="with --cuda-graphs and several --compile-* paths: also the all-compiled row with the stable "
                         "sampler's head steps launched from Python (StableSampler(head_graphs=False))")
    ap.add_argument("--whole-graph", action="store_true",
                    help="with --cuda-graphs and several --compile-* paths: also each all-compiled row with "
                         "generate(cuda_graphs='whole') (the whole generation after the text encoding as one CUDA graph)")
    ap.add_argument("--without-text-graph", action="store_true",
                    help="with --cuda-graphs: also each all-compiled row with the CLIP text encoder launched from Python "
                         "(HFTextEncoder(cuda_graph=False); by default generate(cuda_graphs=...) replays it from a graph)")
    ap.add_argument("--skip-plain", action="store_true",
                    help="no rows without a --compile-* path (neither 'starkit' nor 'starkit graphs')")
    ap.add_argument("--no-tune-first", action="store_true",
                    help="the compiled paths meet the small scales first, as before starkit.utils.compiling.tune_first_at "
                         "(their Triton kernels then keep launch configurations timed at small sizes)")
    ap.add_argument("--kv-head-major", action="store_true",
                    help="KV caches stored head-major (B, H, L, d), as before starkit.generator.kv_cache.KV_TOKEN_MAJOR")
    ap.add_argument("--fp8", action="store_true",
                    help="also time the all-compiled variants with generate(fp8=True) (the blocks' products in "
                         "float8 e4m3; needs --compile-blocks)")
    ap.add_argument("--inductor-option", action="append", default=[], metavar="NAME=INT",
                    help="an Inductor option of the compiled inference regions (starkit.utils.compiling."
                         "INFERENCE_OPTIONS), e.g. triton.multi_kernel=1; repeatable")
    ap.add_argument("--text", choices=("clip", "random"), default="clip")
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    from starkit.generator import kv_cache
    from starkit.utils import compiling
    saved = kv_cache.KV_TOKEN_MAJOR, compiling.TUNE_DEVICE_TYPES, dict(compiling.INFERENCE_OPTIONS)  # restored
    for option in args.inductor_option:  # at the end (the tests call main())
        name, _, value = option.partition("=")
        compiling.INFERENCE_OPTIONS[name] = int(value)
    if args.kv_head_major:
        kv_cache.KV_TOKEN_MAJOR = False
    if args.no_tune_first:
        compiling.TUNE_DEVICE_TYPES = ()
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # as sample.py runs
    ceiling = matmul_ceiling(dev)
    device_name = bg.device_name(dev)
    bg.log(f"{device_name}, torch {torch.__version__}, bf16 matmul ceiling {ceiling}, inference compile options "
           f"{compiling.INFERENCE_OPTIONS}")
    rows, workdir = [], tempfile.mkdtemp(prefix="bench_generate_")
    try:
        text, _ = bg.build_text_encoder(args.text, args.tiny, dev, workdir)
        for config in args.configs.split(","):
            if args.official_root:  # first: a run cut short by a time limit still has the reference
                rows += time_official(config, args, dev, ceiling)
            rows += time_ours(config, args, dev, text, ceiling)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        kv_cache.KV_TOKEN_MAJOR, compiling.TUNE_DEVICE_TYPES = saved[:2]
        compiling.INFERENCE_OPTIONS.clear()
        compiling.INFERENCE_OPTIONS.update(saved[2])
    if args.json:
        bg.write_results(args.json, device_name, args, rows, ceiling_tflops=ceiling)
    print()
    print(table(rows, device_name + (" (tiny smoke run)" if args.tiny else ""), ceiling), flush=True)


if __name__ == "__main__":
    main()
