from .base import PositionalEncoding, token_grid
