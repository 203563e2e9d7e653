"""Benchmark of starkit's STAR generator: training-step throughput and end-to-end generation
latency of the real architectures with random weights (no downloads, no jsonargparse).

    python benchmarks/bench_generator.py --out $OUT/bench_generator.json          # H200: d16 + d30 @256
    python benchmarks/bench_generator.py --include-512 --lightning --out $OUT/b.json
    python benchmarks/bench_generator.py --tiny                                    # CPU smoke run (< 2 min)

What is built (random init, nothing pretrained):
  * ScaleWiseGenerator d16 (width 1024) / d30 (width 1920) @256, patch_nums 1..16 (680 tokens);
    d30 @512 (1..32, 2240 tokens) with ``--include-512`` (generation only).
  * MultiScaleVQ of VAR's size (ch 160, ch_mult 1,1,2,2,4, 2 res blocks, z 32, V 4096).
  * A CLIP text tower of SD-2.1's size (1024 wide, 23 layers, 16 heads, 77 tokens) written
    with ``save_pretrained`` to a temp folder with a word-level fast tokenizer (the real CLIP BPE
    needs vocab.json/merges.txt, which cannot be had offline) and loaded through
    ``HFTextEncoder(kind="clip", dtype="bfloat16")``, as the recipes do. ``--text random``
    uses ``RandomTextEncoder(dim=1024, max_length=77)`` instead.

Training step (per size): what Lightning's ``bf16-mixed`` + ``gradient_clip_val: 2.0`` does,
written out: ``autocast(bf16){ loss = module._loss(batch, "train") }`` (VQ encode of the images
and CLIP encode of the captions happen inside, as in the recipes), ``backward``,
``clip_grad_norm_(2.0)``, fused AdamW ``step``, ``zero_grad``. Images live on the GPU already
(the H2D copy is the data loader's job). Step times are CUDA-event intervals between
consecutive step boundaries with no synchronisation in between (host run-ahead as in real
training); median over ``--steps`` after ``--warmup``. ``--lightning`` also times a real
``Trainer.fit`` (bf16-mixed, clip 2.0, synthetic data through a DataLoader). Generation:
``generator.generate(prompts, cfg=4.0, top_k=600, top_p=0.8, seed=0)`` end to end (text
encoding, 10 scales with KV cache and CFG, VQ decode), host clock around a synchronised call.

FLOPs are analytic (benchmarks/flops.py): training 3 x forward, generation = one forward over
the 2B guided rows; MFU against 789 TFLOP/s (measured bf16 matmul rate of the H200). The
markdown table is printed last; ``--out`` writes every number as JSON.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
from flops import (H200_BF16_PEAK, P256, P512, GeneratorArch, check_against_flop_counter,  # noqa: E402
                   describe, generate_flops, train_step_flops)

CAPTIONS = [
    "a photograph of an astronaut riding a horse on the moon, high detail",
    "a red circle above two small blue squares on a white background",
    "an oil painting of a lighthouse at sunset with waves crashing against the rocks",
    "a close-up photo of a cat wearing sunglasses, studio lighting",
    "a bowl of ramen with a soft boiled egg and green onions, overhead shot",
    "a futuristic city skyline at night with flying cars and neon lights",
    "a watercolor illustration of a fox sleeping under a tree in autumn",
    "three yellow triangles and a purple star",
]

# real sizes; tiny stand-ins for the CPU smoke run
REAL_TOKENIZER = dict(ch=160, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=32, codebook_size=4096)
TINY_TOKENIZER = dict(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, z_channels=8, codebook_size=16, using_sa=False)
TINY_SIZES = {"d16": dict(depth=2, width=32, num_heads=2), "d30": dict(depth=3, width=48, num_heads=3)}
TINY_P256, TINY_P512 = (1, 2, 3, 4), (1, 2, 3, 4, 6, 8)
P1024 = (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)
SD21_CLIP = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                 max_position_embeddings=77, vocab_size=49408, hidden_act="gelu")
TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 max_position_embeddings=77, vocab_size=49408, hidden_act="gelu")
GIB = 2 ** 30
SAMPLING = dict(cfg=4.0, top_k=600, top_p=0.8)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def is_oom(err: BaseException) -> bool:
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("out of memory" in text or "CUBLAS_STATUS_ALLOC_FAILED" in text)


def free_memory(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def peak_gib(dev: torch.device):
    return torch.cuda.max_memory_allocated(dev) / GIB if dev.type == "cuda" else None


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def autocast(dev: torch.device):
    """bf16 autocast on CUDA exactly as Lightning's bf16-mixed sets it (cache_enabled=False);
    plain float32 on CPU (as the kit does)."""
    if dev.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()


def profile_to_file(fn, path: str, dev: torch.device, calls: int = 2) -> None:
    """torch.profiler over ``calls`` calls of ``fn``; the top kernels/ops by device time to ``path``."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    sync(dev)
    with profile(activities=acts) as prof:
        for _ in range(calls):
            fn()
        sync(dev)
    key = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
    with open(path, "w") as fh:
        fh.write(f"# {calls} calls\n")
        fh.write(prof.key_averages().table(sort_by=key, row_limit=40, max_name_column_width=70))
        fh.write("\n\n# by self CPU time (host overhead)\n")
        fh.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70))
    log(f"profile written to {path}")


