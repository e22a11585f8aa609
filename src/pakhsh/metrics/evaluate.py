"""One call from two image sets to a MetricReport (FID, KID, IS, precision/recall) with named, counted metrics.

Metric names carry the extractor and the number of generated samples, e.g. `FID[fashion-net]-5k`: FID values from
different feature networks or sample counts are not comparable, so the name says which one a number is.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.data import Dataset

from pakhsh.metrics.features import (
    Extracted,
    FeatureExtractor,
    ImageSource,
    convert_images,
    extract,
    item_image,
    iter_image_batches,
)
from pakhsh.metrics.fid import fid_from_features, kernel_inception_distance
from pakhsh.metrics.inception_score import inception_score
from pakhsh.metrics.precision_recall import precision_recall

MetricName = Literal[
    "fid",  # Fréchet distance of feature Gaussians
    "kid",  # kernel (MMD^2) distance, mean and std over subsets
    "is",  # Inception Score of the fake set's class predictions
    "pr",  # improved precision and recall
]
ALL_METRICS: tuple[MetricName, ...] = ("fid", "kid", "is", "pr")
_DISPLAY = {"fid": "FID", "kid": "KID", "is": "IS", "precision": "Precision", "recall": "Recall"}


def count_label(n: int) -> str:
    """5000 -> '5k', 50000 -> '50k', 1500 -> '1.5k', 640 -> '640'."""
    if n >= 1000 and n % 100 == 0:
        return f"{n / 1000:g}k"
    return str(n)


@dataclass
class MetricReport:
    """Sample-quality metrics of a fake set against a real set, under one feature extractor."""

    extractor: str
    n_real: int
    n_fake: int
    fid: float | None = None
    kid_mean: float | None = None
    kid_std: float | None = None
    is_mean: float | None = None
    is_std: float | None = None
    precision: float | None = None
    recall: float | None = None

    def label(self, metric: str) -> str:
        """'fid' -> 'FID[fashion-net]-5k' (the count is the number of fake samples)."""
        if metric not in _DISPLAY:
            raise KeyError(f"unknown metric {metric!r}; known: {', '.join(_DISPLAY)}")
        return f"{_DISPLAY[metric]}[{self.extractor}]-{count_label(self.n_fake)}"

    def labels(self) -> dict[str, str]:
        """Label of every metric that has a value."""
        return {m: self.label(m) for m in _DISPLAY if self._value(m) is not None}

    def _value(self, metric: str) -> float | None:
        return {"fid": self.fid, "kid": self.kid_mean, "is": self.is_mean,
                "precision": self.precision, "recall": self.recall}[metric]

    def _formatted(self, metric: str) -> str:
        if metric == "kid":
            return f"{self.kid_mean:.5f} ± {self.kid_std:.5f}"
        if metric == "is":
            return f"{self.is_mean:.3f} ± {self.is_std:.3f}"
        if metric == "fid":
            return f"{self.fid:.3f}"
        return f"{self._value(metric):.4f}"

    def to_markdown(self) -> str:
        """A two-column Markdown table of the computed metrics, then the sample counts."""
        rows = ["| Metric | Value |", "|---|---|"]
        rows += [f"| {label} | {self._formatted(m)} |" for m, label in self.labels().items()]
        rows.append("")
        rows.append(f"real samples: {self.n_real}, fake samples: {self.n_fake}, extractor: {self.extractor}")
        return "\n".join(rows)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of the fields (missing metrics are None)."""
        return dataclasses.asdict(self)


def _first_shape(source: ImageSource) -> tuple[int, ...] | None:
    """(C, H, W) of the first image, for tensors and map-style datasets; None when it cannot be known cheaply."""
    if isinstance(source, Tensor):
        return tuple(source.shape[1:])
    if isinstance(source, Dataset) and hasattr(source, "__len__") and len(source) > 0:
        return tuple(item_image(source[0]).shape)
    return None


