"""FID, KID, the torchmetrics cross-check and the reference-stats cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pakhsh.metrics import (
    FeatureNet,
    FeatureNetConfig,
    FeatureNetExtractor,
    Stats,
    StatsCache,
    StatsKey,
    compute_metrics,
    compute_statistics,
    fid_from_features,
    fid_torchmetrics,
    frechet_distance,
    kernel_inception_distance,
    torchmetrics_fid,
)


def _gaussian(n: int, mu: np.ndarray, std: np.ndarray, seed: int) -> np.ndarray:
    return mu + std * np.random.default_rng(seed).standard_normal((n, len(mu)))


def _diag_closed_form(mu1, var1, mu2, var2) -> float:
    """||mu1-mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) for diagonal S: sum(v1 + v2 - 2 sqrt(v1 v2))."""
    return float(np.sum((mu1 - mu2) ** 2) + np.sum(var1 + var2 - 2 * np.sqrt(var1 * var2)))


def test_fid_identical_sets_is_zero():
    x = np.random.default_rng(0).standard_normal((500, 16)) @ np.random.default_rng(1).standard_normal((16, 16))
    assert abs(fid_from_features(x, x.copy())) < 1e-6
    assert abs(fid_from_features(torch.from_numpy(x).float(), torch.from_numpy(x).float())) < 1e-6


def test_fid_matches_closed_form_from_statistics():
    rng = np.random.default_rng(0)
    d = 12
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    var1, var2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    got = frechet_distance(Stats(mu1, np.diag(var1), 10), Stats(mu2, np.diag(var2), 10))
    assert got == pytest.approx(_diag_closed_form(mu1, var1, mu2, var2), rel=1e-9, abs=1e-9)


def test_fid_is_rotation_invariant():
    """A shared rotation of both Gaussians leaves FID unchanged: exercises the full (non-diagonal) sqrtm path."""
    rng = np.random.default_rng(3)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    var1, var2 = rng.uniform(0.2, 2.0, d), rng.uniform(0.2, 2.0, d)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    a = Stats(q @ mu1, q @ np.diag(var1) @ q.T, 10)
    b = Stats(q @ mu2, q @ np.diag(var2) @ q.T, 10)
    assert frechet_distance(a, b) == pytest.approx(_diag_closed_form(mu1, var1, mu2, var2), rel=1e-8)


def test_fid_from_samples_converges_to_closed_form():
    d = 4
    mu1, mu2 = np.zeros(d), np.array([1.0, -0.5, 0.0, 2.0])
    std1, std2 = np.array([1.0, 2.0, 0.5, 1.0]), np.array([1.5, 1.0, 0.5, 0.7])
    x, y = _gaussian(40_000, mu1, std1, 0), _gaussian(40_000, mu2, std2, 1)
    expected = _diag_closed_form(mu1, std1**2, mu2, std2**2)
    assert fid_from_features(x, y) == pytest.approx(expected, rel=0.03)


def test_compute_statistics_shapes_and_unbiased_covariance():
    x = np.random.default_rng(0).normal(size=(50, 3))
    s = compute_statistics(x)
    assert s.mu.shape == (3,) and s.sigma.shape == (3, 3) and s.n == 50
    np.testing.assert_allclose(s.sigma, np.cov(x, rowvar=False))


def test_fewer_samples_than_dimensions_warns_but_computes():
    x = np.random.default_rng(0).normal(size=(10, 32))
    y = np.random.default_rng(1).normal(size=(10, 32))
    with pytest.warns(UserWarning, match="singular"):
        value = fid_from_features(x, y)
    assert np.isfinite(value) and value > 0


def test_fid_rejects_mismatched_dimensions():
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance(Stats(np.zeros(3), np.eye(3), 5), Stats(np.zeros(4), np.eye(4), 5))


def test_our_fid_equals_torchmetrics_on_same_features():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 8))
    y = rng.normal(size=(200, 8)) * 1.3 + 0.4
    ours, theirs = fid_from_features(x, y), fid_torchmetrics(x, y)
    assert ours == pytest.approx(theirs, rel=1e-6, abs=1e-8)


def test_torchmetrics_metric_runs_on_our_extractor(make_toy):
    """torchmetrics' FrechetInceptionDistance(feature=<our module>) needs no torch-fidelity and agrees with us."""
    torch.manual_seed(0)
    extractor = FeatureNetExtractor(FeatureNet(FeatureNetConfig(image_size=16, num_classes=4, width=8,
                                                                feature_dim=6)))
    real, fake = make_toy(n=48, seed=0).images, make_toy(n=40, seed=1).images + 0.2
    metric = torchmetrics_fid(extractor)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    ours = compute_metrics(real, fake, extractor, metrics=["fid"]).fid
    assert float(metric.compute()) == pytest.approx(ours, rel=1e-4, abs=1e-6)


def test_kid_near_zero_for_same_distribution_and_positive_when_shifted():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(400, 16)), rng.normal(size=(400, 16))
    same = kernel_inception_distance(x, y, n_subsets=20, subset_size=200)
    shifted = kernel_inception_distance(x, y + 1.0, n_subsets=20, subset_size=200)
    assert abs(same.mean) < 3 * same.std + 1e-3
    assert shifted.mean > 0.1 and shifted.mean > 10 * abs(same.mean)
    assert (same.n_subsets, same.subset_size) == (20, 200)


def test_kid_subset_size_is_clipped_with_warning():
    rng = np.random.default_rng(0)
    with pytest.warns(UserWarning, match="clipped"):
        out = kernel_inception_distance(rng.normal(size=(50, 4)), rng.normal(size=(30, 4)), n_subsets=3)
    assert out.subset_size == 30


def test_stats_cache_round_trip(tmp_path):
    cache = StatsCache(tmp_path / "stats")
    key = StatsKey("fashion_mnist", "train", "fashion-net", 32, 5000)
    assert cache.load(key) is None
    feats = np.random.default_rng(0).normal(size=(20, 3))
    calls = []

    def compute() -> Stats:
        calls.append(1)
        return compute_statistics(feats)

    first = cache.get_or_compute(key, compute)
    second = cache.get_or_compute(key, compute)
    assert len(calls) == 1
    np.testing.assert_array_equal(first.mu, second.mu)
    np.testing.assert_array_equal(first.sigma, second.sigma)
    assert second.n == 20
    assert cache.path(key).name == "fashion_mnist__train__fashion-net__32px__n5000.npz"
    cache.save(key, first, features=feats)
    np.testing.assert_array_equal(cache.load_features(key), feats)
    assert list(tmp_path.joinpath("stats").iterdir()) == [cache.path(key)]  # no temp files left


def test_stats_cache_rejects_file_for_another_key(tmp_path):
    cache = StatsCache(tmp_path)
    key = StatsKey("digits", "train", "inception", 32, 100)
    cache.save(key, compute_statistics(np.random.default_rng(0).normal(size=(5, 2))))
    other = StatsKey("digits", "test", "inception", 32, 100)
    cache.path(key).rename(cache.path(other))
    with pytest.raises(ValueError, match="holds statistics for"):
        cache.load(other)
