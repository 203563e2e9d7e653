"""Samplers: turn one scale's logits (and hidden states) into tokens."""
from .base import HeadTrainingBatch, ScaleSampler, ScaleStep
from .parallel import ParallelSampler
from .stable import StableSampler
