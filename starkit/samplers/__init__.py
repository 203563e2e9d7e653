from .base import ScaleSampler, ScaleStep
