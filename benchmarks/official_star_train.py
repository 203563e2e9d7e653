"""One TRAINING STEP of the OFFICIAL STAR-T2I trainer (random weights, real architecture), for images/s ratios
against bench_generator.py's starkit step in the same run. The official code is imported at run time from
``--official-root`` with official_star.py's helpers; none of it lives here.

    python benchmarks/official_star_train.py --official-root .official/STAR --configs d16@256,d30@256,d30@1024 \\
        --batches 64,32,2 --steps 10 --warmup 3 --json $OUT/official_star_train.json
    python benchmarks/official_star_train.py --official-root /path/to/STAR --tiny       # CPU smoke run (~15 s)

Settings come from the official configs (train.py reads only ``--config``): config_d16_ab.json, config_d30.json,
config_d30_1024.json (drop_scale_length 8800: 651 random tokens of the 64x64 scale dropped, 8800 of 9451 kept);
AdamW betas and nowd_keys are parsed from train.py. Built as train.py builds it: build_vae_var(train_mode='all',
flash/fused = 'fuse'), filter_params, AdamW(fused=afuse, lr=tlr, wd set each step by lr_wd_annealing),
AmpOptimizer (fp16=1: fp16 autocast + GradScaler(2**11); clip tclip), VARTrainer, Args.set_tf32/seed_everything.
``step()`` = one iteration of train_one_ep: Text_Model.extract_text_features (fp32 CLIP, outside autocast and
no_grad), label tensor, lr_wd_annealing, VARTrainer.train_step (fp32 img_to_idxBl VQ encode, idxBl_to_var_input,
forward under autocast with the additive block-causal mask, CE, scaled backward, unscale, clip, scaler step and
update, zero_grad). Not timed: data loading, the images' H2D copy, logging iterations (.item() + bincount).
CPU (--tiny): AmpOptimizer(mixed_precision=0) = fp32, no scaler (autocast('cuda') and GradScaler are CUDA-only);
depth 2, VQVAE ch 32, 2-layer CLIP, patch_nums 1..4 or 1..14 (1024: the drop starts at scale 13), 1 thread.
PATCHES besides official_star.py's (import stubs, dist device, VQVAE default init instead of VAE.pth, no-op
reset_parameters undone, random CLIP + FixedIdsTokenizer in a Text_Model built without __init__): pytz stubbed if
missing (utils/misc.py: time_str only); print() takes misc.py's force/clean keywords during the build; a local
NullDDP unless --ddp (world-size-1 DDP(find_unused_parameters=True) as train.py); tb_lg = DistLogger(None).
"""
from __future__ import annotations

import argparse, ast, builtins, contextlib, importlib.util, io, json, os  # noqa: E401
import statistics, subprocess, sys, tempfile, time, types, warnings  # noqa: E401

import torch
import torch.nn as nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_generator as bg  # noqa: E402  (time_steps)
import official_star as ostar  # noqa: E402  (import_official, stubs, FixedIdsTokenizer, CLIP sizes)

CONFIGS = {"d16@256": ("configs/config_d16_ab.json", ostar.P256), "d30@256": ("configs/config_d30.json", ostar.P256),
           "d30@1024": ("configs/config_d30_1024.json", ostar.P1024)}
TINY_PN = {256: (1, 2, 3, 4), 1024: tuple(range(1, 15))}
ITERS_TRAIN = 10000  # nominal epoch length for the lr schedule (only sets the lr value)


@contextlib.contextmanager
def _official_runtime():
    """PATCH: pytz (utils/misc.py: time_str only) stubbed if missing; print() takes the force/clean/deeper
    keywords that misc.init_distributed_mode's print replacement gives train.py (filter_params uses them)."""
    made = [n for n in ("pytz",) if n not in sys.modules and importlib.util.find_spec(n) is None]
    for n in made:
        sys.modules[n] = types.ModuleType(n)
        sys.modules[n].__getattr__ = ostar._stub_attr
    orig = builtins.print
    builtins.print = lambda *a, force=False, clean=False, deeper=False, **k: orig(*a, **k)
    try:
        yield made
    finally:
        builtins.print = orig
        [sys.modules.pop(n, None) for n in made]


