"""Improved precision and recall on constructed manifolds."""

from __future__ import annotations

import torch

from pakhsh.metrics import precision_recall
from pakhsh.metrics.precision_recall import knn_radii


def _blob(n: int, center: float, seed: int, d: int = 8) -> torch.Tensor:
    return center + torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_identical_sets_have_full_precision_and_recall():
    x = _blob(200, 0.0, 0)
    out = precision_recall(x, x.clone())
    assert (out.precision, out.recall, out.k) == (1.0, 1.0, 3)


def test_far_disjoint_sets_have_zero_precision_and_recall():
    out = precision_recall(_blob(150, 0.0, 0), _blob(120, 100.0, 1))
    assert (out.precision, out.recall) == (0.0, 0.0)


def test_mode_dropping_keeps_precision_and_halves_recall():
    # 2-D so that k-NN balls of 300 samples cover their own distribution well (in high d they cover less).
    real = torch.cat([_blob(300, 0.0, 0, d=2), _blob(300, 50.0, 1, d=2)])
    fake = _blob(300, 0.0, 2, d=2)  # new samples from only one of the two real modes
    out = precision_recall(real, fake)
    assert out.precision > 0.9
    assert 0.4 < out.recall <= 0.5


def test_blocked_computation_equals_one_block():
    real, fake = _blob(90, 0.0, 0), _blob(70, 0.5, 1)
    assert precision_recall(real, fake, batch_size=7) == precision_recall(real, fake, batch_size=10_000)


def test_knn_radii_match_brute_force():
    x = _blob(40, 0.0, 3)
    d = torch.cdist(x, x)
    expected = d.sort(dim=1).values[:, 3]  # column 0 is the point itself
    torch.testing.assert_close(knn_radii(x, k=3, batch_size=9), expected)
