"""``ClassConditioner``: class-conditional generation (VAR) through the text-encoder interface."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from torch import nn

from .base import TextEmbedding, TextEncoder


class ClassConditioner(TextEncoder):
    """A class embedding in place of a text encoder (VAR's ``class_emb``).

    Its "prompts" are class ids as strings (``"207"``); the empty prompt ``""`` is the
    unconditional class ``num_classes`` (VAR's guidance row). ``pooled`` is the class
    embedding ``(B, dim)``; there are no tokens (``tokens`` ``(B, 0, dim)``, ``mask`` ``(B, 0)``),
    so a generator built on it has no cross-attention.

    Args:
        num_classes: number of real classes (VAR: 1000); the table has ``num_classes + 1`` rows.
        dim: embedding width (VAR: the generator's width C).
        weights: a ``.safetensors`` file with ``class_emb.weight`` (``${MODEL_DIR}`` is expanded by
            the model-directory loader); None: random (trunc-normal std sqrt(1/(3 dim))).
        frozen: no gradients, always in eval mode.
    """

    def __init__(self, num_classes: int = 1000, dim: int = 1024, weights: Optional[str] = None,
                 frozen: bool = True) -> None:
        super().__init__(frozen=frozen)
        self.save_hyperparameters()
        self.num_classes, self.dim = int(num_classes), int(dim)
        self.class_emb = nn.Embedding(self.num_classes + 1, self.dim)
        nn.init.trunc_normal_(self.class_emb.weight, std=(1 / self.dim / 3) ** 0.5)
        if weights:
            from safetensors.torch import load_file
            sd = load_file(weights, device="cpu")
            if set(sd) != {"class_emb.weight"} or tuple(sd["class_emb.weight"].shape) != tuple(self.class_emb.weight.shape):
                raise ValueError(f"{weights!r} must hold exactly class_emb.weight of shape "
                                 f"{tuple(self.class_emb.weight.shape)}; got "
                                 f"{ {k: tuple(v.shape) for k, v in sd.items()} }.")
            self.load_state_dict(sd)
        self.freeze_if_needed()

    def class_ids(self, prompts: List[str]) -> torch.Tensor:
        """Prompts -> class ids (``""`` -> ``num_classes``); anything else is a clear error."""
        ids = []
        for p in prompts:
            text = p.strip()
            if text == "":
                ids.append(self.num_classes)
                continue
            try:
                value = int(text)
            except ValueError:
                raise ValueError(f"ClassConditioner prompts are class ids 0..{self.num_classes - 1} as strings "
                                 f"(or \"\" for unconditional); got {p!r}.") from None
            if not 0 <= value < self.num_classes:
                raise ValueError(f"class id {value} is outside 0..{self.num_classes - 1}.")
            ids.append(value)
        return torch.tensor(ids, dtype=torch.long, device=self.class_emb.weight.device)

    def config(self) -> Dict[str, Any]:
        init_args = {k: v for k, v in self.hparams.items() if not k.startswith("_")}
        return {"class_path": f"{type(self).__module__}.{type(self).__qualname__}", "init_args": init_args}

    def _encode(self, prompts: List[str]) -> TextEmbedding:
        pooled = self.class_emb(self.class_ids(prompts)).float()  # (B, dim)
        B = pooled.shape[0]
        return TextEmbedding(tokens=pooled.new_zeros(B, 0, self.dim),
                             mask=torch.zeros(B, 0, dtype=torch.bool, device=pooled.device), pooled=pooled)
