"""Data modules: captioned images for training, prompts for ``predict``.

    from starkit.data import CaptionedImageDataModule, PromptDataModule
"""
from .captioned import CaptionedImageDataModule, CaptionedImageDataset
from .images import load_rgb, var_transform
from .prompts import PromptDataModule, expected_output_path

__all__ = [
    "CaptionedImageDataModule",
    "CaptionedImageDataset",
    "PromptDataModule",
    "expected_output_path",
    "load_rgb",
    "var_transform",
]
from .shapes import ShapesDataModule, ShapesWorld  # noqa: E402
from .webdataset import WebDatasetDataModule, WebDatasetStream  # noqa: E402
from .tokens import TokenizedDataModule, TokenizedDataset, tokenize_dataset  # noqa: E402
