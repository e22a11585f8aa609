"""Fashion-MNIST from the standard idx files (gzipped or not), e.g. Debian's `dataset-fashion-mnist`."""

from __future__ import annotations

import functools
import gzip
import os
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from pakhsh.data.base import ImageDataset, Sample, check_channels, repeat_channels
from pakhsh.data.transforms import random_hflip_tensor

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")  # where `apt-get install dataset-fashion-mnist` puts it
CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# idx type byte -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT")
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class IdxFormatError(ValueError):
    """A file that is not a valid idx file (bad magic, truncated, wrong shape); the message names it."""


def _open(path: Path):
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"  # sniff rather than trust the name
    return gzip.open(path, "rb") if gz else open(path, "rb")


def read_idx(path: str | os.PathLike, expect_ndim: int | None = None) -> np.ndarray:
    """Parse an idx file (plain or gzipped) into an array of its declared dtype and shape.

    Header: two zero bytes, a type byte, a dimension-count byte, then one big-endian uint32 per dimension.
    """
    path = Path(path)
    try:
        with _open(path) as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise IdxFormatError(f"{path}: cannot read idx file: {e}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise IdxFormatError(f"{path}: bad idx magic number {data[:4].hex() or '(empty file)'}")
    ndim = data[3]
    if expect_ndim is not None and ndim != expect_ndim:
        raise IdxFormatError(f"{path}: expected an idx file with {expect_ndim} dimensions, header says {ndim}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IdxFormatError(f"{path}: truncated idx header")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise IdxFormatError(
            f"{path}: idx header declares shape {shape} ({expected} bytes of data) "
            f"but the file holds {len(data) - header}"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="), copy=False)


def _find(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}(.gz) not found in {root}. Install it with "
        "`sudo apt-get install dataset-fashion-mnist` (files go to /usr/share/datasets/fashion-mnist), or pass "
        "root=<folder> holding train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
        "t10k-labels-idx1-ubyte (gzipped or not)"
    )


@functools.lru_cache(maxsize=4)
def load_split(root: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels int64 (N,)) of one split, validated and cached per process."""
    images_path, labels_path = (_find(Path(root), stem) for stem in _FILES[split])
    images = read_idx(images_path, expect_ndim=3)
    labels = read_idx(labels_path, expect_ndim=1)
    if images.dtype != np.uint8 or images.shape[1:] != (28, 28):
        raise IdxFormatError(f"{images_path}: expected uint8 28x28 images, got {images.dtype} {images.shape}")
    if len(images) != len(labels):
        raise IdxFormatError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
    if labels.min() < 0 or labels.max() >= len(CLASS_NAMES):
        raise IdxFormatError(f"{labels_path}: labels outside 0..{len(CLASS_NAMES) - 1}")
    images.setflags(write=False)  # shared by every dataset built from the cache
    return images, labels.astype(np.int64)


class FashionMNIST(ImageDataset):
    """Fashion-MNIST: 60,000 train / 10,000 test greyscale 28x28 clothing images, 10 classes.

    size=28 gives the raw images; size=32 (default) pads 2 pixels of background (black) on each side, the
    usual layout for U-Nets that halve the resolution several times; any other size pads to 32 first and
    then resizes (bicubic, antialiased), so the garment fills the same fraction of the frame as at 32.
    channels=3 repeats the grey channel. Sample keys: "image" (C, size, size) in [-1, 1], "label" int.
    """

    name = "fashion_mnist"
    num_classes = len(CLASS_NAMES)
    class_names = CLASS_NAMES

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        split: Literal["train", "test"] = "train",
        size: int = 32,
        channels: int = 1,
        random_flip: bool = False,
        seed: int | None = 0,
    ) -> None:
        if split not in _FILES:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        self.root = Path(root).expanduser() if root is not None else DEFAULT_ROOT
        if self.root.is_file():  # e.g. data.path naming one of the idx files instead of their folder
            raise NotADirectoryError(
                f"Fashion-MNIST root {self.root} is a file, not a folder: give the folder holding "
                f"{', '.join(_FILES['train'] + _FILES['test'])} (gzipped or not)"
            )
        if not self.root.is_dir():
            _find(self.root, _FILES[split][0])  # raises the install hint
        self.images, self.labels = load_split(str(self.root.resolve()), split)
        self.split = split
        self.image_size = size
        self.channels = check_channels(channels)
        self.random_flip = random_flip
        self.seed = seed

    def __len__(self) -> int:
        return len(self.labels)

    def _get(self, index: int) -> Sample:
        x = torch.from_numpy(self.images[index].astype(np.float32))[None] / 127.5 - 1.0  # (1, 28, 28)
        if self.image_size != 28:
            x = F.pad(x, (2, 2, 2, 2), value=-1.0)  # (1, 32, 32), background is black
        if self.image_size not in (28, 32):
            size = (self.image_size, self.image_size)
            x = F.interpolate(x[None], size=size, mode="bicubic", antialias=True, align_corners=False)[0]
            x = x.clamp(-1.0, 1.0)  # bicubic overshoot
        if self.random_flip:
            x = random_hflip_tensor(x, self.sample_rng(index))
        return {"image": repeat_channels(x, self.channels), "label": int(self.labels[index])}