def match_fake_to_real(real: ImageSource, fake: ImageSource, strict: bool) -> ImageSource:
    """Make fake images the real set's (C, H, W) when they differ, so both take the same preprocessing path."""
    rs, fs = _first_shape(real), _first_shape(fake)
    if rs is None or fs is None or rs == fs:
        return fake
    message = f"real images are {rs} but fake images are {fs}"
    if strict:
        raise ValueError(message + " (strict=True)")
    if rs[1] != rs[2]:
        raise ValueError(message + ": cannot convert to non-square real images")
    warnings.warn(message + f"; fake images converted to {rs}", stacklevel=3)
    if isinstance(fake, Tensor):
        return convert_images(fake, channels=rs[0], size=rs[1])
    return _Converted(fake, rs[0], rs[1])


class _Converted:
    """Lazily converted batches of another source (keeps memory bounded for big datasets)."""

    def __init__(self, source: ImageSource, channels: int, size: int, batch_size: int = 64) -> None:
        self.source, self.channels, self.size, self.batch_size = source, channels, size, batch_size

    def __iter__(self) -> Any:
        for batch in iter_image_batches(self.source, self.batch_size):
            yield convert_images(batch, self.channels, self.size)


def metrics_from_features(
    real: Extracted,
    fake: Extracted,
    extractor_name: str,
    metrics: Iterable[MetricName] = ALL_METRICS,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    is_splits: int = 10,
    pr_k: int = 3,
    seed: int = 0,
    pr_device: str | torch.device = "cpu",
) -> MetricReport:
    """Metrics from already extracted features/logits (e.g. cached real features). `seed` draws KID subsets;
    `pr_device` runs the precision/recall distance blocks (a GPU for tens of thousands of samples)."""
    wanted = set(metrics)
    unknown = wanted - set(ALL_METRICS)
    if unknown:
        raise ValueError(f"unknown metric(s) {sorted(unknown)}; known: {list(ALL_METRICS)}")
    report = MetricReport(extractor=extractor_name, n_real=len(real.features), n_fake=len(fake.features))
    if "fid" in wanted:
        report.fid = fid_from_features(real.features, fake.features)
    if "kid" in wanted:
        kid = kernel_inception_distance(real.features, fake.features, kid_subsets, kid_subset_size, seed)
        report.kid_mean, report.kid_std = kid.mean, kid.std
    if "is" in wanted and fake.logits is not None:
        splits = min(is_splits, len(fake.logits))
        if splits < is_splits:
            warnings.warn(f"IS: only {len(fake.logits)} fake samples, using {splits} splits", stacklevel=2)
        score = inception_score(fake.logits, splits=splits)
        report.is_mean, report.is_std = score.mean, score.std
    if "pr" in wanted:
        pr = precision_recall(real.features, fake.features, k=pr_k, device=pr_device)
        report.precision, report.recall = pr.precision, pr.recall
    return report


def compute_metrics(
    real: ImageSource | Extracted,
    fake: ImageSource | Extracted,
    extractor: FeatureExtractor,
    metrics: Iterable[MetricName] = ALL_METRICS,
    batch_size: int = 64,
    strict: bool = False,
    progress: bool = False,
    **options: Any,
) -> MetricReport:
    """Extract features of both sets with `extractor` and compute the requested metrics.

    Images are (N, C, H, W) tensors in [-1, 1], datasets of {"image": ...} dicts, or iterables of batches; an
    `Extracted` is used as is. Sets that differ in channels/size are converted to the real set's shape with a
    warning (an error when `strict`). `options` go to `metrics_from_features` (kid_subsets, is_splits, pr_k, ...).
    """
    if not isinstance(real, Extracted) and not isinstance(fake, Extracted):
        fake = match_fake_to_real(real, fake, strict)
    previous = extractor.strict
    extractor.strict = strict
    try:
        with torch.no_grad():
            real_x = real if isinstance(real, Extracted) else extract(extractor, real, batch_size, progress=progress)
            fake_x = fake if isinstance(fake, Extracted) else extract(extractor, fake, batch_size, progress=progress)
    finally:
        extractor.strict = previous
    return metrics_from_features(real_x, fake_x, extractor.name, metrics, **options)
