"""Callbacks: writing predicted images and logging sample grids during validation."""
from .image_logger import ImageGridLogger
from .prediction_writer import ImageWriter
