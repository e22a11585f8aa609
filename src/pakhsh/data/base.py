"""What every pakhsh dataset shares: the sample format, metadata attributes and seeded per-sample randomness.

Sample format (every dataset): `ds[i]` is a dict with
    "image": float32 tensor (C, H, W) in [-1, 1]
    "label": int class index, where the dataset has classes
plus dataset-specific extra keys (documented on each class). Values are tensors, ints or strs so that
torch's default collate batches them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

Sample = dict[str, Any]


class ImageDataset(Dataset):
    """Base class: metadata attributes plus deterministic augmentation randomness.

    Subclasses set `name`, `image_size`, `channels`, `num_classes`, `class_names`, `seed` and implement
    `__len__` and `_get(index)`. Augmentation randomness for sample i comes from `sample_rng(i)`, which is
    a function of (seed, epoch, i): identical across DataLoader workers and reruns, yet different per epoch
    once the trainer calls `set_epoch` (as with `DistributedSampler`). With `seed=None` it draws from torch's
    global RNG instead, which DataLoader reseeds per worker.
    """

    name: str = "dataset"
    image_size: int
    channels: int
    num_classes: int | None = None
    class_names: list[str] | None = None
    seed: int | None = 0
    epoch: int = 0

    def __len__(self) -> int:
        raise NotImplementedError

    def _get(self, index: int) -> Sample:
        raise NotImplementedError

    def __getitem__(self, index: int) -> Sample:
        return self._get(self._check_index(index))

    def _check_index(self, index: int) -> int:
        """Normalise a (possibly negative or numpy) index; IndexError past the end ends plain iteration."""
        n = len(self)
        i = int(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {index} out of range for {self.name} dataset of length {n}")
        return i

    def set_epoch(self, epoch: int) -> None:
        """Change the augmentation stream (flips, random crops) for a new epoch."""
        self.epoch = int(epoch)

    def sample_rng(self, index: int) -> np.random.Generator:
        """Seeded generator for sample `index`'s augmentations (see class docstring)."""
        if self.seed is None:
            return np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item()))
        return np.random.default_rng([int(self.seed), self.epoch, index])


class Truncated(ImageDataset):
    """The first `length` samples of another dataset, keeping its metadata (for tiny configs and smoke runs)."""

    def __init__(self, base: ImageDataset, length: int) -> None:
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        self.base = base
        self.length = min(int(length), len(base))
        self.name = base.name
        self.image_size = base.image_size
        self.channels = base.channels
        self.num_classes = base.num_classes
        self.class_names = base.class_names
        self.seed = base.seed

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def _get(self, index: int) -> Sample:
        return self.base[index]


@dataclass(frozen=True)
class DatasetInfo:
    """Summary of a dataset for logs, model configs and run metadata."""

    name: str
    image_size: int
    channels: int
    num_classes: int | None
    length: int
    class_names: list[str] | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def dataset_info(ds: ImageDataset) -> DatasetInfo:
    """Name, image size, channels, number of classes and length of `ds`."""
    return DatasetInfo(
        name=ds.name,
        image_size=ds.image_size,
        channels=ds.channels,
        num_classes=ds.num_classes,
        length=len(ds),
        class_names=list(ds.class_names) if ds.class_names is not None else None,
    )


def repeat_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """(1, H, W) -> (channels, H, W) by repetition; grayscale datasets honour channels=3 this way."""
    if x.shape[0] == channels:
        return x
    if x.shape[0] != 1:
        raise ValueError(f"cannot turn {x.shape[0]} channels into {channels}")
    return x.expand(channels, -1, -1).contiguous()


def check_channels(channels: int) -> int:
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    return channels