# ---------------------------------------------------------------------------------------- text encoder
def write_word_level_tokenizer(directory: str, max_length: int = 77) -> None:
    """A word-level fast tokenizer with CLIP's special-token ids (start 49406, end 49407, pad "!" = 0),
    lower-casing and whitespace/punctuation splitting, padded to ``max_length`` by HFTextEncoder."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for c in CAPTIONS for w in c.lower().replace(",", " , ").split()}
                   | {"a", "an", "the", "of", "on", "in", "with", "and", "photo", "painting", "."})
    vocab = {"!": 0, "<unk>": 1}
    vocab.update({w: i + 2 for i, w in enumerate(w for w in words if w not in vocab)})
    vocab.update({"<|startoftext|>": 49406, "<|endoftext|>": 49407})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", 49406), ("<|endoftext|>", 49407)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<unk>", pad_token="!", model_max_length=max_length)
    fast.save_pretrained(directory)


def build_text_encoder(kind: str, tiny: bool, dev: torch.device, workdir: str):
    from starkit.text import HFTextEncoder, RandomTextEncoder
    if kind == "random":
        dim = 32 if tiny else 1024
        return RandomTextEncoder(dim=dim, vocab_size=49408, max_length=77).to(dev), {"text": "random", "dim": dim}
    from transformers import CLIPTextConfig, CLIPTextModel
    cfg = CLIPTextConfig(**(TINY_CLIP if tiny else SD21_CLIP))
    folder = os.path.join(workdir, "clip_text")
    torch.manual_seed(0)
    with torch.device(dev):  # random init on the GPU: seconds instead of a minute on the host
        model = CLIPTextModel(cfg)
    model.to(torch.bfloat16).save_pretrained(folder)
    n_params = sum(p.numel() for p in model.parameters())
    del model
    write_word_level_tokenizer(folder)
    enc = HFTextEncoder(folder, kind="clip", dtype="bfloat16").to(dev)
    return enc, {"text": "clip (random init, SD-2.1 size)" if not tiny else "clip (tiny)", "params": n_params,
                 "dim": enc.dim, "max_length": enc.max_length, "tokenizer": "word-level (offline stand-in for BPE)"}


# ---------------------------------------------------------------------------------------- models
def build_tokenizer(tiny: bool, patch_nums, dev: torch.device):
    from starkit.tokenizers import MultiScaleVQ
    torch.manual_seed(0)
    with torch.device(dev):
        tok = MultiScaleVQ(**(TINY_TOKENIZER if tiny else REAL_TOKENIZER), patch_nums=patch_nums, frozen=True)
    return tok.to(dev)


def build_generator(size: str, tiny: bool, patch_nums, tok, text, dev: torch.device):
    from starkit.generator import ScaleWiseGenerator
    from starkit.samplers import ParallelSampler
    torch.manual_seed(0)
    arch = dict(TINY_SIZES[size]) if tiny else dict(size=size)
    with torch.device(dev):
        gen = ScaleWiseGenerator(tokenizer=tok, text_encoder=text, sampler=ParallelSampler(**SAMPLING),
                                 patch_nums=list(patch_nums), **arch)
    return gen.to(dev)


def make_batch(batch: int, side: int, dev: torch.device, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    images = (torch.rand(batch, 3, side, side, generator=g) * 2 - 1).to(dev)  # never zeros
    return {"image": images, "caption": [CAPTIONS[i % len(CAPTIONS)] for i in range(batch)]}


def tiny_transformer():
    """The tiny ScaleTransformer of tests/conftest.py (CPU), for the FLOP-counter check."""
    from starkit.generator import ScaleTransformer
    from starkit.positional import NormalizedRoPE2D
    torch.manual_seed(0)
    return ScaleTransformer(TINY_P256, 16, 8, 32, depth=2, width=32, num_heads=2,
                            positional=NormalizedRoPE2D(32, 2, TINY_P256)).eval()


# ---------------------------------------------------------------------------------------- timing
def time_steps(fn, warmup: int, steps: int, dev: torch.device):
    """Per-step seconds of ``fn`` (list) and the wall seconds of the whole timed run."""
    for _ in range(warmup):
        fn()
    sync(dev)
    t0 = time.perf_counter()
    if dev.type == "cuda":
        events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
        events[0].record()
        for i in range(steps):
            fn()
            events[i + 1].record()
        torch.cuda.synchronize(dev)
        times = [events[i].elapsed_time(events[i + 1]) / 1000 for i in range(steps)]
    else:
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return times, time.perf_counter() - t0


def time_calls(fn, warmup: int, repeats: int, dev: torch.device):
    """Host-clock seconds of synchronised calls (end-to-end latency, host work included)."""
    for _ in range(warmup):
        fn()
        sync(dev)
    times = []
    for _ in range(repeats):
        sync(dev)
        t = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t)
    return times


# ---------------------------------------------------------------------------------------- training
def bench_train(gen, name: str, batch: int, side: int, args, dev: torch.device) -> dict:
    arch = GeneratorArch.from_transformer(gen.transformer, text_len=gen.text_encoder.max_length)
    row = {"config": name, "kind": "train", "batch": batch, "arch": describe(arch),
           "flops_per_step": train_step_flops(arch, batch)}
    gen.train()
    opt = gen.configure_optimizers()["optimizer"]
    params = [p for group in opt.param_groups for p in group["params"]]
    row["optimizer"] = {"type": type(opt).__name__, "fused": bool(opt.defaults.get("fused")),
                        "trained_params": sum(p.numel() for p in params)}
    data = make_batch(batch, side, dev)
    step_batch = data
    if getattr(args, "pretokenized", False):  # what starkit.data.TokenizedDataModule feeds: no VQ encode in the step
        with torch.no_grad(), autocast(dev):
            step_batch = {"indices": torch.cat(gen.tokenizer.encode(data["image"]), dim=1), "caption": data["caption"]}
        row["pretokenized"] = True

    def step():
        with autocast(dev):
            loss = gen._loss(step_batch, "train")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 2.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    free_memory(dev)
    times, wall = time_steps(step, args.warmup, args.steps, dev)
    t = statistics.median(times)
    row.update(step_s_median=t, step_s_min=min(times), step_s_max=max(times), step_s_mean_wall=wall / args.steps,
               step_s_all=times, images_per_s=batch / t, tokens_per_s=batch * arch.seq_len / t,
               tflops=row["flops_per_step"] / t / 1e12, peak_gib=peak_gib(dev))
    row["mfu_pct"] = 100 * row["flops_per_step"] / t / H200_BF16_PEAK if dev.type == "cuda" else None

    # share of the step spent outside the transformer: VQ encode, text encode, teacher-forcing inputs
    captions = list(data["caption"])
    with torch.no_grad(), autocast(dev):
        indices = gen.tokenizer.encode(data["image"])

    def vq():
        with torch.no_grad(), autocast(dev):
            gen.tokenizer.encode(data["image"])

    def txt():
        with torch.no_grad(), autocast(dev):
            gen.text_encoder.encode(captions)

    def tf():
        with torch.no_grad(), autocast(dev):
            gen.tokenizer.teacher_forcing_inputs(indices)

    reps = max(3, min(args.steps, 10))
    for key, fn in (("vq_encode_s", vq), ("text_encode_s", txt), ("teacher_forcing_s", tf)):
        row[key] = statistics.median(time_calls(fn, 1, reps, dev))
    if args.profile_dir:
        profile_to_file(step, os.path.join(args.profile_dir, f"profile_{name.replace('@', '_')}_train_b{batch}.txt"), dev)
    row["encode_share_pct"] = 100 * (row["vq_encode_s"] + row["text_encode_s"]) / t
    row["teacher_forcing_share_pct"] = 100 * row["teacher_forcing_s"] / t
    del opt, params, data, indices
    for p in gen.parameters():
        p.grad = None
    return row


def step_timer(cuda: bool):
    """A Lightning callback that stamps the end of every training batch (CUDA events, else the
    host clock); ``.step_times(skip)`` gives the per-step seconds after ``skip`` warm-up steps."""
    import lightning as L

    class StepTimer(L.Callback):
        def __init__(self):
            self.events, self.host = [], []

        def on_train_batch_end(self, trainer, pl_module, outputs, b, batch_idx):
            self.host.append(time.perf_counter())
            if cuda:
                e = torch.cuda.Event(enable_timing=True)
                e.record()
                self.events.append(e)

        def step_times(self, skip: int) -> list:
            if cuda:
                torch.cuda.synchronize()
                return [self.events[i].elapsed_time(self.events[i + 1]) / 1000
                        for i in range(skip, len(self.events) - 1)]
            return [self.host[i + 1] - self.host[i] for i in range(skip, len(self.host) - 1)]

    return StepTimer()


def bench_train_lightning(gen, name: str, batch: int, side: int, args, dev: torch.device) -> dict:
    """The same step through a real ``Trainer.fit`` (bf16-mixed, clip 2.0, DataLoader), as the
    recipes configure it."""
    import lightning as L

    arch = GeneratorArch.from_transformer(gen.transformer, text_len=gen.text_encoder.max_length)
    g = torch.Generator().manual_seed(0)
    pool = torch.rand(8, 3, side, side, generator=g) * 2 - 1

    class Synthetic(torch.utils.data.Dataset):
        def __len__(self):
            return batch * (args.warmup + args.steps + 1)

        def __getitem__(self, i):
            return {"image": pool[i % len(pool)], "caption": CAPTIONS[i % len(CAPTIONS)]}

    cuda = dev.type == "cuda"
    workers = min(4, os.cpu_count() or 1) if cuda else 0
    loader = torch.utils.data.DataLoader(Synthetic(), batch_size=batch, num_workers=workers, pin_memory=cuda,
                                         persistent_workers=workers > 0, drop_last=True)

    timer = step_timer(cuda)
    trainer = L.Trainer(accelerator="gpu" if cuda else "cpu", devices=1, precision="bf16-mixed" if cuda else "32-true",
                        gradient_clip_val=2.0, max_steps=args.warmup + args.steps + 1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, callbacks=[timer])
    free_memory(dev)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(gen, train_dataloaders=loader)
    finally:
        gen._trainer = None
        for p in gen.parameters():
            p.grad = None
        gen.to(dev)  # Lightning's teardown moved the module (and the shared tokenizer / text tower) to the CPU
    times = timer.step_times(args.warmup)  # `steps` intervals after the warm-up
    t = statistics.median(times)
    flops = train_step_flops(arch, batch)
    row = {"config": name, "kind": "train_lightning", "batch": batch, "flops_per_step": flops, "step_s_median": t,
           "step_s_all": times, "images_per_s": batch / t, "tflops": flops / t / 1e12, "peak_gib": peak_gib(dev),
           "mfu_pct": 100 * flops / t / H200_BF16_PEAK if cuda else None, "dataloader_workers": workers}
    del trainer, loader
    return row


# ---------------------------------------------------------------------------------------- generation
def bench_generate(gen, name: str, batch: int, args, dev: torch.device, sampler=None) -> dict:
    arch = GeneratorArch.from_transformer(gen.transformer, text_len=gen.text_encoder.max_length)
    gen.eval()
    prompts = [CAPTIONS[i % len(CAPTIONS)] for i in range(batch)]
    flops = generate_flops(arch, batch, guided=SAMPLING["cfg"] > 0)
    row = {"config": name, "kind": "generate", "batch": batch, "flops_per_call": flops, "sampling": SAMPLING,
           "arch": describe(arch)}
    out = {}

    def call():
        out["images"] = gen.generate(prompts, seed=0, sampler=sampler, **SAMPLING)

    free_memory(dev)
    times = time_calls(call, args.gen_warmup, args.gen_repeats, dev)
    t = statistics.median(times)
    if args.profile_dir:
        profile_to_file(call, os.path.join(args.profile_dir, f"profile_{name.replace('@', '_')}_generate_b{batch}.txt"), dev, calls=1)
    images = out.pop("images")
    row.update(latency_s_median=t, latency_s_min=min(times), latency_s_all=times, s_per_image=t / batch,
               images_per_s=batch / t, tflops=flops / t / 1e12, peak_gib=peak_gib(dev),
               image_shape=list(images.shape), image_finite=bool(torch.isfinite(images).all()))
    row["mfu_pct"] = 100 * flops / t / H200_BF16_PEAK if dev.type == "cuda" else None
    return row


def stable_sampler_for(gen, dev):
    """A StableSampler with a (random, marked trained) head sized for ``gen``: timing only."""
    from starkit.samplers import StableSampler
    tr = gen.transformer
    sampler = StableSampler(**SAMPLING)
    sampler.build(tr.width, gen.text_encoder.dim, gen.tokenizer.embed_dim, gen.tokenizer.codebook_size,
                  tr.num_heads, gen.patch_nums)
    sampler.head_trained.fill_(1)
    return sampler.to(dev).eval()


def run_1024(gen, name: str, side: int, args, dev: torch.device, rows: list) -> None:
    """d30 @1024: training step with token dropping + activation checkpointing at the largest
    batch that fits (halving from --batch-1024), then generation with both samplers."""
    if args.only in (None, "train"):
        gen.hparams.token_drop = 651 if not args.tiny else 4
        gen.transformer.activation_checkpointing = True
        if args.search_batch_1024:  # increasing batches until one does not fit: the largest that does is kept
            batches = [min(int(b), 2) if args.tiny else int(b) for b in args.search_batch_1024.split(",") if b]
            rows += search_batches(name + " drop+ckpt", batches,
                                   lambda B: bench_train(gen, name + " drop+ckpt", B, side, args, dev), dev, gen)
        B = 2 if args.tiny else args.batch_1024
        while B >= 1 and not args.search_batch_1024:
            run_guarded(lambda: bench_train(gen, name + " drop+ckpt", B, side, args, dev), rows,
                        name + " drop+ckpt", "train", B, dev, gen)
            if "error" not in rows[-1]:
                break
            B //= 2
        gen.hparams.token_drop = 0
        gen.transformer.activation_checkpointing = False
    if args.only in (None, "generate"):
        gen_batches = [int(b) for b in args.gen_batches.split(",") if b]
        if args.tiny:
            gen_batches = [min(b, 2) for b in gen_batches]
        stable = stable_sampler_for(gen, dev)
        for B in gen_batches:
            run_guarded(lambda: bench_generate(gen, name + " parallel", B, args, dev), rows, name, "generate", B, dev)
            run_guarded(lambda: bench_generate(gen, name + " stable", B, args, dev, sampler=stable), rows, name,
                        "generate", B, dev)


# ---------------------------------------------------------------------------------------- driver
def run_guarded(fn, rows: list, name: str, kind: str, batch: int, dev: torch.device, gen=None) -> None:
    """Run one configuration; a CUDA OOM becomes an "OOM" row instead of a crash."""
    error = None
    try:
        rows.append(fn())
        r = rows[-1]
        if "error" not in r:
            log(f"{name} {kind} b{batch}: " + ", ".join(
                f"{k}={v:.4g}" for k, v in r.items() if isinstance(v, float) and not k.startswith("flops")))
    except Exception as err:  # noqa: BLE001
        if not is_oom(err):
            raise
        error = f"OOM: {str(err).splitlines()[0][:200]}"
    if gen is not None:  # after an OOM: drop partial gradients, bring everything back on the device
        for p in gen.parameters():
            p.grad = None
        gen.to(dev)
    if error is not None:  # outside the except block: the traceback no longer pins the tensors
        rows.append({"config": name, "kind": kind, "batch": batch, "error": error})
        log(f"{name} {kind} b{batch}: {error}")
    free_memory(dev)


def device_name(dev: torch.device) -> str:
    """The GPU's name, or "CPU": the device column of the printed tables and JSON files."""
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"


