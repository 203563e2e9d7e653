"""Where starkit's GPU paths make the host wait for the GPU: each synchronising CUDA call of a
training step and of a generation call, with the line of starkit (or of a library) that made it.

    python benchmarks/find_syncs.py                      # H200: d16 @256, VAR-sized tokenizer, SD-2.1-sized CLIP
    python benchmarks/find_syncs.py --config d30@1024 --skip-train

A host synchronisation in a training step drains the GPU's queue: the kernels launched after it
start only when the host gets there, so the GPU idles for the host's launch time. It uses
``torch.cuda.set_sync_debug_mode("warn")`` after one untimed warm-up call of each path, and prints
one line per call site (innermost starkit frame, else the innermost frame) with its count.
"""
from __future__ import annotations

import argparse
import collections
import os
import shutil
import sys
import tempfile
import traceback
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
import bench_generator as bg  # noqa: E402


def call_site(stack) -> str:
    frames = [f for f in stack if "warnings.py" not in f.filename and "find_syncs.py" not in f.filename]
    ours = [f for f in frames if f"{os.sep}starkit{os.sep}" in f.filename]
    f = (ours or frames or stack)[-1]
    where = os.path.relpath(f.filename, os.path.dirname(HERE)) if ours else f.filename
    return f"{where}:{f.lineno} ({f.name}): {f.line}"


def syncs_of(fn) -> collections.Counter:
    """Call ``fn`` once with sync debugging on; count the synchronising calls by call site."""
    sites = collections.Counter()
    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        previous = warnings.showwarning

        def record(message, category, filename, lineno, file=None, line=None):
            if "synchroniz" in str(message):
                sites[call_site(traceback.extract_stack())] += 1
            else:
                previous(message, category, filename, lineno, file, line)
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
            warnings.showwarning = previous
    torch.cuda.synchronize()
    return sites


def report(name: str, sites: collections.Counter) -> None:
    print(f"\n### {name}: {sum(sites.values())} synchronising calls\n", flush=True)
    for site, n in sites.most_common():
        print(f"- {n} x {site}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="d16@256", help="d16@256, d30@256 or d30@1024")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--text", choices=("clip", "random"), default="clip")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("find_syncs.py needs a CUDA GPU (synchronisation exists only there).")
    dev = torch.device("cuda")
    size, res = args.config.split("@")
    pn = {"256": bg.P256, "1024": bg.P1024}[res]
    workdir = tempfile.mkdtemp(prefix="find_syncs_")  # the text tower is saved here (~0.7 GB for CLIP)
    try:
        text, _ = bg.build_text_encoder(args.text, False, dev, workdir)
        tok = bg.build_tokenizer(False, pn, dev)
        gen = bg.build_generator(size, False, pn, tok, text, dev)
        side = 16 * pn[-1]
        if not args.skip_train:
            gen.train()
            opt = gen.configure_optimizers()["optimizer"]
            params = [p for g in opt.param_groups for p in g["params"]]
            data = bg.make_batch(args.batch, side, dev)

            def step():
                with bg.autocast(dev):
                    loss = gen._loss(data, "train")
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 2.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                step()  # warm-up: lazy initialisations are not per-step costs
            report(f"training step {args.config} batch {args.batch}", syncs_of(step))
            del opt, params
        gen.eval()
        stable = bg.stable_sampler_for(gen, dev)
        for sampler_name, sampler in (("parallel", None), ("stable", stable)):
            for graphs in (False, True):
                def call():
                    with torch.no_grad():
                        gen.generate(["a red circle"], seed=0, sampler=sampler, cuda_graphs=graphs, **bg.SAMPLING)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    call()
                report(f"generate {args.config} batch 1, {sampler_name}, cuda_graphs={graphs}", syncs_of(call))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
