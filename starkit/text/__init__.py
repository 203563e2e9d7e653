from .base import TextEmbedding, TextEncoder