def kernel_bench_parser(doc: str, repeats: int, tiny_help: str = "CPU smoke run on small shapes"):
    """The options of the kernel-level benchmarks (bench_attention, bench_fp8, bench_kernels): ``--tiny``,
    ``--warmup``, ``--repeats``, ``--json``; a script adds its own."""
    import argparse
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help=tiny_help)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=repeats)
    ap.add_argument("--json", default=None)
    return ap


def kernel_bench_device(args, shrink_tiny: bool = True) -> torch.device:
    """The GPU when there is one and ``--tiny`` is not given, else the CPU; ``shrink_tiny``: a ``--tiny`` run
    times 1 warm-up and 2 repeats."""
    if args.tiny and shrink_tiny:
        args.warmup, args.repeats = 1, 2
    return torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")


def write_results(path: str, device_name: str, args, rows: list, **extra) -> None:
    """The JSON file of a benchmark run: date (UTC), device, torch, the arguments, the rows and ``extra``."""
    with open(path, "w") as fh:
        json.dump({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "device": device_name,
                   "torch": torch.__version__, "args": vars(args), "rows": rows, **extra}, fh, indent=1, default=str)


def search_batches(name: str, batches: list, fn, dev: torch.device, gen=None) -> list:
    """Training rows of ``fn(B)`` for increasing ``B`` until one runs out of memory (its OOM row
    included, from :func:`run_guarded`): the last row without an error is the largest batch that fits."""
    rows: list = []
    for B in batches:
        run_guarded(lambda: fn(B), rows, name, "train", B, dev, gen)
        if "error" in rows[-1]:
            break
    return rows