def official_args(root: str, config: str, tiny: bool) -> types.SimpleNamespace:
    """The config JSON, the derivations of arg_util.init_dist_and_get_args used here, and train.py's
    AdamW betas and nowd_keys (parsed from its source, not copied)."""
    path, pn = CONFIGS[config]
    with open(os.path.join(root, path)) as f:
        a = types.SimpleNamespace(**json.load(f))
    assert tuple(map(int, a.pn.split("_"))) == pn, (a.pn, pn)  # init_dist_and_get_args: patch_nums from pn
    a.config_file, a.patch_nums = path, pn
    for node in ast.walk(ast.parse(open(os.path.join(root, "train.py")).read())):
        if isinstance(node, ast.keyword) and node.arg in ("betas", "nowd_keys") and not hasattr(a, node.arg):
            setattr(a, node.arg, ast.literal_eval(node.value))
    if tiny:
        full_L, a.depth, a.patch_nums = sum(p * p for p in pn), 2, TINY_PN[pn[-1] * a.patch_size]
        if a.drop_scale_length is not None:  # keep the official share of dropped last-scale tokens
            L = sum(p * p for p in a.patch_nums)
            a.drop_scale_length = L - round((full_L - a.drop_scale_length) * a.patch_nums[-1] ** 2 / pn[-1] ** 2)
    a.resos = tuple(p * a.patch_size for p in a.patch_nums)
    a.twde, a.wp, a.pgwp = a.twde or a.twd, a.wp or a.ep / 50, a.pgwp or a.ep / 300
    return a


class NullDDP(nn.Module):
    """PATCH: stands in for train.py's single-process wrapper (train.py cannot be imported here)."""
    def __init__(self, module):
        super().__init__()
        self.module, self.require_backward_grad_sync = module, False

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


class OfficialTrainer:
    """``step()`` = one iteration of train.py's train_one_ep on a fixed batch."""
    def __init__(self, trainer, text, images, prompts, a, mods, info):
        self.trainer, self.text, self.images, self.prompts, self.a, self.info = trainer, text, images, prompts, a, info
        self.lr_wd_annealing, misc = mods
        self.me, self.tb = misc.MetricLogger("  "), misc.DistLogger(None, verbose=False)  # tb_lg of a non-master rank
        self.g_it, self.last = 0, None

    def step(self):
        a, B = self.a, self.images.shape[0]
        self.g_it += 2 if (self.g_it + 2) % 200 == 0 else 1  # skip train_step's tensorboard iterations; it 0 unused
        g_it = it = self.g_it
        emb = self.text.extract_text_features(self.prompts)  # as train.py: outside no_grad/autocast
        label = torch.tensor([a.default_label] * B).to(self.images.device, non_blocking=True)
        self.lr_wd_annealing(a.sche, self.trainer.var_opt.optimizer, a.tlr, a.twd, a.twde, g_it,
                             a.wp * ITERS_TRAIN, a.ep * ITERS_TRAIN, wp0=a.wp0, wpe=a.wpe)
        self.last = self.trainer.train_step(it=it, g_it=g_it, stepping=(g_it + 1) % a.ac == 0, metric_lg=self.me,
                                            tb_lg=self.tb, inp_B3HW=self.images, label_B=label, prompt_embeds=emb,
                                            prog_si=-1, prog_wp_it=a.pgwp * ITERS_TRAIN)
        self.tb.update(head="AR_opt_grad/grad", grad_norm=self.last[0])  # no-op, as on non-master ranks


