"""STAR's stable (causal) sampler: the large scales are revealed over several steps.

Small scales are drawn in parallel exactly as :class:`~starkit.samplers.ParallelSampler`.
On the last ``causal_scales`` scales the ``pn**2`` tokens are revealed over ``steps`` steps
(``steps_last`` on the last scale) with a MaskGIT arccos schedule. At each step every hidden
token is drawn from the (guided, filtered) logits of the **sampler head**, which sees the
tokens revealed so far; the first ``random_steps`` steps keep tokens at random positions,
later steps the most confident ones (probability of the drawn token).

Without trained head weights (``use_head=True`` but the head was never trained or loaded)
the sampler warns once and samples every scale in parallel. With ``use_head=False`` the
causal reveal runs on the generator's own logits.
"""
from __future__ import annotations

import inspect
import math
import warnings
from typing import List, Optional

import torch

from starkit.samplers.base import HeadTrainingBatch, ScaleSampler, ScaleStep
from starkit.samplers.functional import (apply_guidance, candidates, draw, guidance_weight, uniform_noise,
                                         validate_settings)
from starkit.utils.losses import token_cross_entropy

SCHEDULES = ("arccos", "cosine", "linear", "root", "square")


def _takes_positions(head) -> bool:
    """Whether a head callable accepts ``positions=`` (SamplerHead does; a user's head may not). A module is
    judged by its ``forward`` (its ``__call__`` takes anything)."""
    fn = head.forward if isinstance(head, torch.nn.Module) else head
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "positions" or p.kind is p.VAR_KEYWORD for p in params)


