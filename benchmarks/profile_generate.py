"""Where generation time goes: per-phase host time (synchronised around each phase) and the
top CUDA kernels of one end-to-end ``generate`` call, for the real architectures with random
weights. A diagnostic for issue 7, not a benchmark: the synchronisation removes the overlap
between phases, so the phases add up to more than an unsynchronised call (printed beside).

    python benchmarks/profile_generate.py --cases d16@256:parallel:1,d30@1024:stable:1 --cuda-graphs
    python benchmarks/profile_generate.py --tiny --cases d16@256:parallel:1          # CPU smoke run

Phases: text encoding, transformer scale steps (``forward_scale`` + logits, or the static
steps), sampler (filtering, draws, sampler head), tokenizer (``add_scale`` +
``next_scale_input``), VQ decode. The kernel table is torch.profiler's, sorted by device time.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import os
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
import bench_generator as bg  # noqa: E402
from bench_generate import PATCH_NUMS, TINY_PATCH_NUMS, stable_for  # noqa: E402


class HostEvent:
    """``torch.cuda.Event``'s ``record`` / ``elapsed_time`` on the host clock (CPU runs of the events mode)."""

    def record(self) -> None:
        self.t = time.perf_counter()

    def elapsed_time(self, end: "HostEvent") -> float:
        return (end.t - self.t) * 1000


class PhaseTimer:
    """Wraps methods (of an object, or of a class for all its instances) so that each call is
    synchronised and its host time added to a phase; :meth:`restore` undoes the wrapping.

    With ``events=True`` nothing is synchronised: each outermost call records a CUDA event before and
    after it and its host time, per phase and scale (``scale_of(args)`` names the scale, or None: the
    last one seen), read by :meth:`per_scale` once the call is over."""

    def __init__(self, dev: torch.device, events: bool = False) -> None:
        self.dev, self.totals, self.enabled = dev, collections.defaultdict(float), False
        self.events, self.records, self._scale, self._stack = events, [], -1, []  # records: see _recorded
        self._depth = 0
        self._wrapped = []  # (obj, name, original or None when the attribute was inherited)

    def restore(self) -> None:
        for obj, name, original in reversed(self._wrapped):
            if original is None:
                delattr(obj, name)
            else:
                setattr(obj, name, original)
        self._wrapped.clear()

    def wrap(self, obj, name: str, phase: str, scale_of=None) -> None:
        original = getattr(obj, name)
        self._wrapped.append((obj, name, vars(obj).get(name)))

        def timed(*args, **kwargs):
            if self.enabled and self.events:  # nested calls too: per_scale subtracts them from their caller
                return self._recorded(original, phase, scale_of, args, kwargs)
            if not self.enabled or self._depth:
                return original(*args, **kwargs)
            self._depth += 1
            bg.sync(self.dev)
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                bg.sync(self.dev)
                self.totals[phase] += time.perf_counter() - start
                self._depth -= 1
        setattr(obj, name, timed)

    def _recorded(self, original, phase, scale_of, args, kwargs):
        if scale_of is not None:
            self._scale = scale_of(args)
        cuda = self.dev.type == "cuda"
        start, end = ((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) if cuda
                      else (HostEvent(), HostEvent()))
        record = [phase, self._scale, start, end, 0.0, self._depth, []]  # ..., host s, depth, children
        if self._stack:
            self._stack[-1][6].append(record)
        self.records.append(record)
        self._stack.append(record)
        self._depth += 1
        host = time.perf_counter()
        start.record()
        try:
            return original(*args, **kwargs)
        finally:
            end.record()
            record[4] = time.perf_counter() - host
            self._depth -= 1
            self._stack.pop()

    def per_scale(self, patch_nums, calls: int) -> None:
        """Print device and host ms per scale and phase (means over ``calls`` calls), then the device time
        not covered by any wrapped call (host gaps and unwrapped work) over the whole span of each call."""
        bg.sync(self.dev)
        phases = list(dict.fromkeys(r[0] for r in self.records))
        table = collections.defaultdict(lambda: [0.0, 0.0])
        for phase, scale, start, end, host, _, children in self.records:  # self time: the nested calls taken out
            cell = table[(phase, scale)]
            cell[0] += (start.elapsed_time(end) - sum(c[2].elapsed_time(c[3]) for c in children)) / calls
            cell[1] += (host - sum(c[4] for c in children)) * 1000 / calls
        scales = sorted({r[1] for r in self.records})
        print("\n| scale | pn | " + " | ".join(f"{p} device ms (host ms)" for p in phases) + " |")
        print("|---|---|" + "---|" * len(phases))
        for k in scales:
            pn = patch_nums[k] if 0 <= k < len(patch_nums) else "-"
            cells = [f"{table[(p, k)][0]:.2f} ({table[(p, k)][1]:.2f})" if (p, k) in table else "" for p in phases]
            print(f"| {k} | {pn} | " + " | ".join(cells) + " |")
        totals = [sum(v[0] for (p, _), v in table.items() if p == q) for q in phases]
        hosts = [sum(v[1] for (p, _), v in table.items() if p == q) for q in phases]
        print("| all | | " + " | ".join(f"{d:.1f} ({h:.1f})" for d, h in zip(totals, hosts)) + " |")
        outer = [r for r in self.records if r[5] == 0]
        per_call = len(outer) // max(calls, 1)
        spans = [outer[i][2].elapsed_time(outer[i + per_call - 1][3]) for i in range(0, per_call * calls, per_call)]
        span = sorted(spans)[len(spans) // 2]
        print(f"\n(nested phases' times are taken out of their callers'.) First to last event of a call: {span:.1f} ms; "
              f"in the wrapped calls: {sum(totals):.1f} ms; "
              f"outside them (host gaps, unwrapped work): {span - sum(totals):.1f} ms")


# kernel-name patterns -> category, first match wins (names of CUDA kernels as torch.profiler reports them)
CATEGORIES = (("convolutions", ("fprop_implicit", "conv", "winograd", "wgrad", "dgrad")),
              ("attention", ("fmha", "flash", "sdpa", "attention")),
              ("matrix products", ("gemm", "sm90_xmma", "cutlass", "nvjet", "matmul", "_mm_", "cublas")),
              ("compiled (triton) fusions", ("triton_",)),
              ("copies and casts", ("copy", "cast", "memcpy", "memset", "fill")),
              ("reductions, sort, top-k", ("reduce", "sort", "topk", "scan", "radix", "softmax", "norm")),
              ("other element-wise", ("elementwise", "vectorized", "unrolled", "index", "gather", "scatter", "cat")))


def categorise(name: str) -> str:
    low = name.lower()
    for category, patterns in CATEGORIES:
        if any(p in low for p in patterns):
            return category
    return "other"


def kernel_events(events) -> list:
    """The profiler's kernel-level rows: operator-level rows repeat their kernels' time; runtime calls and
    profiler records are not kernels."""
    return [e for e in events
            if e.self_device_time_total > 0 and not e.key.startswith(("aten::", "cuda", "Command Buffer"))]


def print_categories(events) -> None:
    """Device time of the call's kernels by category (the profiler's kernel-level events only)."""
    totals, counts = collections.defaultdict(float), collections.defaultdict(int)
    for e in kernel_events(events):
        totals[categorise(e.key)] += e.self_device_time_total / 1000
        counts[categorise(e.key)] += e.count
    total = sum(totals.values())
    print("\n| kernel category | ms of device time | share | kernel launches |\n|---|---|---|---|")
    for k, v in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"| {k} | {v:.1f} | {100 * v / max(total, 1e-9):.0f}% | {counts[k]} |")
    print(f"| all kernels | {total:.1f} | | |")


