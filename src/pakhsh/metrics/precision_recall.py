"""Improved precision and recall (Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric for Assessing
Generative Models").

Each feature set approximates its manifold by the union of balls around its samples, each ball's radius being the
distance to the sample's k-th nearest neighbour (k=3 in the paper). Precision is the fraction of fake samples that
fall inside some real ball (fidelity); recall is the fraction of real samples inside some fake ball (coverage).
Distances are computed in blocks of `batch_size` x `batch_size` so memory stays bounded for any N.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from pakhsh.metrics.fid import FeatureArray, as_float64


class PRResult(NamedTuple):
    precision: float  # fraction of fake samples inside the real manifold
    recall: float  # fraction of real samples inside the fake manifold
    k: int


def _as_tensor(features: FeatureArray, what: str) -> Tensor:
    return torch.from_numpy(as_float64(features, what))


def knn_radii(features: Tensor, k: int = 3, batch_size: int = 4096) -> Tensor:
    """(N, D) -> (N,) distance from each sample to its k-th nearest other sample."""
    n = len(features)
    if n <= k:
        raise ValueError(f"need more than k={k} samples for k-NN radii, got {n}")
    radii = []
    for rows in features.split(batch_size):
        # Keep only the k+1 smallest distances per row across column blocks (the +1 is the sample itself).
        best = features.new_empty((len(rows), 0))
        for cols in features.split(batch_size):
            d = torch.cdist(rows, cols)
            best = torch.cat([best, d], dim=1).topk(k + 1, dim=1, largest=False).values
        radii.append(best[:, k])
    return torch.cat(radii)  # (N,)


def manifold_coverage(
    ref: Tensor, ref_radii: Tensor, query: Tensor, batch_size: int = 4096
) -> Tensor:
    """(M,) bool: whether each query sample lies within some reference ball ||q - r|| <= radius(r)."""
    inside = []
    for q in query.split(batch_size):
        hit = torch.zeros(len(q), dtype=torch.bool, device=q.device)
        for r, rad in zip(ref.split(batch_size), ref_radii.split(batch_size)):
            hit |= (torch.cdist(q, r) <= rad.unsqueeze(0)).any(dim=1)
        inside.append(hit)
    return torch.cat(inside)  # (M,)


def precision_recall(
    real: FeatureArray, fake: FeatureArray, k: int = 3, batch_size: int = 4096, device: str | torch.device = "cpu"
) -> PRResult:
    """Improved precision and recall of fake features (M, D) against real features (N, D), in float64.

    The pairwise distances cost O((N + M)^2 D): for tens of thousands of samples pass a GPU `device`."""
    x, y = _as_tensor(real, "real").to(device), _as_tensor(fake, "fake").to(device)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature sizes differ: {x.shape[1]} vs {y.shape[1]}")
    real_radii = knn_radii(x, k, batch_size)
    fake_radii = knn_radii(y, k, batch_size)
    precision = manifold_coverage(x, real_radii, y, batch_size).double().mean()
    recall = manifold_coverage(y, fake_radii, x, batch_size).double().mean()
    return PRResult(float(precision), float(recall), k)
