"""Fréchet distance (FID) and kernel distance (KID) between two feature sets, plus a reference-stats cache.

FID (Heusel et al. 2017): ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}), Gaussian fits in float64; the matrix
square root is scipy's `sqrtm`, with pytorch-fid's fallbacks (eps * I added to both covariances when the product is
singular, imaginary round-off dropped). KID (Binkowski et al. 2018): unbiased MMD^2 with the cubic polynomial kernel
k(x, y) = (x.y / d + 1)^3, averaged over random subsets. The same FID is available through torchmetrics'
`FrechetInceptionDistance(feature=<module>)`, which needs no torch-fidelity when given a module.
"""

from __future__ import annotations

import os
import re
import zipfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Union

import numpy as np
import torch
from scipy import linalg
from torch import Tensor, nn

if TYPE_CHECKING:
    from torchmetrics.image.fid import FrechetInceptionDistance

    from pakhsh.metrics.features import FeatureExtractor

FeatureArray = Union[Tensor, np.ndarray]  # (N, D)


class Stats(NamedTuple):
    """Gaussian fit of a feature set."""

    mu: np.ndarray  # (D,) float64
    sigma: np.ndarray  # (D, D) float64, unbiased (N - 1) covariance as in pytorch-fid
    n: int  # number of samples behind the fit


class KIDResult(NamedTuple):
    mean: float  # mean unbiased MMD^2 over subsets
    std: float  # standard deviation over subsets (ddof=0, as torch-fidelity)
    n_subsets: int
    subset_size: int  # after clipping to the smaller set


def as_float64(features: FeatureArray, what: str = "features") -> np.ndarray:
    """Tensor or array (N, D) -> float64 numpy (N, D)."""
    arr = features.detach().cpu().double().numpy() if isinstance(features, Tensor) else np.asarray(features)
    if arr.ndim != 2:
        raise ValueError(f"{what}: expected a 2-D array (N, D), got shape {arr.shape}")
    return arr.astype(np.float64, copy=False)


def compute_statistics(features: FeatureArray) -> Stats:
    """(N, D) features -> Stats(mu, sigma, n). Warns when N <= D: the covariance is then singular (rank < D)."""
    x = as_float64(features)
    n, d = x.shape
    if n < 2:
        raise ValueError(f"need at least 2 samples for a covariance, got {n}")
    if n <= d:
        warnings.warn(
            f"only {n} samples for {d}-d features: the covariance is singular and FID is biased upwards "
            f"(use more than {d} samples for a stable FID); computing anyway",
            stacklevel=2,
        )
    return Stats(mu=x.mean(axis=0), sigma=np.cov(x, rowvar=False), n=n)


def frechet_distance(a: Stats, b: Stats, eps: float = 1e-6) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2}) in float64."""
    mu1, mu2 = np.atleast_1d(a.mu).astype(np.float64), np.atleast_1d(b.mu).astype(np.float64)
    s1, s2 = np.atleast_2d(a.sigma).astype(np.float64), np.atleast_2d(b.sigma).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        # Singular product (e.g. fewer samples than dimensions): shift both covariances off zero, as pytorch-fid.
        warnings.warn(f"sqrtm(S1 S2) is singular; adding {eps} to the covariance diagonals", stacklevel=2)
        offset = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        # Round-off can leave tiny imaginary parts; a large one means the result is meaningless.
        worst = np.max(np.abs(np.diagonal(covmean).imag))
        if worst > 1e-3:
            raise ValueError(f"sqrtm(S1 S2) has an imaginary component {worst:.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def fid_from_features(real: FeatureArray, fake: FeatureArray) -> float:
    """FID between two feature sets (N1, D) and (N2, D)."""
    return frechet_distance(compute_statistics(real), compute_statistics(fake))


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(x, y) = (x.y / d + 1)^3 for rows of x (N, D) and y (M, D) -> (N, M)."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 of two equal-size samples (m, D): diagonal (self-similarity) terms left out of K_xx, K_yy."""
    m = x.shape[0]
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.sum() / (m * m))


