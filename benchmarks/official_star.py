"""Latency of the OFFICIAL STAR-T2I code (random weights, real architecture), for ratios
against starkit measured in the same run. The official code is imported at run time from the
checkout given by ``--official-root``; none of it lives in this repository.

    python benchmarks/official_star.py --official-root .official/STAR \\
        --configs d16@256,d30@512,d30@1024 --batches 1,16 --repeats 5 --json $OUT/official_star.json
    python benchmarks/official_star.py --official-root /path/to/STAR --tiny      # CPU smoke run (~1 min)

What runs is sample.py's path: ``build_vae_var(...)`` with sample.py's arguments (attn_l2_norm,
RoPE theta 10000 / norm 64, level embedding, logit norm, ``flash_if_available=False``: attention
is F.scaled_dot_product_attention), ``Text_Model.extract_text_features(prompts + [""] * B)``
(fp32 CLIP, outside autocast), ``var.autoregressive_infer_cfg(..., more_smooth=False, w_mask=True,
sample_version='1024')`` under ``torch.autocast('cuda', float16)`` in ``no_grad`` +
``inference_mode``: all scales with the official KV cache and CFG on 2B rows, then the fp32
VQVAE decode. sample.py's sampling defaults: cfg 4.5, top_k 600, top_p 0.8, seed 1 (README's
MJHQ eval: cfg 4.0, top_k 4096; demo_gradio.py: cfg 4.0, top_k 600). sampler "parallel" is
sample.py (``enable_adaptive_norm=False``, so w_mask is a no-op); "stable" builds the official
sampler head (``enable_adaptive_norm=True``, ``sample_from_idx=9``, as demo_gradio.py and
train_sampler.py): scales 9-12 are drawn in 8 steps (5 from the main logits, 3 through the head:
3 cross-attention-free blocks over 1 + pn^2 tokens, no cache), scale 13 (1024 only) in 15 head steps.

Identical to the official run: model code and arguments, dtypes (fp32 weights re-cast to fp16 by
autocast on every call; fp32 CLIP, logits, sampling, RoPE and VQVAE decode), KV cache, CFG,
samplers, host-side Python. Not identical (each marked PATCH in the code):
  * random weights: VAR's ``init_weights`` as build_vae_var runs it; the VQVAE, which
    build_vae_var leaves uninitialised (it no-ops reset_parameters process-wide; restored here),
    gets PyTorch's default init instead of VAE.pth;
  * CLIP: a random CLIPTextModel of SD-2.1's size instead of ``from_pretrained``, fed by a stub
    tokenizer inside the official Text_Model (BOS, one id per word, EOS, pad 0: (2B, 77) ids and
    mask) since the BPE files cannot be had offline, so host tokenisation is not timed;
  * import-only modules that are not installed are empty stubs while the official code is
    imported (none is installed here): ``timm`` (models/embed_rope.py, names never used),
    ``torchvision`` (models/text_encoder.py, unused), ``ftfy``/``bs4`` (models/t5_embedder.py,
    T5 only). The GPU machine needs no extra wheel;
  * prompts: sample.py's eight defaults, repeated to the batch. TF32 stays off for matmuls as in
    sample.py (``--tf32`` turns it on, as demo_gradio.py and the eval scripts do).
Timing: host clock around CUDA-synchronised ``generate`` calls, ``--warmup`` (2) untimed first,
median of ``--repeats``; peak GiB = max_memory_allocated during a batch's calls, weights included.
Markdown table printed last; ``--json`` writes every number (``--count-syncs``: host syncs/call).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.machinery
import importlib.util
import io
import json
import os
import statistics
import subprocess
import sys
import time
import types
import warnings

import torch
import torch.nn as nn

P256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
P512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
P1024 = (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)  # sample.py's default patch_nums
CONFIGS = {"d16@256": (16, P256), "d30@512": (30, P512), "d30@1024": (30, P1024)}
# tiny: depth 3 (width = 64 * depth in build_vae_var; the sampler head indexes 3 drop-path rates),
# >= 10 scales so that sample_from_idx=9 exists
TINY = {"d16@256": (3, tuple(range(1, 11))), "d30@512": (3, tuple(range(1, 11))), "d30@1024": (3, tuple(range(1, 15)))}
SD21_CLIP = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                 max_position_embeddings=77, vocab_size=49408, hidden_act="gelu")
TINY_CLIP = dict(SD21_CLIP, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
SAMPLE_PY = dict(cfg=4.5, top_k=600, top_p=0.8, seed=1)
PROMPTS = ["A red car.", "A cute dog.", "A banana in a plate.", "A giraffe.", "A red car and a white sheep.",
           "A blue bird on a tree.", "A green apple on the table.", "A green cup and a blue cell phone."]
STUBS = {"timm": ["timm", "timm.models", "timm.models.vision_transformer", "timm.models.layers",
                  "timm.models.registry"], "torchvision": ["torchvision"], "ftfy": ["ftfy"], "bs4": ["bs4"]}
# the classes whose reset_parameters build_vae_var replaces by a no-op, process-wide
NO_INIT = (nn.Linear, nn.LayerNorm, nn.BatchNorm2d, nn.SyncBatchNorm, nn.Conv1d, nn.Conv2d,
           nn.ConvTranspose1d, nn.ConvTranspose2d)


def _stub_attr(attr: str) -> None:
    if attr.startswith("__"):
        raise AttributeError(attr)
    return None  # a name bound by e.g. `from timm.models.layers import DropPath`, never used


def import_official(root: str):
    """(dist module, build_vae_var, Text_Model, names of stubbed modules) from the checkout at ``root``."""
    root = os.path.abspath(root)
    for name in ("models", "utils", "dist"):  # generic top-level names of the official code
        mod = sys.modules.get(name)
        where = getattr(mod, "__file__", None) or next(iter(getattr(mod, "__path__", [])), "")
        if mod is not None and not str(where).startswith(root):
            raise RuntimeError(f"a module named {name!r} not from {root} is already imported")
    from transformers import CLIPTextModel, T5EncoderModel  # noqa: F401  (resolved before any stub exists)
    stubs = []  # PATCH: empty modules for import-only dependencies that are not installed
    for top, names in STUBS.items():
        if importlib.util.find_spec(top) is None:
            for name in names:
                sys.modules[name] = mod = types.ModuleType(name)
                mod.__spec__ = importlib.machinery.ModuleSpec(name, None)  # transformers calls find_spec()
                mod.__getattr__ = _stub_attr
                stubs.append(name)
    if root not in sys.path:
        sys.path.insert(0, root)
    try:
        import dist  # noqa: F401  (the official dist.py: holds the device VAR puts its buffers on)
        import models
        from models.text_encoder import Text_Model
    finally:
        for name in stubs:  # the official modules keep their references; nothing else sees the stubs
            sys.modules.pop(name, None)
    assert os.path.abspath(models.__file__).startswith(root), models.__file__
    return dist, models.build_vae_var, Text_Model, stubs


class FixedIdsTokenizer:
    """PATCH: stands in for CLIPTokenizer inside the official Text_Model (same call, same output
    keys and shapes): BOS, one id per word, EOS, then pad id 0 ("!", SD-2.1's pad) up to 77."""
    model_max_length = 77

    def __call__(self, prompts: list, padding="max_length", max_length: int = 77, truncation=True,
                 return_tensors="pt"):
        from transformers import BatchEncoding
        ids = torch.zeros(len(prompts), max_length, dtype=torch.long)  # (n, 77)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            row = [49406] + [300 + sum(map(ord, w)) % 40000 for w in p.split()][: max_length - 2] + [49407]
            ids[i, :len(row)] = torch.tensor(row)
            mask[i, :len(row)] = 1
        return BatchEncoding({"input_ids": ids, "attention_mask": mask})


class OfficialSTAR:
    """The official VAR + VQVAE + Text_Model; ``generate`` is sample.py's inner loop."""

    def __init__(self, var, vae, text, device: torch.device, dtype: torch.dtype, sampling: dict, info: dict):
        self.var, self.vae, self.text, self.device, self.dtype = var, vae, text, device, dtype
        self.sampling, self.info = sampling, info

    def generate(self, batch_size: int, seed: int = 1) -> torch.Tensor:
        """(B, 3, H, W) images in [0, 1], end to end (text encoder, all scales, VQVAE decode)."""
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch_size)]
        with torch.no_grad(), torch.inference_mode():
            # (2B, 77, C_text) fp32, (2B, 77) int64, (2B, C_text) fp32: conditional rows then B empty prompts
            emb, mask, pooled = self.text.extract_text_features(prompts + [""] * batch_size)
            with torch.autocast("cuda", enabled=self.device.type == "cuda", dtype=self.dtype, cache_enabled=True):
                return self.var.autoregressive_infer_cfg(
                    B=batch_size, label_B=None, encoder_hidden_states=emb, encoder_attention_mask=mask,
                    encoder_pool_feat=pooled, cfg=self.sampling["cfg"], top_k=self.sampling["top_k"],
                    top_p=self.sampling["top_p"], g_seed=seed, more_smooth=False, w_mask=True,
                    sample_version="1024")


