"""``ScaleWiseGenerator``: STAR's text-to-image generator as a LightningModule.

The four component families plug in by type (``class_path`` in YAML):

    tokenizer (frozen)  -> indices of every scale, teacher-forcing inputs, decoding
    text_encoder (frozen) -> token features, mask, pooled vector
    positional (factory)  -> absolute embeddings and/or rotary tables
    sampler               -> tokens of one scale from its logits

The generator owns the training loop, the logging, the optimizer and the checkpoint.
Frozen components stay out of its checkpoint and are rebuilt from their own configs.
"""
from __future__ import annotations

import copy
import warnings
from typing import Callable, List, Optional, Sequence, Tuple

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn
import torch

from starkit.generator.generation import GenerationMixin
from starkit.generator.hparams import library_hparams
from starkit.generator.optim import warmup_linear_decay  # noqa: F401  (its former home: kept importable)
from starkit.generator.transformer import ScaleTransformer, resolve_size
from starkit.positional import NormalizedRoPE2D, PositionalEncoding
from starkit.samplers import ParallelSampler, ScaleSampler
from starkit.text import TextEmbedding, TextEncoder
from starkit.tokenizers import ScaleTokenizer
from starkit.utils.losses import token_cross_entropy

PositionalFactory = Callable[[int, int, Sequence[int]], PositionalEncoding]
FROZEN_PREFIXES = ("tokenizer.", "text_encoder.")