def build_official_trainer(official_root: str, config: str, device="cuda", batch: int = 1, tiny: bool = False,
                           ddp: bool = False, verbose: bool = False) -> OfficialTrainer:
    dist, build_vae_var, Text_Model, stubs = ostar.import_official(official_root)
    with _official_runtime() as more:
        from trainer import VARTrainer
        from utils import arg_util, misc
        from utils.amp_sc import AmpOptimizer
        from utils.lr_control import filter_params, lr_wd_annealing
        from utils.weights import zero_out_cross_attention_weights
    device = torch.device(device)
    setattr(dist, "__device", str(device))  # PATCH (official_star.py's): where VAR puts buffers + its Generator
    a = official_args(official_root, config, tiny)
    clip_cfg = ostar.TINY_CLIP if tiny else ostar.SD21_CLIP
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    saved = {c: c.__dict__.get("reset_parameters") for c in ostar.NO_INIT}
    try:
        with quiet:  # official prints off unless --verbose
            arg_util.Args.set_tf32(a.tf32)  # official: tf32 matmul/cudnn on (CUDA only)
            arg_util.Args.seed_everything(a, benchmark=a.pg == 0)  # cudnn.benchmark = True
            torch.manual_seed(0)
            vae, var_wo_ddp = build_vae_var(
                V=4096, Cvae=32, ch=32 if tiny else 160, share_quant_resi=4, device=device, patch_nums=a.patch_nums,
                depth=a.depth, shared_aln=a.saln, attn_l2_norm=a.anorm, enable_cross=a.enable_cross,
                in_dim_cross=clip_cfg["hidden_size"], flash_if_available=a.fuse, fused_if_available=a.fuse,
                init_adaln=a.aln, init_adaln_gamma=a.alng, init_head=a.hd, init_std=a.ini, rope_emb=a.rope_emb,
                lvl_emb=a.lvl_emb, rope_norm=a.rope_norm, drop_scale_length=a.drop_scale_length,
                enable_logit_norm=a.logit_norm, enable_adaptive_norm=False, train_mode="all",
                rope_theta=a.rope_theta, vae_ada=False)
    finally:  # PATCH: undo build_vae_var's process-wide no-op reset_parameters
        for c, f in saved.items():
            with contextlib.suppress(AttributeError):
                setattr(c, "reset_parameters", f) if f is not None else delattr(c, "reset_parameters")
    for m in vae.modules():  # PATCH: default init instead of vae.load_state_dict(VAE.pth)
        if isinstance(m, ostar.NO_INIT):
            m.reset_parameters()
    with quiet, _official_runtime():
        if not a.from_scratch:
            zero_out_cross_attention_weights(var_wo_ddp)
        assert a.vfast == 0 and a.tfast == 0  # compile_model: no torch.compile in these configs
        ids = [device.index or 0] if device.type == "cuda" else None
        var = nn.parallel.DistributedDataParallel(var_wo_ddp, device_ids=ids, find_unused_parameters=True,
                                                  broadcast_buffers=False) if ddp else NullDDP(var_wo_ddp)
        names, paras, groups = filter_params(var_wo_ddp, nowd_keys=a.nowd_keys)
        opt = torch.optim.AdamW(groups, lr=a.tlr, weight_decay=0, betas=a.betas, fused=a.afuse)
        fp16 = a.fp16 if device.type == "cuda" else 0  # CPU: fp32 (autocast('cuda')/GradScaler are CUDA-only)
        var_opt = AmpOptimizer(mixed_precision=fp16, optimizer=opt, names=names, paras=paras, grad_clip=a.tclip,
                               n_gradient_accumulation=a.ac)
        trainer = VARTrainer(device=device, patch_nums=a.patch_nums, resos=a.resos, vae_local=vae,
                             var_wo_ddp=var_wo_ddp, var=var, var_opt=var_opt, label_smooth=a.ls)
    from transformers import CLIPTextConfig, CLIPTextModel
    text = Text_Model.__new__(Text_Model)  # PATCH (official_star.py's): skip from_pretrained
    nn.Module.__init__(text)
    text.device, text.text_encoder_name, text.tokenizer = device, a.text_enc, ostar.FixedIdsTokenizer()
    with torch.device(device):
        text.text_encoder = CLIPTextModel(CLIPTextConfig(**clip_cfg)).eval().requires_grad_(False)  # fp32
    g = torch.Generator(device).manual_seed(0)
    R = a.patch_nums[-1] * a.patch_size
    images = torch.rand(batch, 3, R, R, device=device, generator=g).mul_(2).sub_(1)  # (B, 3, R, R) in [-1, 1]
    prompts = [ostar.PROMPTS[i % len(ostar.PROMPTS)] for i in range(batch)]
    bl, v = var_wo_ddp.blocks, var_wo_ddp
    info = dict(config=config, config_file=a.config_file, tiny=tiny, depth=a.depth, width=v.C, batch=batch,
                resolution=R, patch_nums=list(a.patch_nums), tokens=v.L, tokens_trained=a.drop_scale_length or v.L,
                var_params_M=sum(p.numel() for p in v.parameters()) / 1e6, lr=a.tlr, wd=a.twd, betas=a.betas,
                fused_adamw=a.afuse, grad_clip=a.tclip, mixed_precision=["fp32", "fp16+GradScaler", "bf16"][fp16],
                tf32=bool(a.tf32 and device.type == "cuda"), fuse=a.fuse, ddp=ddp, stubbed_modules=stubs + more,
                flash_self_attn=sum(b.attn.using_flash for b in bl), xformers_self_attn=sum(b.attn.using_xform for b in bl),
                fused_mlp=sum(b.ffn.fused_mlp_func is not None for b in bl))
    return OfficialTrainer(trainer, text, images, prompts, a, (lr_wd_annealing, misc), info)


