"""scikit-learn's handwritten digits (1,797 images, 8x8, 17 grey levels 0..16), upsampled; labels 0-9."""

from __future__ import annotations

import functools
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from pakhsh.data.base import ImageDataset, Sample, check_channels, repeat_channels
from pakhsh.data.transforms import random_hflip_tensor

TEST_EVERY = 5  # images with index % 5 == 0 form the test split (360), the rest train (1,437)


@functools.lru_cache(maxsize=1)
def _load() -> tuple[np.ndarray, np.ndarray]:
    """(images float32 (N, 8, 8) in 0..16, labels int64 (N,)), bundled with scikit-learn (no download)."""
    from sklearn.datasets import load_digits  # heavy import, only when used

    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64)


def upsample(images: np.ndarray, size: int) -> torch.Tensor:
    """(N, 8, 8) in 0..16 -> float32 (N, 1, size, size) in [-1, 1] (bicubic; antialiased if shrinking)."""
    x = torch.from_numpy(images)[:, None] / 8.0 - 1.0  # (N, 1, 8, 8)
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return x.clamp(-1.0, 1.0)  # bicubic overshoot


class Digits(ImageDataset):
    """Handwritten digits 0-9, upsampled once at construction (1,797 images; ~7 MB at 32x32).

    Deterministic split: image i is test when i % 5 == 0. Sample keys: "image" (C, size, size) in [-1, 1]
    (white digit on black, as in the source), "label" int. random_flip is allowed but mirrors digits.
    """

    name = "digits"
    num_classes = 10
    class_names = [str(i) for i in range(10)]

    def __init__(
        self,
        split: Literal["train", "test"] = "train",
        size: int = 32,
        channels: int = 1,
        random_flip: bool = False,
        seed: int | None = 0,
    ) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        images, labels = _load()
        is_test = np.arange(len(labels)) % TEST_EVERY == 0
        keep = is_test if split == "test" else ~is_test
        self.split = split
        self.image_size = size
        self.channels = check_channels(channels)
        self.random_flip = random_flip
        self.seed = seed
        self.images = upsample(images[keep], size)  # (N, 1, size, size)
        self.labels = labels[keep]

    def __len__(self) -> int:
        return len(self.labels)

    def _get(self, index: int) -> Sample:
        x = self.images[index].clone()  # callers may edit samples in place
        if self.random_flip:
            x = random_hflip_tensor(x, self.sample_rng(index))
        return {"image": repeat_channels(x, self.channels), "label": int(self.labels[index])}
