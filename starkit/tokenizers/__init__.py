from .base import ScaleTokenizer
