from .module import ScaleWiseGenerator
from .transformer import SIZES, ScaleTransformer