def build_official(official_root: str, config: str, device="cuda", dtype: torch.dtype = torch.float16,
                   sampler: str = "parallel", tiny: bool = False, sampling: dict | None = None,
                   verbose: bool = False) -> OfficialSTAR:
    """Build ``config`` ("d16@256", "d30@512", "d30@1024") with random weights; ``sampler`` is
    "parallel" (sample.py) or "stable" (enable_adaptive_norm=True, the official sampler head)."""
    dist, build_vae_var, Text_Model, stubs = import_official(official_root)
    device = torch.device(device)
    setattr(dist, "__device", str(device))  # PATCH: VAR places buffers + its Generator on dist.get_device()
    depth, patch_nums = (TINY if tiny else CONFIGS)[config]
    clip_cfg = TINY_CLIP if tiny else SD21_CLIP
    sampling = dict(SAMPLE_PY if sampling is None else sampling)
    torch.manual_seed(sampling.get("seed", 1))
    saved = {c: c.__dict__.get("reset_parameters") for c in NO_INIT}
    try:
        with contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO()):
            vae, var = build_vae_var(  # sample.py's arguments; in_dim_cross = CLIP width (1024)
                V=4096, Cvae=32, ch=32 if tiny else 160, share_quant_resi=4, device=device,
                patch_nums=patch_nums, depth=depth, shared_aln=False, attn_l2_norm=True, enable_cross=True,
                in_dim_cross=clip_cfg["hidden_size"], flash_if_available=False, fused_if_available=True,
                init_adaln=0.5, init_adaln_gamma=5e-5, init_head=0.02, init_std=-1, rope_emb=True, lvl_emb=True,
                enable_logit_norm=True, enable_adaptive_norm=sampler == "stable", train_mode="none",
                rope_theta=10000, rope_norm=64.0, sample_from_idx=9)
    finally:  # PATCH: undo build_vae_var's process-wide no-op reset_parameters
        for c, f in saved.items():
            if f is None:
                with contextlib.suppress(AttributeError):
                    delattr(c, "reset_parameters")
            else:
                c.reset_parameters = f
    for m in vae.modules():  # PATCH: stand-in for vae.load_state_dict(VAE.pth): default init, not empty memory
        if isinstance(m, NO_INIT):
            m.reset_parameters()
    vae.eval()
    var.eval()
    from transformers import CLIPTextConfig, CLIPTextModel
    text = Text_Model.__new__(Text_Model)  # PATCH: skip __init__ (from_pretrained of SD-2.1's folder)
    nn.Module.__init__(text)  # then set what __init__ would have set for text_encoder='clip'
    text.device, text.text_encoder_name, text.tokenizer = device, "clip", FixedIdsTokenizer()
    with torch.device(device):
        text.text_encoder = CLIPTextModel(CLIPTextConfig(**clip_cfg)).eval().requires_grad_(False)  # fp32
    info = dict(config=config, sampler=sampler, tiny=tiny, depth=depth, width=var.C, patch_nums=list(patch_nums),
                tokens=var.L, var_params_M=sum(p.numel() for p in var.parameters()) / 1e6,
                fused_mlp_blocks=sum(b.ffn.fused_mlp_func is not None for b in var.blocks),
                stubbed_modules=stubs, dtype=str(dtype), sampling=sampling)
    return OfficialSTAR(var, vae, text, device, dtype, sampling, info)


