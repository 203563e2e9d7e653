"""starkit: a PyTorch Lightning kit for text-to-image generation by scale-wise autoregression.

Public names are imported lazily so that ``import starkit`` stays light::

    from starkit import StarPipeline, ScaleWiseGenerator, MultiScaleVQ
"""
from importlib import import_module

__version__ = "0.1.0"

_LAZY = {
    "StarPipeline": "starkit.pipeline",
    "ScaleWiseGenerator": "starkit.generator",
    "ScaleTokenizer": "starkit.tokenizers",
    "MultiScaleVQ": "starkit.tokenizers",
    "TextEncoder": "starkit.text",
    "TextEmbedding": "starkit.text",
    "HFTextEncoder": "starkit.text",
    "PositionalEncoding": "starkit.positional",
    "NormalizedRoPE2D": "starkit.positional",
    "RoPE2D": "starkit.positional",
    "LearnedAbsolutePE": "starkit.positional",
    "ScaleSampler": "starkit.samplers",
    "ParallelSampler": "starkit.samplers",
    "CaptionedImageDataModule": "starkit.data",
    "PromptDataModule": "starkit.data",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'starkit' has no attribute {name!r}")
