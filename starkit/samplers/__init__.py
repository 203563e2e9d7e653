"""Samplers: turn one scale's logits (and hidden states) into tokens."""
from .base import ScaleSampler, ScaleStep
from .parallel import ParallelSampler