def fmt_table(rows: list, device_name: str) -> str:
    lines = [f"### Generator benchmark ({device_name})", "",
             "| config | batch | ms/step or s/image | images/s | TFLOP/s | MFU % | peak GiB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        label = {"train": "train", "train_lightning": "train (Lightning, recipe)", "generate": "generate"}[r["kind"]]
        cfg = f"{r['config']} {label}"
        if "error" in r:
            what = "OOM" if r["error"].startswith("OOM") else r["error"]
            lines.append(f"| {cfg} | {r['batch']} | {what} | | | | |")
            continue
        if r["kind"].startswith("train"):
            time_col = f"{1000 * r['step_s_median']:.1f} ms/step"
        else:
            time_col = f"{r['s_per_image']:.4f} s/img ({r['latency_s_median']:.3f} s/call)"
        mfu = f"{r['mfu_pct']:.1f}" if r.get("mfu_pct") is not None else "n/a"
        peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "n/a"
        tf = f"{r['tflops']:.1f}" if r["tflops"] >= 1 else f"{r['tflops']:.2g}"
        lines.append(f"| {cfg} | {r['batch']} | {time_col} | {r['images_per_s']:.2f} | {tf} | {mfu} | {peak} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny models, 2 steps")
    ap.add_argument("--only", choices=("train", "generate"), default=None, help="run only one part")
    ap.add_argument("--sizes", default="d16,d30", help="comma-separated generator sizes (d16, d30)")
    ap.add_argument("--steps", type=int, default=10, help="timed training steps per config")
    ap.add_argument("--warmup", type=int, default=3, help="untimed training steps before timing")
    ap.add_argument("--batch-d16", type=int, default=64, help="training batch of d16 @256")
    ap.add_argument("--batch-d30", type=int, default=32, help="training batch of d30 @256")
    ap.add_argument("--gen-batches", default="1,16", help="comma-separated generation batches")
    ap.add_argument("--gen-warmup", type=int, default=2)
    ap.add_argument("--gen-repeats", type=int, default=5)
    ap.add_argument("--include-512", action="store_true", help="also generate with d30 @512 (patch_nums 1..32)")
    ap.add_argument("--include-1024", action="store_true",
                    help="also d30 @1024: training with token dropping (651) + activation checkpointing, and "
                         "generation with the parallel and the stable sampler")
    ap.add_argument("--batch-1024", type=int, default=8, help="training batch of d30 @1024 (halved on OOM)")
    ap.add_argument("--search-batch-1024", default=None,
                    help="comma-separated increasing batches for d30 @1024 training (e.g. 8,12,16,24,32): each is "
                         "timed until one runs out of memory; replaces --batch-1024")
    ap.add_argument("--lightning", action="store_true", help="also time the training step through Trainer.fit")
    ap.add_argument("--text", choices=("clip", "random"), default="clip", help="text tower (random: fallback)")
    ap.add_argument("--compile", action="store_true",
                    help="placeholder: ScaleWiseGenerator has no compile option yet, so this is recorded and ignored")
    ap.add_argument("--profile-dir", default=None, help="write a torch.profiler table per config into this folder")
    ap.add_argument("--no-oom-retry", action="store_true", help="do not retry an OOM training config at half batch")
    ap.add_argument("--out", default=None, help="write all numbers as JSON to this file")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    if args.tiny:
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
        args.gen_warmup, args.gen_repeats = min(args.gen_warmup, 1), min(args.gen_repeats, 2)
        torch.set_num_threads(min(2, torch.get_num_threads()))
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    if args.profile_dir:
        os.makedirs(args.profile_dir, exist_ok=True)
    device_name = torch.cuda.get_device_name(dev) if cuda else f"CPU ({platform.processor() or platform.machine()})"

    import lightning
    import transformers
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    meta = {"device": device_name, "torch": torch.__version__, "cuda": torch.version.cuda,
            "lightning": lightning.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "argv": sys.argv[1:], "args": vars(args), "peak_tflops_reference": H200_BF16_PEAK / 1e12}
    print(f"# bench_generator: {device_name} | torch {torch.__version__} (CUDA {torch.version.cuda}) | "
          f"lightning {lightning.__version__} | transformers {transformers.__version__} | {meta['date']}", flush=True)
    if args.compile:
        meta["compile"] = "requested; ScaleWiseGenerator has no compile option, so nothing was compiled"
        log("--compile: the generator has no compile option yet; the flag is recorded and ignored")
    warnings.filterwarnings("ignore", message=".*self.log.*")  # _loss logs; no Trainer in the manual loop
    warnings.filterwarnings("ignore", message=".*self.trainer.*")

    results = {"meta": meta, "rows": []}
    rows = results["rows"]

    # FLOP-counter sanity check on a tiny transformer (CPU, milliseconds)
    results["flop_check"] = check_against_flop_counter(tiny_transformer(), text_len=16)
    fc = results["flop_check"]
    log(f"FLOP check (tiny, CPU): FlopCounterMode/ours = {fc['ratio_default_vs_ours_without_sdpa']:.4f} (default "
        f"SDPA kernel, attention uncounted), {fc['ratio_math_vs_ours_dense']:.4f} (math SDPA vs dense pairs), "
        f"{fc['ratio_math_vs_ours_block_causal']:.4f} (math SDPA vs block-causal pairs)")

    workdir = tempfile.mkdtemp(prefix="bench_generator_")
    try:
        t0 = time.perf_counter()
        text, text_info = build_text_encoder(args.text, args.tiny, dev, workdir)
        meta["text_encoder"] = text_info
        p256 = TINY_P256 if args.tiny else P256
        p512 = TINY_P512 if args.tiny else P512
        tok = build_tokenizer(args.tiny, p256, dev)
        meta["tokenizer"] = {"params": sum(p.numel() for p in tok.parameters()),
                             **(TINY_TOKENIZER if args.tiny else REAL_TOKENIZER)}
        log(f"text encoder + tokenizer built in {time.perf_counter() - t0:.1f} s: {text_info}")
        train_batch = {"d16": args.batch_d16, "d30": args.batch_d30}
        if args.tiny:
            train_batch = {"d16": 4, "d30": 2}
        gen_batches = [int(b) for b in args.gen_batches.split(",") if b]
        if args.tiny:
            gen_batches = [min(b, 2) for b in gen_batches]
        configs = [(s.strip(), p256, "256") for s in args.sizes.split(",") if s.strip()]
        if args.include_512:
            configs.append(("d30", p512, "512"))
        if args.include_1024:
            configs.append(("d30", TINY_P512 if args.tiny else P1024, "1024"))
        for size, pn, res_name in configs:
            name = f"{size}@{res_name}"
            gen, error = None, None
            try:
                t0 = time.perf_counter()
                gen = build_generator(size, args.tiny, pn, tok, text, dev)
                n = sum(p.numel() for p in gen.transformer.parameters())
                meta.setdefault("generators", {})[name] = {"transformer_params": n}
                log(f"built {name}: transformer {n / 1e6:.1f} M params in {time.perf_counter() - t0:.1f} s")
            except Exception as err:  # noqa: BLE001
                if not is_oom(err):
                    raise
                error = f"OOM while building: {str(err).splitlines()[0][:200]}"
            if error is not None:
                rows.append({"config": name, "kind": "generate", "batch": 0, "error": error})
                free_memory(dev)
                continue
            side = pn[-1] * tok.downsample
            if res_name == "1024":
                run_1024(gen, name, side, args, dev, rows)
                del gen
                free_memory(dev)
                continue
            do_train = args.only in (None, "train") and res_name == "256"
            if do_train:
                B = train_batch[size]
                run_guarded(lambda: bench_train(gen, name, B, side, args, dev), rows, name, "train", B, dev, gen)
                if "error" in rows[-1] and B > 1 and not args.no_oom_retry:
                    B = B // 2
                    log(f"{name}: training OOM; retrying at batch {B}")
                    run_guarded(lambda: bench_train(gen, name, B, side, args, dev), rows, name, "train", B, dev, gen)
                if args.lightning:
                    run_guarded(lambda: bench_train_lightning(gen, name, B, side, args, dev), rows, name,
                                "train_lightning", B, dev, gen)
            if args.only in (None, "generate"):
                for B in gen_batches:
                    run_guarded(lambda: bench_generate(gen, name, B, args, dev), rows, name, "generate", B, dev)
            del gen
            free_memory(dev)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    # one-line notes, then the table last
    for r in rows:
        if r["kind"] == "train" and "error" not in r:
            print(f"- {r['config']} train b{r['batch']}: VQ encode {1000 * r['vq_encode_s']:.1f} ms + text encode "
                  f"{1000 * r['text_encode_s']:.1f} ms = {r['encode_share_pct']:.1f}% of the step; teacher-forcing "
                  f"inputs {r['teacher_forcing_share_pct']:.1f}%; {r['flops_per_step'] / 1e12:.2f} TFLOP/step")
    print(f"- FLOP check (tiny forward, FlopCounterMode / analytic): {fc['ratio_default_vs_ours_without_sdpa']:.4f} "
          f"without attention, {fc['ratio_math_vs_ours_dense']:.4f} dense pairs, "
          f"{fc['ratio_math_vs_ours_block_causal']:.4f} vs block-causal pairs")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1, default=str)
        print(f"- JSON: {args.out}")
    print()
    print(fmt_table(rows, device_name + (" (tiny smoke run)" if args.tiny else "")), flush=True)


if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc()
        sys.exit(1)
