"""Tests of the multi-scale VQ tokenizer (CPU, tiny configs except the VAR-layout checks)."""
import math
import os
import pickle

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from starkit.tokenizers import PATCH_NUMS_256, MultiScaleVQ, phi_index

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, z_channels=8, codebook_size=16, patch_nums=(1, 2, 3, 4))


def tiny(**kw):
    torch.manual_seed(0)
    return MultiScaleVQ(**{**TINY, **kw}).eval()


def images(b=2, side=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, side, side, generator=g) * 2 - 1


# ---------------------------------------------------------------- inference API
@pytest.mark.parametrize("patch_nums", [(1, 2, 3, 4), (1, 4), (2, 3, 4), (1, 2, 4, 6, 8)])
@pytest.mark.parametrize("share", [0, 1, 4])
def test_round_trip_shapes(patch_nums, share):
    m = tiny(patch_nums=patch_nums, share_quant_resi=share)
    x = images(side=patch_nums[-1] * m.downsample)
    idx = m.encode(x)
    assert [tuple(i.shape) for i in idx] == [(2, p * p) for p in patch_nums]
    assert all(i.dtype == torch.long and int(i.max()) < 16 for i in idx)
    out = m.decode(idx)
    assert out.shape == x.shape and out.abs().max() <= 1
    L_total = sum(p * p for p in patch_nums)
    assert m.teacher_forcing_inputs(idx).shape == (2, L_total - patch_nums[0] ** 2, 8)
    assert m.resolution == x.shape[-1]


def test_teacher_forcing_equals_incremental_and_encoder_fhat():
    m = tiny()
    x = images()
    idx = m.encode(x)
    tf = m.teacher_forcing_inputs(idx)
    f_hat = m.empty_latent(2)
    inputs = []
    for k in range(m.num_scales):  # as a sampler does it, one scale at a time
        f_hat = m.add_scale(f_hat, k, m.embed(idx[k]).float())
        if k + 1 < m.num_scales:
            inputs.append(m.next_scale_input(f_hat, k + 1))
    assert torch.equal(tf, torch.cat(inputs, 1))
    f_hat_enc, _, _, _ = m.quantize(m.encode_latent(x), compute_loss=False)
    assert torch.equal(f_hat, f_hat_enc)
    assert torch.equal(m.decode(idx), m.decode_latent(f_hat_enc))