def time_calls(fn, warmup: int, repeats: int, dev: torch.device) -> list:
    """Host-clock seconds of synchronised calls, after ``warmup`` untimed ones."""
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    times = []
    for i in range(warmup + repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return times


def count_syncs(fn) -> int:
    """Device->host synchronisations in one call (CUDA sync debug mode)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def bench(model: OfficialSTAR, batch: int, args) -> dict:
    dev, out = model.device, {}
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)  # the peak then includes the weights, as in bench_generator.py

    def call():
        out["img"] = model.generate(batch, seed=args.seed)

    times = time_calls(call, args.warmup, args.repeats, dev)
    img = out.pop("img")
    t = statistics.median(times)
    return dict(model.info, batch=batch, latency_s_median=t, latency_s_all=times, s_per_image=t / batch,
                peak_gib=torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
                image_shape=list(img.shape), image_finite=bool(torch.isfinite(img).all()),
                host_syncs_per_call=count_syncs(call) if args.count_syncs and dev.type == "cuda" else None)


def fmt_table(rows: list, device_name: str) -> str:
    lines = [f"### Official STAR generation ({device_name})", "",
             "| config | sampler | batch | median s/call | s/image | peak GiB |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | {r['sampler']} | {r['batch']} | {r['error']} | | |")
            continue
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "n/a"
        lines.append(f"| {r['config']} | {r['sampler']} | {r['batch']} | {r['latency_s_median']:.3f} | "
                     f"{r['s_per_image']:.4f} | {peak} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official-root", required=True, help="checkout of the official STAR code")
    ap.add_argument("--configs", default="d16@256,d30@512,d30@1024")
    ap.add_argument("--samplers", default="parallel,stable")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"], help="autocast dtype")
    for flag, typ in (("--cfg", float), ("--top-k", int), ("--top-p", float), ("--seed", int)):
        ap.add_argument(flag, type=typ, default=SAMPLE_PY[flag[2:].replace("-", "_")], help="default: sample.py's")
    ap.add_argument("--tf32", action="store_true", help="TF32 matmul/conv as demo_gradio.py (sample.py: off)")
    ap.add_argument("--count-syncs", action="store_true", help="one extra call in CUDA sync-debug mode")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: depth 3, tiny CLIP, batches <= 2, 1 thread")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None)
    ap.add_argument("--verbose", action="store_true", help="show the official constructors' prints")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    batches = [int(b) for b in args.batches.split(",") if b]
    if args.tiny:
        batches = sorted({min(b, 2) for b in batches})
        args.warmup, args.repeats = min(args.warmup, 1), min(args.repeats, 2)
        torch.set_num_threads(1)  # tiny ops gain nothing from threads, and lose a lot on a shared CPU
    if args.tf32:  # else PyTorch's defaults, as sample.py: matmul TF32 off, cuDNN conv TF32 on
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    sampling = dict(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    dtype = getattr(torch, args.dtype)
    rows = []
    for config in [c for c in args.configs.split(",") if c]:
        for sampler in [s for s in args.samplers.split(",") if s]:
            t0 = time.perf_counter()
            model = build_official(args.official_root, config, dev, dtype, sampler, args.tiny, sampling, args.verbose)
            print(f"built official {config} {sampler} in {time.perf_counter() - t0:.1f} s: "
                  f"{model.info['var_params_M']:.0f} M params, {model.info['tokens']} tokens", flush=True)
            for b in batches:
                try:
                    rows.append(bench(model, b, args))
                    r = rows[-1]
                    print(f"official {config} {sampler} b{b}: {r['latency_s_median']:.3f} s/call, "
                          f"{r['s_per_image']:.4f} s/image, image {tuple(r['image_shape'])}", flush=True)
                except torch.OutOfMemoryError as err:
                    rows.append(dict(config=config, sampler=sampler, batch=b, error=f"OOM: {str(err)[:120]}"))
                    print(f"official {config} {sampler} b{b}: OOM", flush=True)
                    for blk in model.var.blocks:  # drop the KV cache the failed call left behind
                        blk.attn.kv_caching(False)
            del model
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    root = os.path.abspath(args.official_root)
    commit = None
    if os.path.exists(os.path.join(root, ".git")):
        with contextlib.suppress(OSError):
            commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    meta = dict(device=name, torch=torch.__version__, official_root=root, official_commit=commit or None,
                tf32=args.tf32, warmup=args.warmup, repeats=args.repeats, argv=sys.argv[1:])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(fmt_table(rows, name))


if __name__ == "__main__":
    main()
