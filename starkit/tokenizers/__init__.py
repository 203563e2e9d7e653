"""Multi-scale tokenizers: the :class:`ScaleTokenizer` interface and VAR's VQ-VAE."""
from .base import ScaleTokenizer
from .losses import PatchDiscriminator, PerceptualLoss
from .msvq import PATCH_NUMS_256, MultiScaleVQ
from .quantizer import MultiScaleQuantizer, phi_index

__all__ = ["ScaleTokenizer", "MultiScaleVQ", "MultiScaleQuantizer", "PatchDiscriminator", "PerceptualLoss",
           "phi_index", "PATCH_NUMS_256"]