def test_phi_index_rule():
    # ticks = linspace(1/12, 11/12, 4) = .083 .361 .639 .917; scale k sits at k/(K-1).
    # K=10 has exact ties at 2/9 and 7/9 (midpoints of the ticks); the float rule gives 1 and 3 (as VAR).
    assert [phi_index(k, 10, 4) for k in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert [phi_index(k, 12, 4) for k in range(12)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    # K=13: k=6 is at 0.5, a tie between ticks 1 and 2; the float rule gives 2 (as VAR).
    assert [phi_index(k, 13, 4) for k in range(13)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3]
    assert [phi_index(k, 14, 4) for k in range(14)] == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3]
    assert [phi_index(k, 4, 1) for k in range(4)] == [0, 0, 0, 0]
    assert [phi_index(k, 4, 4) for k in range(4)] == [0, 1, 2, 3]  # share 0 with K phis: one each


# ---------------------------------------------------------------- VAR's checkpoint layout
# A representative part of VAR's vae_ch160v4096z32.pth key -> shape table (ch 160, ch_mult 1,1,2,2,4,
# z 32, V 4096), written from the structure of VAR's models/vqvae.py, quant.py and basic_vae.py.
VAR_KEYS = {
    "encoder.conv_in.weight": (160, 3, 3, 3),
    "encoder.down.0.block.0.norm1.weight": (160,),
    "encoder.down.0.block.1.conv2.weight": (160, 160, 3, 3),
    "encoder.down.0.downsample.conv.weight": (160, 160, 3, 3),
    "encoder.down.2.block.0.nin_shortcut.weight": (320, 160, 1, 1),
    "encoder.down.3.downsample.conv.bias": (320,),
    "encoder.down.4.block.0.nin_shortcut.weight": (640, 320, 1, 1),
    "encoder.down.4.attn.0.norm.weight": (640,),
    "encoder.down.4.attn.1.qkv.weight": (1920, 640, 1, 1),
    "encoder.down.4.attn.1.proj_out.bias": (640,),
    "encoder.mid.block_1.conv1.weight": (640, 640, 3, 3),
    "encoder.mid.attn_1.qkv.bias": (1920,),
    "encoder.mid.block_2.norm2.bias": (640,),
    "encoder.norm_out.weight": (640,),
    "encoder.conv_out.weight": (32, 640, 3, 3),
    "decoder.conv_in.weight": (640, 32, 3, 3),
    "decoder.mid.attn_1.proj_out.weight": (640, 640, 1, 1),
    "decoder.up.4.block.2.conv2.weight": (640, 640, 3, 3),
    "decoder.up.4.attn.2.qkv.weight": (1920, 640, 1, 1),
    "decoder.up.4.upsample.conv.weight": (640, 640, 3, 3),
    "decoder.up.3.block.0.nin_shortcut.weight": (320, 640, 1, 1),
    "decoder.up.1.block.0.nin_shortcut.weight": (160, 320, 1, 1),
    "decoder.up.1.upsample.conv.weight": (160, 160, 3, 3),
    "decoder.up.0.block.2.norm1.weight": (160,),
    "decoder.norm_out.bias": (160,),
    "decoder.conv_out.weight": (3, 160, 3, 3),
    "quant_conv.weight": (32, 32, 3, 3),
    "post_quant_conv.bias": (32,),
    "quantize.embedding.weight": (4096, 32),
    "quantize.quant_resi.qresi_ls.0.weight": (32, 32, 3, 3),
    "quantize.quant_resi.qresi_ls.3.bias": (32,),
    "quantize.ema_vocab_hit_SV": (10, 4096),
}
VAR_ABSENT = ["decoder.up.0.upsample.conv.weight", "encoder.down.4.downsample.conv.weight",
              "encoder.down.3.attn.0.qkv.weight", "encoder.down.2.block.2.conv1.weight",
              "decoder.up.0.block.3.conv1.weight", "quantize.quant_resi.qresi_ls.4.weight"]
VAR_NUM_KEYS = 324  # len(VQVAE().state_dict()) for the released configuration


@pytest.fixture(scope="module")
def var_file(tmp_path_factory):
    """A torch.save'd plain state dict in VAR's layout, saved with 1024's 14 scales."""
    torch.manual_seed(0)
    ref = MultiScaleVQ()  # VAR-sized, 109M params
    sd = {k: torch.randn_like(v) for k, v in ref.state_dict().items()}
    sd["quantize.ema_vocab_hit_SV"] = torch.rand(14, 4096)
    path = tmp_path_factory.mktemp("var") / "vae_ch160v4096z32.pth"
    torch.save(sd, path)
    return path, sd


def test_var_layout_and_strict_load(var_file):
    path, sd = var_file
    own = MultiScaleVQ(patch_nums=PATCH_NUMS_256).state_dict()
    assert len(own) == VAR_NUM_KEYS
    for k, shape in VAR_KEYS.items():
        assert tuple(own[k].shape) == shape, k
    for k in VAR_ABSENT:
        assert k not in own
    assert sum(v.numel() for k, v in own.items() if k != "quantize.ema_vocab_hit_SV") == pytest.approx(108.9e6, rel=1e-2)
    for pn in (PATCH_NUMS_256, (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)):
        m = MultiScaleVQ.from_pretrained(str(path), patch_nums=pn)
        assert m.hparams.ch == 160 and m.codebook_size == 4096 and m.downsample == 16
        assert m.quantize.ema_vocab_hit_SV.shape == (len(pn), 4096)
        assert torch.equal(m.codebook, sd["quantize.embedding.weight"])
        assert torch.equal(m.decoder.conv_out.weight, sd["decoder.conv_out.weight"])
    # the same file through the YAML path, with the discriminator on (its keys are not required)
    m = MultiScaleVQ(pretrained=str(path), use_discriminator=True, disc_channels=8, disc_layers=1)
    assert torch.equal(m.quant_conv.weight, sd["quant_conv.weight"])


def test_mismatched_weights_name_the_keys(tmp_path):
    m = tiny()
    sd = m.state_dict()
    sd["encoder.extra.weight"] = torch.zeros(1)
    del sd["quant_conv.bias"]
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"quant_conv\.bias.*encoder\.extra\.weight"):
        MultiScaleVQ.from_pretrained(str(tmp_path / "bad.pth"), patch_nums=(1, 2, 3, 4))
    with pytest.raises(ValueError, match="shape mismatch"):
        MultiScaleVQ(**{**TINY, "codebook_size": 32}).load_tokenizer_weights(m.state_dict())