def _take(rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``rows[b, positions[b]]``: ``(N, l, ...)`` and ``(N, h)`` -> ``(N, h, ...)``."""
    index = positions.reshape(*positions.shape, *([1] * (rows.dim() - 2))).expand(-1, -1, *rows.shape[2:])
    return rows.gather(1, index)


def mask_fraction(r: torch.Tensor, mode: str = "arccos") -> torch.Tensor:
    """MaskGIT's schedule functions of ``r`` in [0, 1] (official ``Scheduler._get_vals_to_mask``)."""
    if mode == "arccos":
        return torch.arccos(r) / (math.pi * 0.5)
    if mode == "cosine":
        return torch.cos(r * math.pi * 0.5)
    if mode == "linear":
        return 1 - r
    if mode == "root":
        return 1 - r.sqrt()
    if mode == "square":
        return 1 - r ** 2
    raise ValueError(f"Unknown schedule {mode!r}: choose one of {SCHEDULES}.")


def reveal_schedule(num_tokens: int, steps: int, mode: str = "arccos") -> List[int]:
    """Number of tokens revealed at each step: >= 1 per step, summing exactly to ``num_tokens``.

    ``w_s = f(r_s)`` with ``r = linspace(1, 0, steps)`` and f the schedule function
    (arccos: ``arccos(r) / (pi/2)``); ``n_s = round(w_s / sum(w) * num_tokens)``, zeros raised
    to 1, and the rounding remainder put on the last step (taken from the largest steps
    when the rounding overshoots, never below 1). ``steps`` is capped at ``num_tokens``.
    """
    if num_tokens < 1 or steps < 1:
        raise ValueError(f"reveal_schedule needs num_tokens >= 1 and steps >= 1, got {num_tokens}, {steps}.")
    steps = min(steps, num_tokens)
    if steps == 1:
        return [num_tokens]
    w = mask_fraction(torch.linspace(1, 0, steps, dtype=torch.float64), mode)
    counts = (w / w.sum() * num_tokens).round().long().clamp_min(1).tolist()
    diff = num_tokens - sum(counts)
    if diff >= 0:
        counts[-1] += diff
    while diff < 0:  # overshoot: take from the largest step (last one on ties), keeping >= 1
        i = max(range(steps), key=lambda s: (counts[s], s))
        take = min(-diff, counts[i] - 1)
        counts[i] -= take
        diff += take
    return counts


def keep_ratio(batch: int, mode: str = "arccos", device=None) -> torch.Tensor:
    """Per-sample share of ground-truth tokens kept visible in head training: ``f(U)``, U ~ U(0, 1)
    (official ``add_mask_for_training``; arccos: mean 2/pi)."""
    return mask_fraction(torch.rand(batch, device=device), mode)


class StableSampler(ScaleSampler):
    """STAR's stable sampler (causal reveal on the large scales with a sampler head).

    Args:
        cfg: classifier-free guidance strength (0 turns guidance off).
        cfg_schedule: "linear" (t = cfg * k / (K - 1)) or "constant"; the same t is used
            for the head's logits at scale k.
        top_k: keep the k most likely tokens (None: all).
        top_p: nucleus threshold in (0, 1] (None or 1: off).
        temperature: logits are divided by it before sampling.
        causal_scales: the last N scales are revealed causally; earlier ones in parallel.
        steps: reveal steps on the causal scales but the last.
        steps_last: reveal steps on the last scale.
        random_steps: the first steps keep tokens at random positions; later ones by confidence.
        schedule: reveal schedule (MaskGIT): "arccos" (STAR), "cosine", "linear", "root", "square".
        head_depth: blocks of the sampler head (STAR: 3).
        use_head: predict with the sampler head; False: causal reveal on the generator's logits.
        compile_head: run the head's blocks under ``torch.compile`` when sampling (dynamic shapes: a
            graph for all rows and one for the hidden rows serve every scale, batch size and reveal step, plus
            single-row forms). The first sampling call compiles (tens of seconds on a GPU). H200, d30 @1024,
            with ``generate(compile_blocks=True)``, CUDA graphs and the compiled decoder and CLIP: 0.4075 s at
            batch 1 (0.4013 s with ``cuda_graphs="whole"``) and 0.3662 s/image at batch 16 (docs/performance.md,
            eighth comparison; the head through the blocks' regions instead: 0.5145 s and 0.3809 s/image in the
            fifth, against 0.4433 s and 0.3785 s/image then).
        head_graphs: under ``generate(cuda_graphs=True)``, replay the head's reveal steps from CUDA graphs
            (:mod:`starkit.samplers.head_graphs`: at batch 1 the host launches a step no faster than the GPU runs
            it: 0.4574 -> 0.4290 s at d30 @1024 batch 1 on an H200, no change at batch 16); their static buffers
            hold each causal scale's head input and logits (peak memory 95.8 -> 99.6 GiB at d30 @1024 batch 16).
            False: the steps are launched from Python.
    """

    has_weights = True

    def __init__(self, cfg: float = 4.0, cfg_schedule: str = "linear", top_k: Optional[int] = 600,
                 top_p: Optional[float] = 0.8, temperature: float = 1.0, causal_scales: int = 5, steps: int = 8,
                 steps_last: int = 15, random_steps: int = 5, schedule: str = "arccos", head_depth: int = 3,
                 use_head: bool = True, compile_head: bool = False, head_graphs: bool = True) -> None:
        super().__init__()
        self.cfg, self.cfg_schedule = cfg, cfg_schedule
        self.top_k, self.top_p, self.temperature = top_k, top_p, temperature
        self.causal_scales, self.steps, self.steps_last = causal_scales, steps, steps_last
        self.random_steps, self.schedule = random_steps, schedule
        self.head_depth, self.use_head, self.compile_head = head_depth, use_head, compile_head
        self.head_graphs = head_graphs
        self.validate()
        self.save_hyperparameters("cfg", "cfg_schedule", "top_k", "top_p", "temperature", "causal_scales", "steps",
                                  "steps_last", "random_steps", "schedule", "head_depth", "use_head", "compile_head",
                                  "head_graphs")
        self.head = None
        # 1 once the head has been trained or loaded (saved with the weights)
        self.register_buffer("head_trained", torch.zeros((), dtype=torch.long))
        self._warn_state = {"warned": False}  # shared by with_settings copies: warn once
        # host copy of head_trained (None: not read yet), shared by with_settings copies (they share the
        # buffer): generate(cfg=...) makes a copy per call, which must not read the GPU again
        self._trained_host = {"value": None}

    def validate(self) -> None:
        validate_settings(self.cfg, self.top_k, self.top_p, self.temperature, self.cfg_schedule)
        for name in ("causal_scales", "steps", "steps_last", "head_depth"):
            if int(getattr(self, name)) < (0 if name == "causal_scales" else 1):
                raise ValueError(f"{name} must be >= {0 if name == 'causal_scales' else 1}, got {getattr(self, name)}.")
        if self.random_steps < 0:
            raise ValueError(f"random_steps must be >= 0, got {self.random_steps}.")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}.")

    # ------------------------------------------------------------------ weights
    def build(self, width: int, text_dim: int, latent_dim: int, vocab_size: int, num_heads: int,
              patch_nums: tuple) -> None:
        from starkit.samplers.head import SamplerHead
        self.head = SamplerHead(width, text_dim, latent_dim, vocab_size, num_heads, len(patch_nums),
                                depth=self.head_depth)

    def no_weight_decay(self) -> set:
        return {"head.pos_start", "head.lvl_embed.weight"}

    @property
    def head_ready(self) -> bool:
        """Whether the head has trained weights. Read from the buffer once and then kept on the host
        (reset when a state dict is loaded), so sampling does not wait on the GPU at every scale."""
        if self.head is None:
            return False
        if self._trained_host["value"] is None:
            self._trained_host["value"] = bool(self.head_trained.item())
        return self._trained_host["value"]

    def _load_from_state_dict(self, *args, **kwargs):
        self._trained_host["value"] = None  # the buffer may change: read it again when next asked
        return super()._load_from_state_dict(*args, **kwargs)

    def _scale_predictor(self, step: ScaleStep):
        """``predict(shown, positions)`` for the reveal steps of one scale: revealed embeddings ``(B, l, Cvae)``
        (shared by the guided halves) and the positions ``(R, h)`` of the wanted rows (None: all) -> float32
        logits ``(R, h, V)``. A :class:`SamplerHead` forms what stays fixed over the scale once
        (:meth:`SamplerHead.for_scale`: compiled blocks with ``compile_head``, compiled regions under
        ``generate(compile_blocks=True)``); another head is called with the whole inputs at each step."""
        from starkit.samplers.head import SamplerHead  # (not at the top: head.py imports the generator's blocks)
        head = self.head
        if isinstance(head, SamplerHead):
            graphs = None
            if step.graph_store is not None and self.head_graphs:  # generate(cuda_graphs=True): steps from graphs
                from starkit.samplers.head_graphs import HeadStepGraphs
                graphs = step.graph_store.setdefault("sampler_head", HeadStepGraphs())
            return head.for_scale(step.hidden, step.pooled_text, step.scale, step.rotary_first, step.rotary,
                                  fused=step.compile_blocks, compiled=self.compile_head, graphs=graphs,
                                  largest_tokens=step.max_patch_num ** 2 if step.max_patch_num else None)
        gathers = _takes_positions(head)

        def predict(shown: torch.Tensor, positions: Optional[torch.Tensor]) -> torch.Tensor:
            rows = torch.cat([shown, shown], dim=0) if step.guided else shown  # both halves share the tokens
            if gathers:
                return head(step.hidden, rows, step.pooled_text, step.scale, step.rotary_first, step.rotary,
                            positions=positions)  # (R, h, V)
            logits = head(step.hidden, rows, step.pooled_text, step.scale, step.rotary_first, step.rotary)
            return logits if positions is None else _take(logits, positions)  # all logits, then the hidden rows
        return predict

    def causal_scale_ids(self, num_scales: int) -> range:
        return range(max(num_scales - self.causal_scales, 0), num_scales)

    # ------------------------------------------------------------------ sampling
    def _candidates(self, logits: torch.Tensor, t: float, guided: bool):
        return candidates(apply_guidance(logits, t, guided), self.top_k, self.top_p, self.temperature)

    def _parallel(self, step: ScaleStep, t: float):
        idx, _ = draw(self._candidates(step.logits, t, step.guided), step.generator)  # (B, l)
        return step.embed(idx), idx

    def sample_scale(self, step: ScaleStep):
        t = guidance_weight(self.cfg, step.scale, step.num_scales, self.cfg_schedule)
        if step.scale not in self.causal_scale_ids(step.num_scales):
            return self._parallel(step, t)
        if self.use_head and not self.head_ready:
            if not self._warn_state["warned"]:
                self._warn_state["warned"] = True
                warnings.warn("StableSampler: the sampler head has no trained weights (train it with "
                              "stage='sampler_head', or load a checkpoint that has them); sampling every scale "
                              "in parallel instead (ParallelSampler behaviour).", UserWarning, stacklevel=2)
            return self._parallel(step, t)
        return self._causal(step, t)

    def _causal(self, step: ScaleStep, t: float):
        """Reveal the scale's tokens over the schedule's steps. Only the still hidden tokens are drawn:
        the head's logits, the guidance, the top-k/top-p filtering and the draw run on the ``h`` hidden
        rows of each sample (a third fewer on average with the arccos schedule), its blocks on all."""
        R, l = step.logits.shape[:2]
        B = R // 2 if step.guided else R
        device, gen = step.logits.device, step.generator
        n_steps = self.steps_last if step.scale == step.num_scales - 1 else self.steps
        counts = reveal_schedule(l, n_steps, self.schedule)
        idx = torch.zeros(B, l, dtype=torch.long, device=device)
        shown = torch.zeros(B, l, step.codebook.shape[-1], device=device, dtype=torch.float32)  # (B, l, Cvae)
        hidden_pos = torch.arange(l, device=device).expand(B, l)  # (B, h): positions not revealed yet, ascending
        predict = self._scale_predictor(step) if self.use_head else None
        all_cands = None
        for s, count in enumerate(counts):
            h = hidden_pos.shape[1]
            if self.use_head:
                pos = None if h == l else (torch.cat([hidden_pos, hidden_pos]) if step.guided else hidden_pos)
                logits = predict(shown, pos)  # (R, h, V)
                drawn, confidence = draw(self._candidates(logits, t, step.guided), gen)  # (B, h) each
            else:  # the generator's logits do not change within the scale: filter once, draw the hidden rows
                if all_cands is None:
                    all_cands = self._candidates(step.logits, t, step.guided)  # (B, l, k)
                cands = all_cands if h == l else type(all_cands)(*(None if c is None else _take(c, hidden_pos)
                                                                   for c in all_cands))
                drawn, confidence = draw(cands, gen)  # (B, h) each: token ids, probability of the drawn token
            if count >= h:  # reveal everything left: no choice to make, no random draw
                idx.scatter_(1, hidden_pos, drawn)
                break
            score = uniform_noise(confidence, generator=gen) if s < self.random_steps else confidence  # (B, h)
            pick = score.topk(count, dim=-1).indices  # (B, count) among the hidden rows
            new_pos, new_tok = hidden_pos.gather(1, pick), drawn.gather(1, pick)  # (B, count) each
            idx.scatter_(1, new_pos, new_tok)
            if self.use_head:
                shown.scatter_(1, new_pos[..., None].expand(-1, -1, shown.shape[-1]), step.embed(new_tok).float())
            # the rest, still ascending: picked positions pushed past the end by a sort (no host sync)
            hidden_pos = hidden_pos.scatter(1, pick, l).sort(dim=1).values[:, :h - count]
        return step.embed(idx), idx  # (B, l, Cvae), (B, l)

    # ------------------------------------------------------------------ training (stage 'sampler_head')
    def training_loss(self, batch: HeadTrainingBatch):
        """Cross-entropy of the head on the hidden tokens of the causal scales.

        For each causal scale, each sample keeps a share ``arccos(U) / (pi/2)`` of its
        ground-truth tokens visible (the rest are zeros); the head predicts all tokens and
        the loss is the mean cross-entropy over the hidden ones. Each scale runs on its own
        ``[prefix; scale]`` sequence, exactly as at sampling time.
        """
        if self.head is None:
            raise RuntimeError("StableSampler.training_loss needs the head: the generator calls build() first.")
        patch_nums = tuple(batch.patch_nums)
        K = len(patch_nums)
        starts = [0]
        for pn in patch_nums:
            starts.append(starts[-1] + pn * pn)
        rot_fn = batch.rotary
        rotary_first = rot_fn(slice(0, 1)) if rot_fn is not None else None
        total_loss, total_hidden, total_correct = 0.0, 0, 0
        for k in self.causal_scale_ids(K):
            gt = batch.indices[k]  # (B, l)
            B, l = gt.shape
            keep = torch.rand(B, l, device=gt.device) < keep_ratio(B, self.schedule, gt.device)[:, None]  # (B, l)
            shown = batch.embed(gt).float() * keep[..., None]  # (B, l, Cvae)
            hidden = batch.hidden[:, starts[k]:starts[k + 1]]  # (B, l, C)
            rotary = rot_fn(slice(starts[k], starts[k + 1])) if rot_fn is not None else None
            logits = self.head(hidden, shown, batch.pooled_text, k, rotary_first, rotary)  # (B, l, V)
            loss = token_cross_entropy(logits, gt)  # (B, l)
            target = ~keep
            total_loss = total_loss + (loss * target).sum()
            total_hidden = total_hidden + target.sum()  # tensors: no host sync per scale
            total_correct = total_correct + ((logits.argmax(-1) == gt) & target).sum()
        if self.training:
            self.head_trained.fill_(1)
            self._trained_host["value"] = True
        if not torch.is_tensor(total_loss):
            return torch.zeros((), requires_grad=True), {"head_acc": torch.tensor(0.0), "head_hidden": torch.tensor(0.0)}
        n = torch.as_tensor(total_hidden).clamp(min=1).float()
        return total_loss / n, {"head_acc": total_correct / n, "head_hidden": torch.as_tensor(total_hidden).float()}