class ScaleWiseGenerator(GenerationMixin, L.LightningModule):
    """Scale-wise autoregressive text-to-image generator (STAR / VAR).

    Args:
        tokenizer: the multi-scale VQ tokenizer (frozen; not saved in this checkpoint).
        text_encoder: the text encoder (frozen; not saved in this checkpoint).
        positional: positional-encoding class, called with (width, num_heads, patch_nums)
            (default: STAR's ``NormalizedRoPE2D(norm=64, base=10000)``).
        sampler: how tokens are drawn at generation time (default ``ParallelSampler()``).
        size: named size: tiny, small, d16, d20, d24, d30 (width 64*depth, heads = depth).
        depth: override the size's depth.
        width: override the size's width.
        num_heads: override the size's number of heads.
        patch_nums: scales to generate (default: the tokenizer's). The last one times the
            tokenizer's downsampling is the image side.
        mlp_ratio: FFN width / model width.
        drop_path_rate: stochastic depth of the last block (default 0.1 * depth / 24).
        head_norm: non-affine LayerNorm before the logits head (STAR's ``logit_norm``).
        caption_dropout: share of captions replaced by "" in training (for guidance).
        lr: peak learning rate (AdamW).
        weight_decay: AdamW weight decay on >= 2-D weights (not embeddings or gains).
        betas: AdamW betas.
        warmup_steps: linear warm-up steps; then linear decay to ``final_lr_ratio * lr``.
        final_lr_ratio: learning rate at the last step, relative to ``lr``.
        ema_decay: keep an exponential moving average of the transformer (None: off).
        token_drop: drop this many random tokens of the last scale in each training step
            (STAR at 1024: 651), with the loss on the kept ones.
        activation_checkpointing: recompute block activations in the backward pass.
        attention: training self-attention: "sdpa" (scaled_dot_product_attention with the dense
            block-causal mask) or "flex" (FlexAttention, compiled on CUDA: skips the fully masked
            blocks). Sampling always uses the KV cache without a mask.
        compile: ``torch.compile`` the transformer blocks for the training step (graphs shared by
            the blocks; fuses the float32 QK-norm and rotary, LayerNorms, GELU and residual
            chains) and, at the start of fitting, the frozen tokenizer's encoder (the VQ encoding
            inside the step). The first steps are slow while compiling; validation and sampling
            stay eager. On an H200 (docs/performance.md): d16 @256 1.58x the eager step, d30
            @256 1.56x and d30 @1024 (batch 8) 1.39x the official trainer; not measured at 512 px.
        init_from: a starkit checkpoint, a model directory, or a training run's folder (its newest
            ``last.ckpt``) whose transformer initialises this one (progressive resolution: scales
            may differ). Read when the model is built for training, not by ``load_from_checkpoint``.
        stage: "generator" trains the transformer; "sampler_head" freezes it and trains only
            the sampler's own weights (STAR's stage 4, e.g. ``StableSampler``'s head).
        adaln: VAR's AdaLN blocks and head, conditioned on the pooled vector (class-conditional
            VAR with ``starkit.text.ClassConditioner``).
        cross_attention: cross-attention to the text tokens in every block (False: VAR).
        start_from_condition: "proj" (STAR: start token = Linear(pooled)) or "identity" (VAR: the
            class embedding itself).
    """

    def __init__(
        self,
        tokenizer: ScaleTokenizer,
        text_encoder: TextEncoder,
        positional: Optional[PositionalFactory] = None,
        sampler: Optional[ScaleSampler] = None,
        size: str = "d16",
        depth: Optional[int] = None,
        width: Optional[int] = None,
        num_heads: Optional[int] = None,
        patch_nums: Optional[List[int]] = None,
        mlp_ratio: float = 4.0,
        drop_path_rate: Optional[float] = None,
        head_norm: bool = True,
        caption_dropout: float = 0.1,
        lr: float = 1e-4,
        weight_decay: float = 0.05,
        betas: Tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 0,
        final_lr_ratio: float = 0.01,
        ema_decay: Optional[float] = None,
        token_drop: int = 0,
        activation_checkpointing: bool = False,
        init_from: Optional[str] = None,
        stage: str = "generator",
        adaln: bool = False,
        cross_attention: bool = True,
        start_from_condition: str = "proj",
        attention: str = "sdpa",
        compile: bool = False,
    ) -> None:
        super().__init__()
        hparams = library_hparams(type(self), locals())
        self.save_hyperparameters(hparams) if hparams is not None else self.save_hyperparameters()
        self.strict_loading = False  # frozen components are not in the checkpoint; keys are checked below

        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self._freeze(self.tokenizer)
        self._freeze(self.text_encoder)
        if patch_nums is not None:
            tokenizer.check_patch_nums(patch_nums)
            tokenizer.set_patch_nums(patch_nums)
        self.patch_nums = tuple(tokenizer.patch_nums)
        self.sampler = sampler if sampler is not None else ParallelSampler()
        if stage not in ("generator", "sampler_head"):
            raise ValueError(f"stage must be 'generator' or 'sampler_head', got {stage!r}.")

        arch = resolve_size(size, depth, width, num_heads)
        if drop_path_rate is None:
            drop_path_rate = 0.1 * arch["depth"] / 24
        positional = positional or NormalizedRoPE2D
        self.transformer = ScaleTransformer(
            self.patch_nums, tokenizer.codebook_size, tokenizer.embed_dim,
            text_encoder.dim if cross_attention else None,
            arch["depth"], arch["width"], arch["num_heads"],
            positional(arch["width"], arch["num_heads"], self.patch_nums),
            mlp_ratio=mlp_ratio, drop_path_rate=drop_path_rate, head_norm=head_norm,
            cond_dim=text_encoder.dim, adaln=adaln, start_from_condition=start_from_condition,
        )
        self.transformer.activation_checkpointing = activation_checkpointing
        self.transformer.attention = attention  # validated by the transformer
        self.transformer.compile_blocks = bool(compile)
        self.sampler.build(arch["width"], text_encoder.dim, tokenizer.embed_dim, tokenizer.codebook_size,
                           arch["num_heads"], self.patch_nums)
        if stage == "sampler_head":
            if not any(True for _ in self.sampler.parameters()):
                raise ValueError(f"stage='sampler_head' needs a sampler with weights; {type(self.sampler).__name__} "
                                 f"has none (use starkit.samplers.StableSampler).")
            self._freeze(self.transformer)
        last = self.patch_nums[-1] ** 2
        if not 0 <= token_drop < last:
            raise ValueError(f"token_drop={token_drop} must be in [0, {last}) (the last scale has {last} tokens).")
        self.ema = None
        if ema_decay is not None:
            self.ema = copy.deepcopy(self.transformer).requires_grad_(False).eval()  # Lightning never calls train()
            if stage == "sampler_head":
                rank_zero_warn("ema_decay has no effect with stage='sampler_head': the transformer is frozen, so "
                               "its EMA stays equal to it (kept for the checkpoint's layout, not updated), and the "
                               "sampler head trains without an EMA. Drop ema_decay to save the copy's memory.")
        if init_from:
            from starkit.generator.progressive import init_transformer_from
            init_transformer_from(self, init_from)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, *args, **kwargs):
        """Lightning's ``load_from_checkpoint``, without re-reading ``init_from``: the checkpoint holds the
        trained weights, so the run it started from (perhaps moved or deleted since) is not needed.
        Pass ``init_from=...`` explicitly to read it anyway."""
        kwargs.setdefault("init_from", None)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    # ------------------------------------------------------------------ components
    @staticmethod
    def _freeze(module: torch.nn.Module) -> None:
        module.eval()
        for p in module.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.tokenizer.eval()  # frozen parts never leave eval mode
        self.text_encoder.eval()
        if self.hparams.stage == "sampler_head":
            self.transformer.eval()
        if self.ema is not None:
            self.ema.eval()
        return self

    def _rebuildable_prefixes(self) -> Tuple[str, ...]:
        """Frozen components that can be rebuilt from a source of their own (a weights file,
        a hub id or local folder, a seed) stay out of the checkpoint; one without (e.g. a
        tokenizer with random weights) is saved so that the checkpoint stays complete."""
        prefixes = []
        if getattr(self.tokenizer, "hparams", {}).get("pretrained"):
            prefixes.append("tokenizer.")
        if hasattr(self.text_encoder, "config"):
            prefixes.append("text_encoder.")
        return tuple(prefixes)

    def state_dict(self, *args, **kwargs):
        """The trainable parts (transformer, EMA, sampler weights); frozen components are rebuilt
        from their own configs and files (see :meth:`_rebuildable_prefixes`)."""
        full = super().state_dict(*args, **kwargs)
        prefixes = self._rebuildable_prefixes()
        for key in [k for k in full if prefixes and k.startswith(prefixes)]:
            del full[key]
        return full

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``, where ``strict`` does not ask for the frozen components that
        :meth:`state_dict` leaves out (they keep their weights), so ``load_state_dict(other.state_dict())``
        works; any other missing or unexpected key is still an error."""
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        if strict:
            prefixes = self._rebuildable_prefixes()
            missing = [k for k in result.missing_keys if not (prefixes and k.startswith(prefixes))]
            if missing or result.unexpected_keys:
                raise RuntimeError(f"Error(s) in loading state_dict for {type(self).__name__}: missing keys "
                                   f"{missing[:8]}{' ...' if len(missing) > 8 else ''}, unexpected keys "
                                   f"{result.unexpected_keys[:8]}{' ...' if len(result.unexpected_keys) > 8 else ''}.")
        return result

    def setup(self, stage: str) -> None:
        """Fail before the first step when the data's resolution does not fit the scales, or the trainer's
        precision casts the frozen tokenizer off float32."""
        from starkit.callbacks.guards import check_data_fits_model, check_precision
        check_data_fits_model(self, getattr(self.trainer, "datamodule", None))
        if stage in ("fit", "validate", "test"):
            check_precision(self)

    def on_fit_start(self) -> None:
        if self.hparams.get("compile"):
            self.compile_tokenizer_encoder()

    def on_validation_end(self) -> None:
        if self.trainer is not None and self.trainer.state.fn == "fit":  # training goes on: free the cast copies
            from starkit.utils.inference_cache import clear_inference_caches
            clear_inference_caches(self)

    def compile_tokenizer_encoder(self) -> None:
        """``torch.compile`` the frozen tokenizer's CNN encoder in place (idempotent; tokenizers
        without an ``encoder`` module are left as they are)."""
        encoder = getattr(self.tokenizer, "encoder", None)
        if isinstance(encoder, torch.nn.Module) and getattr(encoder, "_compiled_call_impl", None) is None:
            encoder.compile()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Record the sampler as it is now: one swapped in (``generator.sampler = StableSampler(...)``) or with a
        setting changed on the object after construction is what ``load_from_checkpoint`` rebuilds (the
        constructor's sampler would not take the ``sampler.*`` weights, or would sample with old settings)."""
        hparams = checkpoint.get(self.CHECKPOINT_HYPER_PARAMS_KEY)
        if isinstance(hparams, dict) and "sampler" in hparams:
            from starkit.pipeline import sampler_config
            try:
                hparams["sampler"] = sampler_config(self.sampler)  # a copy of self.hparams: the key is replaced
            except ValueError as err:  # an invalid setting assigned on the object: keep the recorded sampler
                warnings.warn(f"The checkpoint keeps the sampler's recorded settings: the current ones are invalid "
                              f"({err}).", UserWarning, stacklevel=2)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        from starkit.generator.hparams import check_state_dict_keys
        sd, own = checkpoint["state_dict"], super().state_dict()
        missing_sampler = [k for k in own if k.startswith("sampler.") and k not in sd]
        if missing_sampler:  # e.g. a stable sampler on a checkpoint trained without its head
            warnings.warn(f"The checkpoint has no weights for {len(missing_sampler)} sampler tensors "
                          f"(e.g. {missing_sampler[0]}); they keep their initial values (a StableSampler "
                          f"without a trained head samples in parallel). Train the head with stage: sampler_head.")
            for k in missing_sampler:
                sd[k] = own[k]
        check_state_dict_keys(self, sd)
        # the frozen parts were loaded from their own files: complete the state dict with them
        for key, value in own.items():
            sd.setdefault(key, value)

    # ------------------------------------------------------------------ training
    def _encode_batch(self, batch: dict) -> Tuple[List[torch.Tensor], TextEmbedding]:
        captions = list(batch["caption"])
        if self.training and self.hparams.caption_dropout > 0:
            drop = torch.rand(len(captions)) < self.hparams.caption_dropout
            captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        with torch.no_grad():
            indices = batch.get("indices")
            if indices is None:
                indices = self.tokenizer.encode(batch["image"])
            elif torch.is_tensor(indices):  # pre-tokenized rows (B, L): starkit.data.TokenizedDataModule
                indices = self._split_scales(indices)
            text = self.text_encoder.encode(captions).to(self.device)
        return [i.to(self.device) for i in indices], text

    def _split_scales(self, rows: torch.Tensor) -> List[torch.Tensor]:
        """Token rows ``(B, L)`` -> the K maps ``(B, pn_k**2)``, with one clear error for another scale set."""
        sizes = [p * p for p in self.patch_nums]
        if rows.dim() != 2 or rows.shape[1] != sum(sizes):
            raise ValueError(f"pre-tokenized batch of shape {tuple(rows.shape)} does not fit this generator's scales "
                             f"{self.patch_nums} ({sum(sizes)} tokens per image): tokenize the data again with "
                             f"these patch_nums (starkit tokenize --patch-nums ...).")
        return list(rows.long().split(sizes, dim=1))

    def _keep_positions(self) -> Optional[torch.Tensor]:
        drop = self.hparams.token_drop
        if not self.training or drop == 0:
            return None
        L_total, last = self.transformer.seq_len, self.patch_nums[-1] ** 2
        start = L_total - last
        kept_last = torch.randperm(last, device=self.device)[: last - drop].sort().values + start
        return torch.cat([torch.arange(start, device=self.device), kept_last])

    def _loss(self, batch: dict, stage: str) -> torch.Tensor:
        if self.hparams.stage == "sampler_head":
            return self._sampler_head_loss(batch, stage)
        indices, text = self._encode_batch(batch)
        with torch.no_grad():
            inputs = self.tokenizer.teacher_forcing_inputs(indices)  # (B, L - first_l, Cvae)
        keep = self._keep_positions()
        hidden = self.transformer(text.pooled, text.tokens, text.mask, inputs, keep)  # (B, L', C)
        logits = self.transformer.logits(hidden)  # (B, L', V)
        targets = torch.cat(indices, dim=1)  # (B, L)
        if keep is not None:
            targets = targets[:, keep]
        token_loss = token_cross_entropy(logits, targets)  # (B, L')
        loss = token_loss.mean()
        self._log_per_scale(stage, token_loss.detach(), logits.detach(), targets, keep)
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=targets.shape[0], sync_dist=stage != "train")
        return loss

    def _sampler_head_loss(self, batch: dict, stage: str) -> torch.Tensor:
        from starkit.samplers import HeadTrainingBatch
        indices, text = self._encode_batch(batch)
        with torch.no_grad():
            inputs = self.tokenizer.teacher_forcing_inputs(indices)
            hidden = self.transformer(text.pooled, text.tokens, text.mask, inputs)  # (B, L, C), frozen
        head_batch = HeadTrainingBatch(hidden=hidden, indices=indices, pooled_text=text.pooled,
                                       patch_nums=self.patch_nums, embed=self.tokenizer.embed,
                                       rotary=self.transformer.positional.rotary)
        if stage == "train":
            loss, logs = self.sampler.training_loss(head_batch)
        else:  # the loss draws its reveal masks: from a copy of the random state, so that validation leaves
            # training's draws (caption dropout, masks, drop path) as they would have been without it
            devices = [self.device] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                loss, logs = self.sampler.training_loss(head_batch)
        B = indices[0].shape[0]
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=B, sync_dist=stage != "train")
        for name, value in logs.items():
            self.log(f"{stage}/{name}", value, batch_size=B, sync_dist=stage != "train")
        return loss

    def _log_per_scale(self, stage, token_loss, logits, targets, keep) -> None:
        levels = self.transformer.levels if keep is None else self.transformer.levels[keep]
        K = len(self.patch_nums)
        correct = (logits.argmax(-1) == targets).float().mean(0)  # (L',)
        count = torch.zeros(K, device=levels.device).index_add_(0, levels, torch.ones_like(levels, dtype=torch.float))
        loss_k = torch.zeros(K, device=levels.device).index_add_(0, levels, token_loss.mean(0)) / count
        acc_k = torch.zeros(K, device=levels.device).index_add_(0, levels, correct) / count
        B = targets.shape[0]
        self.log(f"{stage}/acc", correct.mean(), batch_size=B, sync_dist=stage != "train")
        for k in range(K):
            self.log(f"{stage}/loss_s{k}", loss_k[k], batch_size=B, sync_dist=stage != "train")
            self.log(f"{stage}/acc_s{k}", acc_k[k], batch_size=B, sync_dist=stage != "train")

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._loss(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._loss(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._loss(batch, "test")

    def configure_model(self) -> None:
        """Idempotent; runs before a strategy wraps the model: the parameters' original shapes are
        recorded for ``configure_optimizers`` (FSDP shows 1-D shards). The layers themselves are
        built in ``__init__`` (``load_from_checkpoint``, ``init_from`` and the sampler need them)."""
        from starkit.generator.distributed import record_param_shapes
        record_param_shapes(self)

    def optimizer_step(self, *args, **kwargs) -> None:
        """The optimizer step, then the EMA update: once per optimizer step (not per micro-batch under
        ``accumulate_grad_batches``), and before the callbacks' ``on_train_batch_end``, where ModelCheckpoint
        saves: a checkpoint holds the EMA of the weights it holds, and a resumed run continues it exactly."""
        super().optimizer_step(*args, **kwargs)
        self._update_ema()

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self._trainer is None:  # a loop of one's own, without a Trainer: one EMA update per call
            self._update_ema()

    def _update_ema(self) -> None:
        # the sampler_head stage freezes the transformer: its EMA stays equal to it, and an update would only
        # read and write every weight (3 x 8 GB per step at d30)
        if self.ema is not None and self.hparams.stage != "sampler_head":  # sharded alike under FSDP (distributed.py)
            from starkit.generator.distributed import ema_update
            ema_update(self, self.hparams.ema_decay)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip by global norm ourselves: Lightning refuses ``gradient_clip_val`` with a fused
        AdamW (used on CUDA). Gradients are already unscaled here under fp16-mixed."""
        if not gradient_clip_val:
            return
        if gradient_clip_algorithm not in (None, "norm"):
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        from starkit.generator.distributed import clip_grad_norm
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        clip_grad_norm(self, params, float(gradient_clip_val))  # FSDP: the norm over all shards

    def _fused_adamw(self) -> bool:
        """Fused AdamW on CUDA, except under fp16 with a gradient scaler (it would unscale inside
        the step, after our clipping)."""
        precision = str(getattr(self._trainer, "precision", "")) if self._trainer else ""
        return torch.cuda.is_available() and precision not in ("16-mixed", "16")

    def configure_optimizers(self):
        from starkit.generator.optim import adamw_with_warmup_decay
        trained = self.sampler if self.hparams.stage == "sampler_head" else self.transformer
        return adamw_with_warmup_decay(self, trained, "sampler." if trained is self.sampler else "transformer.",
                                       fused=self._fused_adamw())