def bench(config: str, batch: int, args, dev: torch.device) -> dict:
    row, model = dict(config=config, batch=batch), None
    try:
        bg.free_memory(dev)  # gc, empty_cache, reset_peak_memory_stats: the peak includes weights + optimizer
        t0 = time.perf_counter()
        model = build_official_trainer(args.official_root, config, dev, batch, args.tiny, args.ddp, args.verbose)
        row.update(model.info, build_s=time.perf_counter() - t0)
        times, wall = bg.time_steps(model.step, args.warmup, args.steps, dev)
        t, (grad_norm, scale_log2) = statistics.median(times), model.last
        row.update(s_per_step_median=t, s_per_step_all=times, images_per_s=batch / t, timed_wall_s=wall,
                   peak_gib=torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
                   last_grad_norm=None if grad_norm is None else float(grad_norm), last_scale_log2=scale_log2,
                   host_syncs_per_step=ostar.count_syncs(model.step) if args.count_syncs and dev.type == "cuda"
                   else None)
    except (torch.OutOfMemoryError, RuntimeError) as err:
        if not bg.is_oom(err):
            raise
        row.update(error="OOM", detail=str(err)[:200])
    finally:
        del model
        bg.free_memory(dev)
    return row


def fmt_table(rows: list, name: str) -> str:
    lines = [f"### Official STAR training step ({name})", "",
             "| config | batch | median s/step | images/s | peak GiB |", "|---|---|---|---|---|"]
    for r in rows:
        peak = "n/a" if r.get("peak_gib") is None else f"{r['peak_gib']:.1f}"
        lines.append(f"| {r['config']} | {r['batch']} | " + (f"{r['error']} | | |" if "error" in r else
                     f"{r['s_per_step_median']:.4f} | {r['images_per_s']:.2f} | {peak} |"))
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official-root", required=True, help="checkout of the official STAR code")
    ap.add_argument("--configs", default="d16@256,d30@256,d30@1024")
    ap.add_argument("--batches", default="64,32,2", help="one per config (or one for all)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--ddp", action="store_true", help="world-size-1 DDP(find_unused_parameters=True), as train.py")
    ap.add_argument("--count-syncs", action="store_true", help="one extra step in CUDA sync-debug mode")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny models, batch <= 2, 2 warm-ups, 3 steps, 1 thread")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None)
    ap.add_argument("--verbose", action="store_true", help="show the official constructors' prints")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.cuda.amp.* deprecations in the official code
    dev = torch.device(args.device)
    configs = [c for c in args.configs.split(",") if c]
    batches = [int(b) for b in args.batches.split(",") if b]
    batches = batches * len(configs) if len(batches) == 1 else batches
    assert len(batches) == len(configs), "--batches: one per config"
    if args.tiny:
        batches, args.warmup, args.steps = [min(b, 2) for b in batches], min(args.warmup, 2), min(args.steps, 3)
        torch.set_num_threads(1)  # as official_star.py: tiny ops gain nothing from threads, lose a lot on a shared CPU
    if args.ddp:  # train.py under torch.distributed.launch, one process
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=0, world_size=1,
                                             init_method="file://" + tempfile.mktemp(prefix="star_ddp_"))
    rows = []
    for config, b in zip(configs, batches):
        rows.append(r := bench(config, b, args, dev))
        print(f"official train {config} b{b}: " + (r["error"] if "error" in r else
              f"{r['s_per_step_median']:.4f} s/step, {r['images_per_s']:.2f} img/s, {r['var_params_M']:.0f} M params, "
              f"{r['tokens_trained']}/{r['tokens']} tokens, {r['mixed_precision']}"), flush=True)
    root = os.path.abspath(args.official_root)
    commit = None
    with contextlib.suppress(OSError):
        commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    name = bg.device_name(dev)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=dict(device=name, torch=torch.__version__, official_root=root, official_commit=commit or None,
                                     warmup=args.warmup, steps=args.steps, argv=sys.argv[1:]), rows=rows), f, indent=1)
    if args.ddp:
        torch.distributed.destroy_process_group()
    print(fmt_table(rows, name))


if __name__ == "__main__":
    main()