def test_save_pretrained_round_trip(tmp_path):
    m = tiny(share_quant_resi=0)
    with torch.no_grad():
        m.codebook.normal_()
    m.save_pretrained(str(tmp_path / "tok"))
    assert sorted(os.listdir(tmp_path / "tok")) == ["config.json", "model.safetensors"]
    m2 = MultiScaleVQ.from_pretrained(str(tmp_path / "tok")).eval()
    x = images()
    idx, idx2 = m.encode(x), m2.encode(x)
    assert all(torch.equal(a, b) for a, b in zip(idx, idx2))
    assert torch.equal(m.decode(idx), m2.decode(idx2))
    m3 = MultiScaleVQ(**TINY, share_quant_resi=0, pretrained=str(tmp_path / "tok"))
    assert torch.equal(m3.codebook, m.codebook)
    assert MultiScaleVQ.from_pretrained(str(tmp_path / "tok"), frozen=True).training is False


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_unsafe_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        pickle.dump({"quant_conv.weight": _Evil()}, fh)
    with pytest.raises(ValueError, match="unsafe unpickling"):
        MultiScaleVQ.from_pretrained(str(path))
    torch.save({"w": torch.zeros(1), "evil": _Evil()}, tmp_path / "evil2.pth")
    with pytest.raises(ValueError, match="weights_only=False"):
        MultiScaleVQ.from_pretrained(str(tmp_path / "evil2.pth"))


