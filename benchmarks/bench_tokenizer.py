"""Benchmark of the multi-scale VQ tokenizer: encode / decode throughput against VAR's own
VQVAE, output agreement, and the training-step throughput.

    python benchmarks/bench_tokenizer.py --official-root .official/VAR          # GPU, VAR-sized
    python benchmarks/bench_tokenizer.py --tiny --official-root /path/to/VAR    # CPU smoke test

Ours runs in bf16 autocast with channels_last on CUDA (fp32 on CPU); VAR's VQVAE runs in
fp32 as its own code does. Timings are medians over ``--repeats`` after ``--warmup`` runs,
synchronised with CUDA events on GPU. The markdown table is printed last.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from starkit.tokenizers import MultiScaleVQ  # noqa: E402

P256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
P1024 = (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)


def timed(fn, warmup: int, repeats: int, device: torch.device) -> float:
    """Median seconds of ``fn()``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def load_official(root: str):
    root = os.path.abspath(root)
    if not os.path.isdir(os.path.join(root, "models")):
        return None
    sys.path.insert(0, root)
    from models.vqvae import VQVAE  # VAR's own code, never part of this repository
    return VQVAE


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official-root", default=".official/VAR", help="checkout of FoundationVision/VAR")
    ap.add_argument("--tiny", action="store_true", help="small model and images (CPU smoke test)")
    ap.add_argument("--weights", default=None, help="optional vae_ch160v4096z32.pth (else random weights)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--variants", default="cl", help="comma list of our variants: cl (bf16 channels_last), "
                    "nchw (bf16 contiguous), compile (bf16 channels_last + torch.compile of encoder/decoder), "
                    "compile_nchw (bf16 contiguous + torch.compile), compile_max (channels_last + "
                    "torch.compile mode max-autotune-no-cudagraphs)")
    ap.add_argument("--resolutions", default="256,1024", help="comma list of the cases to time: 256, 1024")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--json", default=None, help="also write every row as JSON here")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    if args.tiny:
        arch = dict(ch=32, z_channels=8, codebook_size=64)
        cases = [("256 (as 64 px)", (1, 2, 3, 4), 2), ("1024 scales (as 128 px)", (1, 2, 3, 4, 5, 6, 8), 1)]
        train_batch, train_pn = 2, (1, 2, 3, 4)
        args.warmup, args.repeats = min(args.warmup, 1), min(args.repeats, 2)
    else:
        arch = dict(ch=160, z_channels=32, codebook_size=4096)
        cases = [("256", P256, 32), ("1024", P1024, 4)]
        train_batch, train_pn = 16, P256
    wanted = [r for r in args.resolutions.split(",") if r]
    cases = [c for c, res in zip(cases, ("256", "1024")) if res in wanted] or cases
    VQVAE = load_official(args.official_root)
    if VQVAE is None:
        print(f"[bench] no VAR checkout at {args.official_root}: measuring ours only")

    torch.manual_seed(0)
    ours = MultiScaleVQ(**arch, patch_nums=cases[0][1]).to(dev).eval()
    ours.downsample = ours.downsample
    if args.weights:
        ours.load_tokenizer_weights(__import__("starkit.tokenizers.weights", fromlist=["x"]).load_weights_file(args.weights))
    state = {k: v.detach().clone() for k, v in ours.state_dict().items()}
    if cuda:
        ours = ours.to(memory_format=torch.channels_last)
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext

    def variant_model(kind: str):
        model = MultiScaleVQ(**arch, patch_nums=cases[0][1]).to(dev).eval()
        model.load_state_dict(state, strict=False)
        if cuda and kind in ("cl", "compile", "compile_max"):
            model = model.to(memory_format=torch.channels_last)
        if kind in ("compile", "compile_nchw"):
            model.encoder = torch.compile(model.encoder)
            model.decoder = torch.compile(model.decoder)
        if kind == "compile_max":  # the tuned variant: inductor benchmarks conv/matmul choices (slow to compile)
            model.optimize_for_inference(channels_last=True, mode="max-autotune-no-cudagraphs")
        return model

    rows = []
    variants = [v for v in args.variants.split(",") if v] if cuda else ["cl"]
    for name, pn, B in cases:
        side = pn[-1] * ours.downsample
        x = torch.rand(B, 3, side, side, device=dev) * 2 - 1
        row = {"case": name, "B": B}
        for kind in variants:
            model = ours if kind == "cl" else variant_model(kind)
            model.set_patch_nums(pn)
            with torch.inference_mode():
                with amp():
                    idx_k = model.encode(x)
                    t_enc = timed(lambda: model.encode(x), args.warmup, args.repeats, dev)
                    t_dec = timed(lambda: model.decode(idx_k), args.warmup, args.repeats, dev)
            row[f"enc_{kind}"], row[f"dec_{kind}"] = B / t_enc, B / t_dec
        with torch.inference_mode(), amp():
            ours.set_patch_nums(pn)
            idx = ours.encode(x)  # reference tokens of ours (bf16) for the agreement column
        row["enc"], row["dec"] = row[f"enc_{variants[0]}"], row[f"dec_{variants[0]}"]
        if VQVAE is not None:
            var = VQVAE(vocab_size=arch["codebook_size"], z_channels=arch["z_channels"], ch=arch["ch"],
                        v_patch_nums=pn, test_mode=True).to(dev)
            sd = dict(state)
            sd["quantize.ema_vocab_hit_SV"] = var.quantize.ema_vocab_hit_SV
            var.load_state_dict(sd, strict=True)
            for tf32 in ((True, False) if cuda else (False,)):
                torch.backends.cuda.matmul.allow_tf32 = tf32  # VAR's own code runs with TF32 on
                torch.backends.cudnn.allow_tf32 = tf32
                with torch.inference_mode():
                    idx_v = var.img_to_idxBl(x)
                    tag = "var" if tf32 or not cuda else "var_fp32"
                    row[f"{tag}_enc"] = B / timed(lambda: var.img_to_idxBl(x), args.warmup, args.repeats, dev)
                    row[f"{tag}_dec"] = B / timed(lambda: var.idxBl_to_img(idx_v, same_shape=True, last_one=True),
                                                  args.warmup, args.repeats, dev)
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
            with torch.inference_mode():
                idx_v = var.img_to_idxBl(x)  # strict fp32 reference tokens and image
                img_v = var.idxBl_to_img(idx_v, same_shape=True, last_one=True)
                with amp():
                    img_same = ours.decode(idx_v).float()  # ours (bf16) decoding VAR's tokens
            row["agree"] = torch.cat([(a == b).flatten() for a, b in zip(idx, idx_v)]).float().mean().item() * 100
            row["diff"] = (img_same - img_v).abs().max().item()
            row["mean_diff"] = (img_same - img_v).abs().mean().item()
            del var
        rows.append(row)
        print(f"[bench] {row}")
    t_train = None if args.skip_train else time_train_step(arch, train_pn, train_batch, dev, cuda, amp, args)
    print_table(rows, dev, cuda, args, train_pn[-1] * ours.downsample, train_batch, t_train)
    if args.json:
        from bench_generator import write_results
        write_results(args.json, torch.cuda.get_device_name(dev) if cuda else "CPU", args, rows,
                      train_step_s=t_train, train_batch=train_batch)


