"""Callbacks: writing predicted images, logging sample grids, data health, and non-finite guards."""
from .image_logger import ImageGridLogger
from .prediction_writer import ImageWriter
from .data_health import DataHealthLogger
from .guards import NonFiniteGuard, NonFiniteLossError
from .shapes_eval import ShapesEvaluator
from .grid_writer import GridWriter
