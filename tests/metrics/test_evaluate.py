"""compute_metrics and MetricReport: names with extractor and count, rendering, bad-input handling."""

from __future__ import annotations

import math

import pytest
import torch

from pakhsh.metrics import (
    Extracted,
    FeatureNet,
    FeatureNetConfig,
    FeatureNetExtractor,
    MetricReport,
    compute_metrics,
    metrics_from_features,
)
from pakhsh.metrics.evaluate import count_label


@pytest.fixture
def extractor() -> FeatureNetExtractor:
    torch.manual_seed(0)
    cfg = FeatureNetConfig(name="toy-net", in_channels=1, image_size=16, num_classes=4, width=8, feature_dim=6)
    return FeatureNetExtractor(FeatureNet(cfg))


def test_count_labels():
    assert [count_label(n) for n in (5000, 50_000, 1500, 640, 1234)] == ["5k", "50k", "1.5k", "640", "1234"]


def test_report_labels_markdown_and_dict():
    r = MetricReport(extractor="fashion-net", n_real=10_000, n_fake=5000, fid=12.3456, kid_mean=0.0012,
                     kid_std=0.0003, is_mean=8.5, is_std=0.25, precision=0.7, recall=0.6)
    assert r.label("fid") == "FID[fashion-net]-5k"
    assert r.labels()["recall"] == "Recall[fashion-net]-5k"
    md = r.to_markdown()
    assert "| FID[fashion-net]-5k | 12.346 |" in md
    assert "| KID[fashion-net]-5k | 0.00120 ± 0.00030 |" in md
    assert "| IS[fashion-net]-5k | 8.500 ± 0.250 |" in md
    assert "real samples: 10000, fake samples: 5000" in md
    d = r.to_dict()
    assert d["fid"] == 12.3456 and d["extractor"] == "fashion-net" and d["n_fake"] == 5000
    partial = MetricReport(extractor="inception", n_real=50, n_fake=50, fid=1.0)
    assert list(partial.labels()) == ["fid"] and "KID" not in partial.to_markdown()
    with pytest.raises(KeyError):
        r.label("lpips")


def test_identical_sets_score_perfectly(extractor, make_toy):
    images = make_toy(n=80).images
    report = compute_metrics(images, images.clone(), extractor, kid_subsets=5, kid_subset_size=40)
    assert report.extractor == "toy-net" and (report.n_real, report.n_fake) == (80, 80)
    assert abs(report.fid) < 1e-6
    assert (report.precision, report.recall) == (1.0, 1.0)
    assert abs(report.kid_mean) < 0.05
    assert 1.0 <= report.is_mean <= 4.0 and report.is_std >= 0
    assert all(math.isfinite(v) for v in report.to_dict().values() if isinstance(v, float))


def test_datasets_are_accepted_and_shift_raises_fid(extractor, make_toy):
    real = make_toy(n=60, seed=0)
    close = compute_metrics(real, make_toy(n=60, seed=1), extractor, metrics=["fid"])
    far_images = make_toy(n=60, seed=1).images.flip(-1).flip(-2) * -1  # inverted, rotated images
    far = compute_metrics(real, far_images, extractor, metrics=["fid"])
    assert 0 < close.fid < far.fid
    assert close.kid_mean is None and close.precision is None


def test_mismatched_sets_are_converted_with_warning_or_rejected_when_strict(extractor, make_toy):
    real = make_toy(n=40, size=16, channels=1).images
    fake = make_toy(n=40, size=32, channels=3, seed=1).images
    with pytest.warns(UserWarning, match=r"fake images converted to \(1, 16, 16\)"):
        report = compute_metrics(real, fake, extractor, metrics=["fid"])
    assert math.isfinite(report.fid)
    with pytest.raises(ValueError, match="strict"):
        compute_metrics(real, fake, extractor, metrics=["fid"], strict=True)
    assert not extractor.strict  # restored after the call


def test_few_samples_warn_but_compute(extractor, make_toy):
    real, fake = make_toy(n=5).images, make_toy(n=5, seed=1).images  # 5 samples, 6-d features, < 10 IS splits
    with pytest.warns(UserWarning) as record:
        report = compute_metrics(real, fake, extractor, metrics=["fid", "kid", "is"], kid_subsets=3)
    messages = " ".join(str(w.message) for w in record)
    assert "singular" in messages and "splits" in messages and "clipped" in messages
    assert math.isfinite(report.fid) and math.isfinite(report.is_mean)


def test_metrics_from_precomputed_features():
    g = torch.Generator().manual_seed(0)
    real = Extracted(torch.randn(100, 4, generator=g, dtype=torch.float64), None)
    fake = Extracted(torch.randn(100, 4, generator=g, dtype=torch.float64) + 3, None)
    report = metrics_from_features(real, fake, "cached", kid_subsets=4, kid_subset_size=50)
    assert report.fid > 30 and report.is_mean is None  # no logits, no IS
    assert report.precision < 0.2 and report.recall < 0.2
