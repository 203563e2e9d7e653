"""MultiScaleVQ: VAR's multi-scale residual VQ-VAE, as a trainable LightningModule.

Inference API (the :class:`ScaleTokenizer` interface): ``encode``, ``embed``, ``codebook``,
``add_scale``, ``decode_latent``; the base class derives teacher forcing and decoding.
``state_dict()`` keys and shapes are exactly those of VAR's ``VQVAE``, so VAR's released
``vae_ch160v4096z32.pth`` loads strictly (``from_pretrained`` or ``pretrained=``), for any
``patch_nums``. Training (stage 1) uses manual optimisation: pixel L1/L2, multi-scale VQ
loss, optional perceptual loss and optional PatchGAN with hinge loss and adaptive weight.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .base import ScaleTokenizer
from .cnn import Decoder, Encoder
from .losses import PatchDiscriminator, adaptive_gan_weight, hinge_d_loss, hinge_g_loss, optional_perceptual
from .quantizer import MultiScaleQuantizer
from .weights import infer_var_config, load_weights_file, log_images, save_pretrained_dir

PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
TRAIN_ONLY_PREFIXES = ("discriminator.", "perceptual.")


class MultiScaleVQ(ScaleTokenizer):
    """VAR's multi-scale VQ-VAE tokenizer (encoder, residual multi-scale quantizer, decoder).

    Args:
        ch: base width of the CNN (VAR: 160).
        ch_mult: width multiplier per resolution level; downsampling is ``2**(len-1)``.
        num_res_blocks: ResNet blocks per encoder level (the decoder uses one more).
        z_channels: latent and code dimension (VAR: 32).
        codebook_size: number of codes (VAR: 4096).
        patch_nums: side of each scale's token map, small to large; the last one is the
            latent side, so the image side is ``patch_nums[-1] * downsample``.
        beta: commitment weight of the VQ loss.
        quant_resi: weight ``r`` of phi's conv branch, ``phi(h) = (1-r) h + r conv(h)``.
        share_quant_resi: number of shared phis (0: one per scale, 1: fully shared).
        dropout: dropout inside the CNN's ResNet blocks.
        using_sa: self-attention at the lowest resolution level.
        using_mid_sa: self-attention in the CNN's middle blocks.
        quant_conv_ks: kernel size of ``quant_conv`` / ``post_quant_conv``.
        pretrained: VAR ``.pth`` state dict or a ``save_pretrained`` directory to load
            the weights from at construction (the architecture arguments must match).
        frozen: eval mode and no gradients (when plugged into the generator).
        lr: AdamW learning rate of the autoencoder.
        betas: AdamW betas (both optimizers).
        weight_decay: AdamW weight decay, applied to weights of >= 2 dims only.
        l1_weight: weight of the pixel L1 loss.
        l2_weight: weight of the pixel L2 loss.
        vq_weight: weight of the multi-scale VQ loss.
        perceptual_net: optional frozen feature network for a perceptual loss (images in
            [-1, 1] -> list of feature maps), e.g. an LPIPS/VGG trunk.
        perceptual_weight: weight of the perceptual loss.
        use_discriminator: train a PatchGAN discriminator with hinge loss.
        disc_channels: width of the discriminator's first layer.
        disc_layers: number of stride-2 layers of the discriminator.
        disc_weight: factor on the adaptive GAN weight.
        disc_start_step: training step from which the GAN losses are on.
        disc_lr: discriminator learning rate (default: ``lr``).
        adaptive_weight_max: clamp of the adaptive GAN weight.
        grad_clip: gradient-norm clip for both optimizers (0 disables it).
        usage_ema: decay of the per-scale EMA of code hits.
        dead_code_threshold: a code is dead when its EMA frequency is below this times 1/V.
        dead_code_reinit_every: re-initialise dead codes from encoder outputs every N
            steps (0 disables it).
        num_log_images: reconstructions logged at the first validation batch.
    """

    def __init__(
        self,
        ch: int = 160,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        z_channels: int = 32,
        codebook_size: int = 4096,
        patch_nums: Sequence[int] = PATCH_NUMS_256,
        beta: float = 0.25,
        quant_resi: float = 0.5,
        share_quant_resi: int = 4,
        dropout: float = 0.0,
        using_sa: bool = True,
        using_mid_sa: bool = True,
        quant_conv_ks: int = 3,
        pretrained: Optional[str] = None,
        frozen: bool = False,
        lr: float = 1e-4,
        betas: Tuple[float, float] = (0.5, 0.9),
        weight_decay: float = 0.0,
        l1_weight: float = 1.0,
        l2_weight: float = 1.0,
        vq_weight: float = 1.0,
        perceptual_net: Optional[nn.Module] = None,
        perceptual_weight: float = 1.0,
        use_discriminator: bool = False,
        disc_channels: int = 64,
        disc_layers: int = 3,
        disc_weight: float = 0.5,
        disc_start_step: int = 0,
        disc_lr: Optional[float] = None,
        adaptive_weight_max: float = 1e4,
        grad_clip: float = 0.0,
        usage_ema: float = 0.99,
        dead_code_threshold: float = 1e-3,
        dead_code_reinit_every: int = 0,
        num_log_images: int = 8,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.patch_nums = tuple(int(p) for p in patch_nums)
        self.codebook_size, self.embed_dim = codebook_size, z_channels
        self.downsample = 2 ** (len(ch_mult) - 1)
        cnn = dict(ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks, z_channels=z_channels,
                   dropout=dropout, using_sa=using_sa, using_mid_sa=using_mid_sa)
        self.encoder = Encoder(**cnn)
        self.decoder = Decoder(**cnn)
        self.quantize = MultiScaleQuantizer(codebook_size, z_channels, self.patch_nums, beta, quant_resi, share_quant_resi)
        self.quant_conv = nn.Conv2d(z_channels, z_channels, quant_conv_ks, 1, quant_conv_ks // 2)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, quant_conv_ks, 1, quant_conv_ks // 2)
        self.discriminator = PatchDiscriminator(3, disc_channels, disc_layers) if use_discriminator else None
        self.perceptual = optional_perceptual(perceptual_net)
        self.register_load_state_dict_post_hook(_ignore_train_only_missing)
        self.train_step_count = 0
        self._val_metrics = None
        if pretrained:
            self.load_tokenizer_weights(load_weights_file(pretrained))
        if frozen:
            self.freeze()

    # ------------------------------------------------------------------ ScaleTokenizer
    def _channels_last(self) -> bool:
        w = self.encoder.conv_in.weight
        return w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()

    def _to_memory_format(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self._channels_last() else x

    def encode_latent(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` in [-1, 1] -> continuous latent ``f`` ``(B, z, H/d, W/d)``."""
        self._check_images(images)
        return self.quant_conv(self.encoder(self._to_memory_format(self._to_weight_dtype(images, self.encoder))))

    @staticmethod
    def _to_weight_dtype(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
        """``x`` in ``module``'s weight dtype when autocast is off (a tokenizer cast with ``.to(torch.bfloat16)``
        takes float32 images and latents; under autocast the layers cast for themselves)."""
        if torch.is_autocast_enabled(x.device.type):
            return x
        return x.to(next(module.parameters()).dtype)

    def _check_images(self, images: torch.Tensor) -> None:
        """One clear error for images the encoder cannot take as they are: not ``(B, C, H, W)`` float with the
        encoder's C channels, or a side that is not a multiple of the downsampling (the convolutions would
        silently drop the extra pixels)."""
        channels = self.encoder.conv_in.in_channels
        if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] != channels:
            shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise ValueError(f"The tokenizer encodes images of shape (B, {channels}, H, W) in [-1, 1], got {shape} "
                             f"(channels first; add a batch axis to a single image).")
        if not images.is_floating_point():
            raise TypeError(f"The tokenizer encodes float images in [-1, 1], got {images.dtype} (convert uint8 "
                            f"pixels with images.float() / 127.5 - 1).")
        H, W = images.shape[-2:]
        if H % self.downsample or W % self.downsample:
            raise ValueError(f"Image side {H}x{W} is not a multiple of the tokenizer's downsampling x{self.downsample}; "
                             f"with patch_nums {self.patch_nums} it encodes {self.resolution}x{self.resolution} "
                             f"images: resize them.")

    def encode(self, images: torch.Tensor) -> List[torch.Tensor]:
        """Images ``(B, 3, H, W)`` in [-1, 1] -> K LongTensors ``(B, pn_k**2)``."""
        with torch.no_grad():
            _, indices, _, _ = self.quantize(self.encode_latent(images), compute_loss=False)
        return indices

    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        """Codebook lookup ``(B, l)`` -> ``(B, l, z_channels)``."""
        return self.quantize.embedding(indices)

    @property
    def codebook(self) -> torch.Tensor:
        """The codebook ``(codebook_size, z_channels)``."""
        return self.quantize.embedding.weight

    def add_scale(self, f_hat: torch.Tensor, scale: int, h_BlC: torch.Tensor) -> torch.Tensor:
        """``f_hat + phi_k(bicubic_up(h))`` in fp32 (``h_BlC``: ``(B, pn_k**2, z)``)."""
        B, l, C = h_BlC.shape
        pn = self.patch_nums[scale]
        with torch.autocast(device_type=f_hat.device.type, enabled=False):
            h = h_BlC.float().transpose(1, 2).reshape(B, C, pn, pn)  # (B, C, pn, pn)
            return f_hat.float() + self.quantize.upsample_refine(h, scale, f_hat.shape[-1])

    def decode_latent(self, f_hat: torch.Tensor) -> torch.Tensor:
        """Latent ``(B, z, pn_K, pn_K)`` -> images ``(B, 3, H, W)`` clamped to [-1, 1] (in the weights' dtype
        when autocast is off: bfloat16 for a tokenizer cast with ``.to(torch.bfloat16)``)."""
        return self._decode(f_hat).clamp(-1, 1)

    def _decode(self, f_hat: torch.Tensor) -> torch.Tensor:  # unclamped, for training
        return self.decoder(self.post_quant_conv(self._to_memory_format(self._to_weight_dtype(f_hat, self.decoder))))

    def set_patch_nums(self, patch_nums: Sequence[int]) -> None:
        """Use another set of scales (same weights); resizes the usage buffer if K changes."""
        super().set_patch_nums(patch_nums)
        self.quantize.set_patch_nums(self.patch_nums)

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor], List[torch.Tensor], torch.Tensor]:
        """Training pass: images -> (reconstruction unclamped, VQ loss, indices, hits, latent f)."""
        f = self.encode_latent(images)  # (B, z, pn_K, pn_K)
        f_hat, indices, vq_loss, hits = self.quantize(f, compute_loss=True)
        return self._decode(f_hat), vq_loss, indices, hits, f

    # ------------------------------------------------------------------ frozen use
    def freeze(self) -> None:
        """Eval mode, no gradients; stays in eval even if a parent calls ``train()``."""
        super().freeze()
        self._frozen = True

    def train(self, mode: bool = True):
        return super().train(mode and not getattr(self, "_frozen", False))

    # ------------------------------------------------------------------ weights I/O
    def tokenizer_state_dict(self) -> Dict[str, torch.Tensor]:
        """The tokenizer's weights only (VAR's key layout, no discriminator)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(TRAIN_ONLY_PREFIXES)}

    def load_tokenizer_weights(self, state_dict: Dict[str, torch.Tensor]) -> None:
        """Strictly load VAR-layout weights; raises a ValueError naming any key mismatch.

        Training-only weights (discriminator, perceptual net) of a stage-1 checkpoint are
        dropped when this tokenizer has no such parts (e.g. frozen inside the generator)."""
        own = self.state_dict()
        if state_dict and not set(own) & set(state_dict) and any(k.startswith("transformer.") for k in state_dict):
            raise ValueError("these are a generator's weights (keys transformer.*), not a tokenizer's: give the "
                             "tokenizer's own checkpoint (a run of recipes/tokenizer/*.yaml), its model directory "
                             "(MultiScaleVQ.save_pretrained, or a model directory's tokenizer/), or VAR's VQVAE .pth.")
        state_dict = {k: v for k, v in state_dict.items() if k in own or not k.startswith(TRAIN_ONLY_PREFIXES)}
        bad = [k for k, v in state_dict.items() if k in own and k != "quantize.ema_vocab_hit_SV" and own[k].shape != v.shape]
        if bad:
            raise ValueError("shape mismatch for " + ", ".join(f"{k}: file {tuple(state_dict[k].shape)} vs model "
                                                               f"{tuple(own[k].shape)}" for k in bad[:10]))
        try:
            self.load_state_dict(state_dict, strict=True)
        except RuntimeError as err:
            missing = sorted(set(own) - set(state_dict) - {k for k in own if k.startswith(TRAIN_ONLY_PREFIXES)})
            unexpected = sorted(set(state_dict) - set(own))
            raise ValueError(f"weights do not match this MultiScaleVQ: missing keys {missing[:20]}, "
                             f"unexpected keys {unexpected[:20]}. Check ch, ch_mult, num_res_blocks, "
                             f"z_channels, codebook_size and share_quant_resi.") from err

    @classmethod
    def from_pretrained(cls, path: str, **overrides: Any) -> "MultiScaleVQ":
        """Load VAR's ``.pth`` state dict or a directory written by :meth:`save_pretrained`.

        Args:
            path: a ``.pth`` file (architecture inferred from the weights) or a directory
                with ``config.json`` and ``model.safetensors``.
            **overrides: init arguments to change (e.g. ``patch_nums``, ``frozen``).
        """
        if os.path.isdir(path):
            with open(os.path.join(path, "config.json")) as fh:
                config = json.load(fh)
            state_dict = load_weights_file(path)
        else:
            state_dict = load_weights_file(path)
            config = infer_var_config(state_dict)
        config.update(overrides)
        config.pop("pretrained", None)
        model = cls(**config)
        model.load_tokenizer_weights(state_dict)
        if model.hparams.frozen:
            model.freeze()
        return model

    def save_pretrained(self, directory: str, dtype: Optional[torch.dtype] = None) -> None:
        """Write ``config.json`` (init arguments) and ``model.safetensors``, atomically; ``dtype``
        (e.g. ``torch.float16``) casts the floating-point tensors (loading casts them back)."""
        config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.hparams.items()}
        config.update(pretrained=None, perceptual_net=None, patch_nums=list(self.patch_nums))
        state = self.tokenizer_state_dict()
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        save_pretrained_dir(directory, config, state)

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        checkpoint["starkit_tokenizer_step"] = self.train_step_count
        checkpoint["starkit_usage_ema_steps"] = self.quantize.ema_steps

    def setup(self, stage: str) -> None:
        """Fail before the first step when the data's resolution does not fit the scales, or the trainer's
        precision casts the weights off float32 (the quantizer runs in float32)."""
        from starkit.callbacks.guards import check_data_fits_model, check_precision
        check_data_fits_model(self, getattr(self.trainer, "datamodule", None))
        if stage in ("fit", "validate", "test"):
            check_precision(self)

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        self.train_step_count = checkpoint.get("starkit_tokenizer_step", 0)
        # the usage EMA goes on from the checkpoint's buffer: a count of 0 would overwrite it with one batch's hits
        # (and dead-code re-initialisation would then reset codes that are in use); one update per training step
        self.quantize.ema_steps = checkpoint.get("starkit_usage_ema_steps", self.train_step_count)

    def optimize_for_inference(self, compile: bool = True, channels_last: bool = False,
                               mode: Optional[str] = None) -> "MultiScaleVQ":
        """Speed up encode/decode on a GPU (use under bf16 autocast).

        ``torch.compile`` of the CNN encoder and decoder (state-dict keys unchanged) roughly
        doubles throughput on an H200 at 256 px; channels_last helps only compiled and at
        1024 px (figures in docs/tokenizer.md). Returns ``self``.

        Args:
            compile: compile the encoder and decoder in place (``nn.Module.compile``).
            channels_last: convert the weights to channels_last memory format.
            mode: ``torch.compile`` mode (e.g. "max-autotune-no-cudagraphs"; None: the default).
        """
        if channels_last:
            self.to(memory_format=torch.channels_last)
        if compile:
            self.encoder.compile(mode=mode)
            self.decoder.compile(mode=mode)
        return self

    # ------------------------------------------------------------------ training
    def configure_optimizers(self):
        hp = self.hparams
        gen = [p for n, p in self.named_parameters() if not n.startswith(TRAIN_ONLY_PREFIXES) and p.requires_grad]
        groups = [{"params": [p for p in gen if p.ndim >= 2], "weight_decay": hp.weight_decay},
                  {"params": [p for p in gen if p.ndim < 2], "weight_decay": 0.0}]
        opt_g = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas))
        if self.discriminator is None:
            return opt_g
        opt_d = torch.optim.AdamW(self.discriminator.parameters(), lr=hp.disc_lr or hp.lr, betas=tuple(hp.betas),
                                  weight_decay=hp.weight_decay)
        return [opt_g, opt_d]

    def training_step(self, batch: Dict[str, Any], batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        x = batch["image"]  # (B, 3, H, W) in [-1, 1]
        opts = self.optimizers()
        opt_g, opt_d = (opts if isinstance(opts, (list, tuple)) else (opts, None))
        gan_on = self.discriminator is not None and self.train_step_count >= hp.disc_start_step

        rec, vq_loss, indices, hits, f = self(x)
        rec_f, x_f = rec.float(), x.float()
        logs = {"train/l1": (rec_f - x_f).abs().mean(), "train/l2": F.mse_loss(rec_f, x_f), "train/vq": vq_loss}
        nll = hp.l1_weight * logs["train/l1"] + hp.l2_weight * logs["train/l2"]
        if self.perceptual is not None:
            logs["train/perceptual"] = self.perceptual(rec, x)
            nll = nll + hp.perceptual_weight * logs["train/perceptual"]
        loss = nll + hp.vq_weight * vq_loss
        if gan_on:
            g_loss = hinge_g_loss(self.discriminator(rec))
            w = hp.disc_weight * adaptive_gan_weight(nll, g_loss, self.decoder.last_layer, hp.adaptive_weight_max)
            loss = loss + w * g_loss
            logs.update({"train/g_loss": g_loss, "train/gan_weight": w})
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if hp.grad_clip > 0:
            self.clip_gradients(opt_g, gradient_clip_val=hp.grad_clip, gradient_clip_algorithm="norm")
        opt_g.step()

        if gan_on:
            d_loss = hinge_d_loss(self.discriminator(x.detach()), self.discriminator(rec.detach()))
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(d_loss)
            if hp.grad_clip > 0:
                self.clip_gradients(opt_d, gradient_clip_val=hp.grad_clip, gradient_clip_algorithm="norm")
            opt_d.step()
            self._uncount_last_optimizer_step()
            logs["train/d_loss"] = d_loss

        self._track_usage(hits, f)
        logs["train/loss"] = loss
        self.log_dict({k: v.detach().float() for k, v in logs.items()}, prog_bar=False, sync_dist=False)
        self.log("loss", loss.detach(), prog_bar=True)
        self.train_step_count += 1
        return loss.detach()

    def _uncount_last_optimizer_step(self) -> None:
        """Lightning counts every manual ``optimizer.step()`` in ``global_step``; count only the
        autoencoder's, so that ``max_steps`` and checkpoint intervals are training steps."""
        try:
            self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress.total.completed -= 1
        except (AttributeError, RuntimeError):  # no trainer, or another Lightning layout
            pass

    @torch.no_grad()
    def _track_usage(self, hits: List[torch.Tensor], f: torch.Tensor) -> None:
        hp = self.hparams
        self.quantize.update_usage(hits, hp.usage_ema)
        perplexity, dead = self.quantize.usage_stats(hp.dead_code_threshold)
        for k, pn in enumerate(self.patch_nums):
            self.log(f"usage/perplexity_s{k}_{pn}", perplexity[k])
            self.log(f"usage/dead_s{k}_{pn}", dead[k])
        if hp.dead_code_reinit_every and (self.train_step_count + 1) % hp.dead_code_reinit_every == 0:
            n = self.quantize.reinit_dead_codes(f.detach().float().permute(0, 2, 3, 1).reshape(-1, f.shape[1]),
                                                hp.dead_code_threshold)
            self.log("usage/reinit_codes", float(n))

    # ------------------------------------------------------------------ validation
    def _metrics(self):
        if self._val_metrics is None:
            from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure
            self._val_metrics = nn.ModuleDict({"psnr": PeakSignalNoiseRatio(data_range=1.0),
                                               "ssim": StructuralSimilarityIndexMeasure(data_range=1.0)})
        return self._val_metrics.to(self.device)

    def validation_step(self, batch: Dict[str, Any], batch_idx: int) -> None:
        x = batch["image"]
        rec, vq_loss, _, _, _ = self(x)
        rec = rec.float().clamp(-1, 1)
        x01, rec01 = (x.float() + 1) / 2, (rec + 1) / 2  # (B, 3, H, W) in [0, 1]
        m = self._metrics()
        m["psnr"].update(rec01, x01)
        m["ssim"].update(rec01, x01)
        self.log("val/l2", F.mse_loss(rec, x.float()), sync_dist=True)
        self.log("val/vq", vq_loss, sync_dist=True)
        if batch_idx == 0 and self.hparams.num_log_images > 0:
            n = self.hparams.num_log_images
            log_images(self, x01[:n], rec01[:n])

    def on_validation_epoch_end(self) -> None:
        if self._val_metrics is None:
            return
        for name, metric in self._val_metrics.items():
            self.log(f"val/{name}", metric.compute(), prog_bar=True, sync_dist=False)
            metric.reset()


def _ignore_train_only_missing(module: nn.Module, incompatible) -> None:
    """Weights without discriminator / perceptual keys (VAR's files) still load strictly."""
    def train_only(key: str) -> bool:
        return any(key.startswith(p) or f".{p}" in key for p in TRAIN_ONLY_PREFIXES)

    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if not train_only(k)]
