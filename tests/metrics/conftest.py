"""Fixtures for the metrics tests: a tiny synthetic labelled image dataset (stands in for pakhsh.data)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset


class ToyDataset(Dataset):
    """Class k = a bright square in quadrant k on a noisy dark background: (C, S, S) in [-1, 1], 4 classes."""

    num_classes = 4

    def __init__(self, n: int = 64, size: int = 16, channels: int = 1, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % self.num_classes
        images = -0.8 + 0.1 * torch.randn(n, channels, size, size, generator=g)
        h = size // 2
        for i, k in enumerate(self.labels.tolist()):
            r, c = divmod(k, 2)
            images[i, :, r * h : (r + 1) * h, c * h : (c + 1) * h] += 1.5
        self.images = images.clamp(-1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": int(self.labels[i])}


@pytest.fixture
def toy_dataset() -> ToyDataset:
    return ToyDataset()


@pytest.fixture
def make_toy() -> type[ToyDataset]:
    """The ToyDataset class, for tests that need other sizes, channels or seeds."""
    return ToyDataset


@pytest.fixture(autouse=True)
def _one_thread():
    """The metric tests run tiny networks: with several threads, OpenMP spin-waits on a busy 2-core machine cost
    10-50x more time than the work itself, so use one thread here and restore the setting afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