def test_frozen_inside_another_module():
    class Parent(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.tok = tiny(frozen=True)
            self.head = nn.Linear(8, 8)

    p = Parent()
    p.train()
    assert p.tok.training is False and p.head.training is True
    assert not any(q.requires_grad for q in p.tok.parameters())
    idx = p.tok.encode(images())
    assert p.tok.teacher_forcing_inputs(idx).requires_grad is False


# ---------------------------------------------------------------- training
class _RandomImages(Dataset):
    def __init__(self, n, side):
        self.n, self.side = n, side

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return {"image": torch.rand(3, self.side, self.side, generator=g) * 2 - 1, "caption": f"image {i}"}


class TinyImageData(L.LightningDataModule):
    """Random images in [-1, 1] with captions, the batch format of starkit.data."""

    def __init__(self, side: int = 16, batch_size: int = 4, n: int = 16):
        super().__init__()
        self.side, self.batch_size, self.n = side, batch_size, n

    def train_dataloader(self):
        return DataLoader(_RandomImages(self.n, self.side), batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(_RandomImages(self.batch_size, self.side), batch_size=self.batch_size)


class TinyFeatures(nn.Module):
    """A random two-layer conv net standing in for an LPIPS trunk."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, 1, 1), nn.Conv2d(8, 16, 3, 2, 1)

    def forward(self, x):
        a = torch.relu(self.c1(x))
        return [a, torch.relu(self.c2(a))]


def test_training_steps_with_gan_perceptual_and_reinit(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    torch.manual_seed(0)
    m = MultiScaleVQ(**TINY, use_discriminator=True, disc_channels=8, disc_layers=2, disc_start_step=2,
                     dead_code_reinit_every=2, perceptual_net=TinyFeatures(), grad_clip=1.0, num_log_images=2)
    assert not any(k.startswith("perceptual.") for k in m.state_dict())
    seen = []

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append({k: float(v) for k, v in trainer.callback_metrics.items()})

    before = m.discriminator.net[0].weight.detach().clone()
    trainer = L.Trainer(max_steps=6, accelerator="cpu", logger=CSVLogger(tmp_path), callbacks=[Spy()],
                        enable_checkpointing=False, enable_progress_bar=False, log_every_n_steps=1,
                        limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(m, datamodule=TinyImageData())
    assert m.train_step_count == 6
    assert all(math.isfinite(v) for s in seen for v in s.values())
    last = seen[-1]
    for key in ("train/l1", "train/l2", "train/vq", "train/perceptual", "train/g_loss", "train/d_loss",
                "usage/perplexity_s3_4", "usage/dead_s0_1"):
        assert key in last, key
    assert "train/g_loss" not in seen[0]  # GAN off before disc_start_step
    assert not torch.equal(before, m.discriminator.net[0].weight)
    assert {"val/psnr", "val/ssim"} <= set(trainer.callback_metrics)
    pngs = [f for r, _, fs in os.walk(tmp_path) for f in fs if f.endswith(".png")]
    assert pngs, "reconstructions not written"


def test_dead_code_reinit_uses_encoder_outputs():
    m = tiny()
    m.quantize.ema_vocab_hit_SV.zero_()
    m.quantize.ema_vocab_hit_SV[:, :4] = 10.0  # codes 4.. are dead at every scale
    cands = torch.randn(50, 8)
    n = m.quantize.reinit_dead_codes(cands)
    assert n == 12
    rows = m.codebook[4:].detach()
    assert all(any(torch.equal(r, c) for c in cands) for r in rows)


def test_cli_fit_tiny_recipe(tmp_path):
    pytest.importorskip("starkit.data.shapes")
    from starkit.cli import main

    main(["fit", "--config", os.path.join(REPO, "recipes/tokenizer/tiny.yaml"), "--trainer.fast_dev_run=2",
          f"--trainer.default_root_dir={tmp_path}", "--data.init_args.num_train=8", "--data.init_args.num_val=4",
          "--data.init_args.batch_size=4", "--model.init_args.disc_start_step=1"])


def test_var_recipe_builds():
    import yaml

    with open(os.path.join(REPO, "recipes/tokenizer/var_f16_256.yaml")) as fh:
        first = fh.readline()
        cfg = yaml.safe_load(fh)
    assert first.startswith("# starkit fit --config recipes/tokenizer/var_f16_256.yaml")
    m = MultiScaleVQ(**cfg["model"]["init_args"])
    assert m.resolution == 256 and m.discriminator is not None


def test_stage1_checkpoint_with_discriminator_loads_into_a_plain_tokenizer(tmp_path):
    """The generator plugs in the stage-1 tokenizer checkpoint: its discriminator is dropped."""
    from starkit.tokenizers import MultiScaleVQ
    cfg = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=8, codebook_size=16, patch_nums=(1, 2))
    trained = MultiScaleVQ(**cfg, use_discriminator=True, disc_channels=16, disc_layers=2)
    path = tmp_path / "stage1.ckpt"
    torch.save({"state_dict": trained.state_dict()}, path)
    plain = MultiScaleVQ(**cfg, pretrained=str(path))
    assert not any(k.startswith("discriminator.") for k in plain.state_dict())
    x = torch.rand(1, 3, 4, 4) * 2 - 1
    assert all(torch.equal(a, b) for a, b in zip(plain.encode(x), trained.encode(x)))


def test_tap_conv_decodes_the_images_of_the_plain_conv(monkeypatch):
    # On CUDA the decoder's last conv (3 output channels) runs at inference as one matrix product to the 9 taps and a
    # shifted sum (cuDNN's kernel for 3 outputs is slow): the same images; training keeps the conv.
    from starkit.tokenizers import cnn
    tok = tiny()
    f = torch.randn(2, TINY["z_channels"], 4, 4)
    calls, real = [], cnn.tap_conv3x3
    monkeypatch.setattr(cnn, "tap_conv3x3", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        monkeypatch.setattr(cnn, "REWRITE_DEVICES", ())
        plain = tok.decode_latent(f)
        monkeypatch.setattr(cnn, "REWRITE_DEVICES", ("cpu",))
        torch.testing.assert_close(tok.decode_latent(f), plain, rtol=1e-5, atol=1e-5)
    assert calls == [1]
    x, w, b = torch.randn(2, 5, 7, 6), torch.randn(3, 5, 3, 3), torch.randn(3)
    torch.testing.assert_close(real(x.contiguous(memory_format=torch.channels_last), w, b),
                               torch.nn.functional.conv2d(x, w, b, padding=1), rtol=1e-5, atol=1e-5)
    tok.train()
    tok.decode_latent(f)  # gradients on: the plain conv
    assert calls == [1]


def test_upsample_and_group_norm_rewrites_decode_the_images_of_the_plain_layers(monkeypatch):
    # At inference on CUDA the decoder's nearest-2x upsample and its 3x3 conv run as four 2x2 phase convolutions of
    # the small map (one conv), and GroupNorm of channels_last maps from per-channel statistics: the same images in
    # float32 (the taps are summed before the product: rounding only); gradients on: the plain layers.
    import torch.nn.functional as F
    from starkit.tokenizers import cnn
    tok = tiny().to(memory_format=torch.channels_last)
    f = torch.randn(2, TINY["z_channels"], 4, 4).contiguous(memory_format=torch.channels_last)
    calls = {"up": 0, "gn": 0}
    real_up, real_gn = cnn.upsample_conv3x3, cnn.group_norm_channels_last

    def count(key, fn):
        def wrapped(*args):
            calls[key] += 1
            return fn(*args)
        return wrapped
    monkeypatch.setattr(cnn, "upsample_conv3x3", count("up", real_up))
    monkeypatch.setattr(cnn, "group_norm_channels_last", count("gn", real_gn))
    with torch.no_grad():
        plain = tok.decode_latent(f)
        assert calls == {"up": 0, "gn": 0}  # CPU is not in REWRITE_DEVICES
        monkeypatch.setattr(cnn, "REWRITE_DEVICES", ("cpu",))
        rewritten = tok.decode_latent(f)
        n_up = sum(isinstance(m, cnn.Upsample) for m in tok.decoder.modules())
        n_gn = sum(isinstance(m, torch.nn.GroupNorm) for m in tok.decoder.modules())
        assert calls == {"up": n_up, "gn": n_gn} and n_up > 0
        torch.testing.assert_close(rewritten, plain, rtol=1e-5, atol=1e-5)
        for name in cnn.INFERENCE_REWRITES:  # each switch alone turns its rewrite off
            monkeypatch.setitem(cnn.INFERENCE_REWRITES, name, False)
            torch.testing.assert_close(tok.decode_latent(f), plain, rtol=1e-5, atol=1e-5)
            monkeypatch.setitem(cnn.INFERENCE_REWRITES, name, True)
    calls.update(up=0, gn=0)
    tok.decode_latent(f)  # gradients on: the plain layers
    assert calls == {"up": 0, "gn": 0}

    # the functions against the plain layers on odd sizes, with and without bias, both memory formats
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 5, 7, generator=g, dtype=torch.float64)
    w, b = torch.randn(4, 6, 3, 3, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    for bias in (b, None):
        want = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), w, bias, padding=1)
        for fmt in (torch.contiguous_format, torch.channels_last):
            got = real_up(x.float().contiguous(memory_format=fmt), w.float(), None if bias is None else bias.float())
            assert got.shape == want.shape and got.is_contiguous(memory_format=fmt)
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    x = torch.randn(3, 64, 9, 11, generator=g, dtype=torch.float64) * 3 + 5  # large mean: variance from centred sums
    gamma, beta = torch.randn(64, generator=g, dtype=torch.float64), torch.randn(64, generator=g, dtype=torch.float64)
    got = real_gn(x.float().contiguous(memory_format=torch.channels_last), 32, gamma.float(), beta.float(), 1e-6)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), F.group_norm(x, 32, gamma, beta, 1e-6), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(real_gn(x.float(), 8, None, None, 1e-6).double(), F.group_norm(x, 8, eps=1e-6),
                               rtol=1e-5, atol=1e-5)


def test_quantizer_equals_a_residual_loop_written_out_here():
    """VAR's residual multi-scale quantization written out with plain torch (area downsample of the residual,
    brute-force nearest code by cdist, bicubic upsample with align_corners=False, the scale's phi, residual
    subtracted): the same indices at every scale and the same f_hat; add_scale rebuilds that f_hat from the
    indices, and next_scale_input is f_hat area-downsampled, row-major."""
    import torch.nn.functional as F
    tok = tiny()
    q = tok.quantize
    K, side, C = len(q.patch_nums), q.patch_nums[-1], q.embed_dim
    f = torch.randn(2, C, side, side, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        f_hat_q, indices, _, _ = q(f, compute_loss=False)
        codes = q.embedding.weight.detach()
        rest, f_hat = f.clone(), torch.zeros_like(f)
        for k, pn in enumerate(q.patch_nums):
            z = rest if k == K - 1 else F.interpolate(rest, size=(pn, pn), mode="area")  # (B, C, pn, pn)
            idx = torch.cdist(z.permute(0, 2, 3, 1).reshape(-1, C), codes).argmin(1)  # (B*pn*pn,)
            assert torch.equal(idx.view(2, pn * pn), indices[k]), f"scale {k}"
            e = codes[idx].view(2, pn, pn, C).permute(0, 3, 1, 2)
            up = e if k == K - 1 else F.interpolate(e, size=(side, side), mode="bicubic", align_corners=False)
            h = q.quant_resi.get(k, K)(up)
            f_hat, rest = f_hat + h, rest - h
        torch.testing.assert_close(f_hat_q, f_hat, rtol=1e-5, atol=1e-5)
        rebuilt = tok.empty_latent(2)
        for k in range(K):
            rebuilt = tok.add_scale(rebuilt, k, tok.embed(indices[k]).float())
            if k + 1 < K:
                want = F.interpolate(rebuilt, size=(q.patch_nums[k + 1],) * 2, mode="area").flatten(2).transpose(1, 2)
                torch.testing.assert_close(tok.next_scale_input(rebuilt, k + 1), want)
        torch.testing.assert_close(rebuilt, f_hat, rtol=1e-5, atol=1e-5)


def test_decode_refuses_ids_outside_the_codebook_and_float_maps():
    """Tokens from another tokenizer (ids >= V or < 0) or float maps: one clear error naming the cause, not a bare
    IndexError from the embedding (a device-side assert on CUDA)."""
    tok = tiny()
    V = tok.codebook.shape[0]
    idx = tok.encode(torch.rand(1, 3, tok.resolution, tok.resolution) * 2 - 1)
    for bad in (V, -1):
        broken = [i.clone() for i in idx]
        broken[-1][0, 0] = bad
        with pytest.raises(ValueError, match=rf"codebook has {V} entries .*another tokenizer"):
            tok.decode(broken)
    with pytest.raises(ValueError, match="token ids are integers"):
        tok.decode([i.float() for i in idx])
    assert tok.decode(idx).shape[0] == 1  # in range: decodes


def test_a_tokenizer_cast_to_bfloat16_encodes_and_decodes():
    """``tokenizer.to(torch.bfloat16)`` (to save memory) takes float32 images and latents: the CNN runs in bf16,
    the quantizer and the scale refinement in float32 as always; decoding the same tokens stays close to float32."""
    import copy
    tok = tiny()
    x = torch.rand(2, 3, tok.resolution, tok.resolution, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        idx, ref = tok.encode(x), tok.decode(tok.encode(x))
        half = copy.deepcopy(tok).to(torch.bfloat16)
        out = half.decode(idx)
        assert out.dtype == torch.bfloat16 and out.shape == ref.shape
        assert (out.float() - ref).abs().mean() < 0.05
        idx_half = half.encode(x)
        assert [i.shape for i in idx_half] == [i.shape for i in idx] and all(i.dtype == torch.long for i in idx_half)
        f_hat = half.add_scale(half.empty_latent(2), 0, half.embed(idx[0]).float())
        assert f_hat.dtype == torch.float32  # the refinement accumulates in float32
