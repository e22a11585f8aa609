"""`DataConfig` -> dataset: one place that knows every dataset name and its defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

from pakhsh.data.base import ImageDataset, Truncated

DATASET_NAMES = ("shapes", "fashion_mnist", "digits", "photos", "folder")
_NATIVE_CHANNELS = {"shapes": 3, "fashion_mnist": 1, "digits": 1, "photos": 3, "folder": 3}


@dataclass
class DataConfig:
    """Which dataset to train or evaluate on, and how to shape its images."""

    name: str = "shapes"  # one of DATASET_NAMES
    path: str | None = None  # folder: required; fashion_mnist: idx folder (default: Debian's location)
    image_size: int = 32
    channels: int | None = None  # None: the dataset's own (1 for fashion_mnist/digits, else 3); 3 repeats grey
    split: Literal["train", "test"] = "train"
    random_flip: bool = False  # not for shapes, whose captions name left and right
    crop: Literal["center", "random"] = "center"  # folder only
    strict: bool = False  # folder only: corrupt files raise instead of being skipped
    length: int | None = None  # shapes/photos: number of samples; others: keep the first `length`
    seed: int = 0  # scene/crop generation (shapes, photos) and augmentation streams


def _shapes(cfg: DataConfig, channels: int) -> ImageDataset:
    from pakhsh.data.builtin.shapes import ShapesDataset

    if cfg.random_flip:
        raise ValueError("shapes: random_flip would contradict the captions and position labels; leave it off")
    return ShapesDataset(split=cfg.split, size=cfg.image_size, length=cfg.length, seed=cfg.seed, channels=channels)


def _fashion_mnist(cfg: DataConfig, channels: int) -> ImageDataset:
    from pakhsh.data.builtin.fashion_mnist import FashionMNIST

    return FashionMNIST(cfg.path, cfg.split, cfg.image_size, channels, cfg.random_flip, cfg.seed)


def _digits(cfg: DataConfig, channels: int) -> ImageDataset:
    from pakhsh.data.builtin.digits import Digits

    return Digits(cfg.split, cfg.image_size, channels, cfg.random_flip, cfg.seed)


def _photos(cfg: DataConfig, channels: int) -> ImageDataset:
    from pakhsh.data.builtin.photos import PhotosDataset

    return PhotosDataset(
        split=cfg.split, size=cfg.image_size, length=cfg.length, seed=cfg.seed, channels=channels,
        random_flip=cfg.random_flip,
    )  # fmt: skip


def _folder(cfg: DataConfig, channels: int) -> ImageDataset:
    from pakhsh.data.image_folder import ImageFolderDataset

    if not cfg.path:
        raise ValueError("data name 'folder' needs data.path: the folder of images to use")
    return ImageFolderDataset(
        cfg.path, cfg.image_size, channels=channels, crop=cfg.crop, random_flip=cfg.random_flip,
        strict=cfg.strict, seed=cfg.seed,
    )  # fmt: skip


_BUILDERS: dict[str, Callable[[DataConfig, int], ImageDataset]] = {
    "shapes": _shapes,
    "fashion_mnist": _fashion_mnist,
    "digits": _digits,
    "photos": _photos,
    "folder": _folder,
}


def native_channels(name: str) -> int:
    """The channels a built-in dataset has when data.channels is not set (1 for grey datasets, else 3)."""
    if name not in _NATIVE_CHANNELS:
        raise ValueError(f"unknown dataset name {name!r}; known: {', '.join(DATASET_NAMES)}")
    return _NATIVE_CHANNELS[name]


def build_dataset(cfg: DataConfig) -> ImageDataset:
    """The dataset `cfg` names. Builders import lazily, so sklearn/skimage load only when needed."""
    if cfg.name not in _BUILDERS:
        raise ValueError(f"unknown dataset name {cfg.name!r}; known: {', '.join(DATASET_NAMES)}")
    if cfg.split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {cfg.split!r}")
    if cfg.length is not None and cfg.length < 1:
        raise ValueError(f"length must be positive, got {cfg.length}")
    channels = cfg.channels if cfg.channels is not None else _NATIVE_CHANNELS[cfg.name]
    ds = _BUILDERS[cfg.name](cfg, channels)
    if cfg.length is not None and cfg.name in ("fashion_mnist", "digits", "folder"):
        ds = Truncated(ds, cfg.length)  # fixed-size datasets: keep the first `length`
    return ds