def kernel_inception_distance(
    real: FeatureArray, fake: FeatureArray, n_subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> KIDResult:
    """KID: mean and std of unbiased MMD^2 over `n_subsets` random subsets (drawn without replacement)."""
    x, y = as_float64(real, "real"), as_float64(fake, "fake")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature sizes differ: {x.shape[1]} vs {y.shape[1]}")
    m = min(subset_size, len(x), len(y))
    if m < 2:
        raise ValueError("KID needs at least 2 samples in each set")
    if m < subset_size:
        warnings.warn(f"KID subset size clipped from {subset_size} to {m} (the smaller set's size)", stacklevel=2)
    rng = np.random.default_rng(seed)
    values = np.array([
        mmd2_unbiased(x[rng.choice(len(x), m, replace=False)], y[rng.choice(len(y), m, replace=False)])
        for _ in range(n_subsets)
    ])
    return KIDResult(float(values.mean()), float(values.std()), n_subsets, m)


# ----------------------------------------------------------------------------- torchmetrics path


class _PassThrough(nn.Module):
    """Features in, features out: lets torchmetrics' FID run on features computed elsewhere."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features  # read by torchmetrics instead of probing with a dummy image

    def forward(self, x: Tensor) -> Tensor:
        return x


class TorchmetricsFeatures(nn.Module):
    """A FeatureExtractor as the `feature=` module of torchmetrics' FID/KID: images (B,C,H,W) -> (B, D)."""

    def __init__(self, extractor: "FeatureExtractor") -> None:
        super().__init__()
        self.extractor = extractor
        self.net = getattr(extractor, "model", None)  # registered so that metric.to(device) moves it
        self.num_features = extractor.feature_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.extractor.features(x)


def torchmetrics_fid(extractor: "FeatureExtractor") -> "FrechetInceptionDistance":
    """torchmetrics `FrechetInceptionDistance` running on our extractor (update(images, real=...), compute())."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(feature=TorchmetricsFeatures(extractor))


def fid_torchmetrics(real: FeatureArray, fake: FeatureArray) -> float:
    """FID of two feature sets computed by torchmetrics (float64), as a cross-check of `fid_from_features`."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    x = torch.as_tensor(as_float64(real, "real"))
    y = torch.as_tensor(as_float64(fake, "fake"))
    metric = FrechetInceptionDistance(feature=_PassThrough(x.shape[1]))  # states are float64 already
    metric.update(x, real=True)
    metric.update(y, real=False)
    return float(metric.compute())


# ----------------------------------------------------------------------------- reference statistics cache


class StatsKey(NamedTuple):
    """What a cached reference statistic depends on."""

    dataset: str  # e.g. "fashion_mnist"
    split: str  # e.g. "train"
    extractor: str  # FeatureExtractor.name, e.g. "inception", "fashion-net"
    image_size: int
    n: int  # number of reference images

    def filename(self) -> str:
        parts = [self.dataset, self.split, self.extractor, f"{self.image_size}px", f"n{self.n}"]
        return "__".join(re.sub(r"[^A-Za-z0-9._-]+", "-", str(p)) for p in parts) + ".npz"


class StatsCache:
    """Reference Stats (and optionally features, for KID / precision-recall) as .npz files in one folder."""

    def __init__(self, directory: str | Path, shipped: Sequence[str | Path] = ()) -> None:
        self.directory = Path(directory)
        self.shipped = [Path(d) for d in shipped]  # read-only folders tried after `directory` (package data)

    def path(self, key: StatsKey) -> Path:
        """Where `key` is read from: the cache folder, else the first shipped folder holding it."""
        own = self.directory / key.filename()
        if own.is_file():
            return own
        for folder in self.shipped:
            if (folder / key.filename()).is_file():
                return folder / key.filename()
        return own

    def load(self, key: StatsKey) -> Stats | None:
        """Cached Stats for `key`, or None when there are none."""
        data = self._read(key)
        return None if data is None else Stats(data["mu"], data["sigma"], int(data["n"]))

    def load_features(self, key: StatsKey) -> np.ndarray | None:
        """Cached features (N, D) for `key`, or None when none were stored."""
        data = self._read(key)
        return None if data is None or "features" not in data else data["features"]

    def save(self, key: StatsKey, stats: Stats, features: FeatureArray | None = None) -> Path:
        """Write atomically (temp file + rename) so that an interrupted run leaves no half file."""
        self.directory.mkdir(parents=True, exist_ok=True)
        arrays = {"mu": stats.mu, "sigma": stats.sigma, "n": np.int64(stats.n), "key": np.array(list(map(str, key)))}
        if features is not None:
            arrays["features"] = as_float64(features)
        path = self.directory / key.filename()
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        tmp.replace(path)
        return path

    def get_or_compute(self, key: StatsKey, compute: Callable[[], Stats]) -> Stats:
        """Cached Stats for `key`, computing and storing them on a miss."""
        stats = self.load(key)
        if stats is None:
            stats = compute()
            self.save(key, stats)
        return stats

    def _read(self, key: StatsKey) -> dict[str, np.ndarray] | None:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # truncated or foreign: a cache miss
            warnings.warn(f"reference statistics {path} are unreadable ({type(e).__name__}: {e}); recomputing them",
                          stacklevel=3)
            return None
        stored = tuple(str(v) for v in data.get("key", ()))
        if stored != tuple(map(str, key)):
            raise ValueError(f"{path} holds statistics for {stored}, not {tuple(key)}")
        return data
