"""Datasets (built-in and image folders), image transforms and the `DataConfig` -> dataset registry.

Every dataset returns dict samples: "image" float32 (C, H, W) in [-1, 1], "label" int where it has classes,
plus documented extras (captions, masks, boxes for shapes; paths for folders).
"""

from pakhsh.data.base import DatasetInfo, ImageDataset, Truncated, dataset_info
from pakhsh.data.registry import DATASET_NAMES, DataConfig, build_dataset
from pakhsh.data.transforms import ImageTransform

__all__ = [
    "DATASET_NAMES",
    "DataConfig",
    "DatasetInfo",
    "ImageDataset",
    "ImageTransform",
    "Truncated",
    "build_dataset",
    "dataset_info",
]