def time_train_step(arch, train_pn, train_batch, dev, cuda, amp, args) -> float:
    """Seconds per tokenizer training step with the discriminator on (at the 256 scales)."""
    torch.manual_seed(0)
    trainee = MultiScaleVQ(**arch, patch_nums=train_pn, use_discriminator=True, disc_start_step=0).to(dev)
    if cuda:
        trainee = trainee.to(memory_format=torch.channels_last)
    opt_g, opt_d = trainee.configure_optimizers()
    side = train_pn[-1] * trainee.downsample
    x = torch.rand(train_batch, 3, side, side, device=dev) * 2 - 1

    def train_step():
        with amp():
            from starkit.tokenizers.losses import adaptive_gan_weight, hinge_d_loss, hinge_g_loss
            rec, vq, _, hits, _ = trainee(x)
            nll = (rec.float() - x).abs().mean() + (rec.float() - x).square().mean()
            g = hinge_g_loss(trainee.discriminator(rec))
            loss = nll + vq + 0.5 * adaptive_gan_weight(nll, g, trainee.decoder.last_layer) * g
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        opt_g.step()
        with amp():
            d = hinge_d_loss(trainee.discriminator(x), trainee.discriminator(rec.detach()))
        opt_d.zero_grad(set_to_none=True)
        d.backward()
        opt_d.step()
        trainee.quantize.update_usage(hits)

    return timed(train_step, args.warmup, args.repeats, dev)


def print_table(rows, dev, cuda, args, side, train_batch, t_train) -> None:
    dev_name = torch.cuda.get_device_name(dev) if cuda else "CPU"
    prec = "bf16 autocast + channels_last" if cuda else "fp32"
    print(f"\n### Tokenizer benchmark ({dev_name}; ours {prec}; VAR fp32; {'tiny' if args.tiny else 'ch160 v4096 z32'})\n")
    for r in rows:
        print(f"variants {r['case']}: " + ", ".join(f"{k}={v:.1f}" for k, v in r.items() if k.startswith(("enc_", "dec_", "var"))))
    print("| res | batch | ours enc img/s | VAR enc img/s (TF32, as it runs) | ours dec img/s | VAR dec img/s | idx agree % | dec max abs diff (mean) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        fmt = lambda k: f"{r[k]:.1f}" if k in r else "n/a"  # noqa: E731
        diff = f"{r['diff']:.3g} ({r['mean_diff']:.2g})" if "diff" in r else "n/a"
        agree = f"{r['agree']:.2f}" if "agree" in r else "n/a"
        print(f"| {r['case']} | {r['B']} | {fmt('enc')} | {fmt('var_enc')} | {fmt('dec')} | {fmt('var_dec')} | {agree} | {diff} |")
    if t_train is not None:
        print(f"| train step {side}px (disc on) | {train_batch} | {train_batch / t_train:.1f} img/s | | | | | |")


if __name__ == "__main__":
    main()