def profile_case(case: str, args, dev, text) -> None:
    config, sampler_name, batch = case.split(":")
    B = int(batch)
    pn = (TINY_PATCH_NUMS if args.tiny else PATCH_NUMS)[config]
    tok = bg.build_tokenizer(args.tiny, pn, dev)
    gen = bg.build_generator(config.split("@")[0], args.tiny, pn, tok, text, dev).eval()
    sampler = stable_for(gen, pn, dev) if sampler_name == "stable" else None
    if sampler is not None and args.compile_head:
        sampler = sampler.with_settings(compile_head=True)
    if args.compile_decoder and dev.type == "cuda":
        tok.optimize_for_inference(channels_last=True)
    if hasattr(text, "compile_model"):
        text.compile_model = args.compile_text
    prompts = [bg.CAPTIONS[i % len(bg.CAPTIONS)] for i in range(B)]

    def call():
        with torch.no_grad():
            gen.generate(prompts, seed=0, sampler=sampler,
                         cuda_graphs="whole" if args.whole_graph and args.cuda_graphs else args.cuda_graphs,
                         compile_blocks=args.compile_blocks, fp8=args.fp8, **bg.SAMPLING)

    net = gen.ema if gen.ema is not None else gen.transformer  # what generate() samples with
    from starkit.generator.graphs import StaticScaleSteps
    K = len(pn)

    def wrapped(timer: PhaseTimer) -> PhaseTimer:
        timer.wrap(gen.text_encoder, "encode", "text encoding", lambda a: -1)
        timer.wrap(net, "forward_scale", "transformer scales", lambda a: a[1])
        timer.wrap(net, "logits", "transformer scales")
        timer.wrap(StaticScaleSteps, "run", "transformer scales", lambda a: a[1])  # classes: instances come later
        timer.wrap(type(sampler if sampler is not None else gen.sampler), "sample_scale", "sampler",
                   lambda a: a[1].scale)  # the class: generate() samples with with_settings copies
        timer.wrap(tok, "add_scale", "tokenizer (add_scale, next input)", lambda a: a[1])
        timer.wrap(tok, "next_scale_input", "tokenizer (add_scale, next input)", lambda a: a[1] - 1)
        timer.wrap(tok, "decode_latent", "VQ decode", lambda a: K)
        if timer.events and sampler is not None:  # inside the stable sampler's steps
            from starkit.samplers import stable
            from starkit.samplers.head import SamplerHead
            timer.wrap(SamplerHead, "logits", "head norm + logits")
            timer.wrap(type(sampler), "_candidates", "guidance + top-k/top-p")
            timer.wrap(stable, "draw", "draw")
        return timer

    timer = wrapped(PhaseTimer(dev))
    try:
        for _ in range(args.warmup):
            call()
        plain = []
        for _ in range(args.repeats):
            bg.sync(dev)
            start = time.perf_counter()
            call()
            bg.sync(dev)
            plain.append(time.perf_counter() - start)
        timer.enabled = True
        for _ in range(args.repeats):
            call()
        timer.enabled = False
        total_plain = sorted(plain)[len(plain) // 2]
        print(f"\n## {case} (cuda_graphs={'whole' if args.whole_graph and args.cuda_graphs else args.cuda_graphs}, compile_head={args.compile_head}, "
              f"compile_text={args.compile_text}, compile_blocks={args.compile_blocks}, compile_decoder={args.compile_decoder}, fp8={args.fp8}): unsynchronised call {total_plain * 1000:.1f} ms "
              f"(median of {args.repeats})")
        phases = {k: v / args.repeats for k, v in timer.totals.items()}
        print("| phase (synchronised) | ms per call | share |\n|---|---|---|")
        for k, v in sorted(phases.items(), key=lambda kv: -kv[1]):
            print(f"| {k} | {v * 1000:.1f} | {100 * v / sum(phases.values()):.0f}% |")
        print(f"| sum | {sum(phases.values()) * 1000:.1f} | |")
        timer.restore()
        if args.per_scale:  # device time per scale, nothing synchronised (the host clock on a CPU)
            timer = wrapped(PhaseTimer(dev, events=True))
            timer.enabled = True
            for _ in range(args.repeats):
                call()
            timer.enabled = False
            print(f"\nper scale (CUDA events around each phase call, no synchronisation; scale -1: text, "
                  f"{K}: decode; mean of {args.repeats} calls; 'sampler': the stable sampler's head blocks and "
                  f"reveal steps, the phases after it are the rest of the sampler's time):")
            timer.per_scale(pn, args.repeats)
        if dev.type == "cuda" and not args.no_kernels:
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                call()
                bg.sync(dev)
            events = prof.key_averages()
            device_total = sum(e.self_device_time_total for e in events) / 1000
            print(f"\nkernels of one call: {device_total:.1f} ms of device time in all")
            print_categories(events)
            print(events.table(sort_by="self_device_time_total", row_limit=args.rows, max_name_column_width=70))
    finally:
        timer.restore()
        del gen, tok, sampler
        bg.free_memory(dev)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="d16@256:parallel:1,d30@1024:stable:1",
                    help="comma list of config:sampler:batch")
    ap.add_argument("--cuda-graphs", action="store_true")
    ap.add_argument("--compile-decoder", action="store_true",
                    help="tokenizer.optimize_for_inference(channels_last=True)")
    ap.add_argument("--compile-head", action="store_true", help="StableSampler(compile_head=True)")
    ap.add_argument("--compile-blocks", action="store_true", help="generate(compile_blocks=True)")
    ap.add_argument("--fp8", action="store_true", help="generate(fp8=True): the blocks' products in float8")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--no-kernels", action="store_true", help="skip the torch.profiler kernel table")
    ap.add_argument("--per-scale", action="store_true",
                    help="also device and host ms per scale and phase from CUDA events (no synchronisation)")
    ap.add_argument("--compile-text", action="store_true", help="the CLIP text encoder compiled (HFTextEncoder)")
    ap.add_argument("--whole-graph", action="store_true",
                    help="with --cuda-graphs: generate(cuda_graphs='whole'); the phases inside the graph are not "
                         "timed (a replay runs no Python), the kernel table still lists its kernels")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--text", choices=("clip", "random"), default="clip")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    with tempfile.TemporaryDirectory() as workdir:
        text, _ = bg.build_text_encoder(args.text, args.tiny, dev, workdir)
        for case in args.cases.split(","):
            try:
                profile_case(case, args, dev, text)
            except Exception:  # noqa: BLE001  (a diagnostic: report and go on with the next case)
                import traceback
                traceback.print_exc()
                print(f"\n## {case}: FAILED (traceback above)")


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main()
