"""Shipped reference statistics: `pakhsh eval fashion_mnist` works where the Fashion-MNIST package is absent, and
the shipped features are what the cache would compute where it is present."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pakhsh.cli import main
from pakhsh.data.builtin import fashion_mnist as fm
from pakhsh.evaluation import SHIPPED_STATS, load_extractor
from pakhsh.metrics import StatsCache, StatsKey

pytestmark = pytest.mark.filterwarnings("ignore:only .* samples", "ignore:KID subset size", "ignore:IS.*splits")


def _key() -> StatsKey:
    _, ext_id = load_extractor(None, "fashion_mnist")
    return StatsKey("fashion_mnist", "train", ext_id, 32, 10_000)


def test_shipped_stats_exist_for_the_shipped_feature_net():
    path = SHIPPED_STATS / _key().filename()
    assert path.is_file(), f"no shipped statistics for the current fashion-net weights: {path.name}"
    with np.load(path) as z:
        feats, mu, sigma = z["features"], z["mu"], z["sigma"]
    assert feats.shape == (10_000, 64)
    np.testing.assert_allclose(feats.astype(np.float64).mean(0), mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.cov(feats.astype(np.float64), rowvar=False), sigma, rtol=1e-4, atol=1e-6)


def test_eval_fashion_mnist_without_the_dataset(tmp_path, monkeypatch):
    monkeypatch.setattr(fm, "DEFAULT_ROOT", tmp_path / "no-dataset-here")
    out = tmp_path / "out"
    args = ["eval", "fashion_mnist", "-n", "8", "--steps", "4", "--metrics", "fid,kid", "--device", "cpu", "-q",
            "--stats-dir", str(tmp_path / "empty-cache"), "--json", str(out / "e.json"), "--markdown", str(out / "e.md")]
    assert main(args) == 0
    report = json.loads((out / "e.json").read_text())
    assert report["stats_cached"] is True and Path(report["stats_path"]).parent == SHIPPED_STATS
    assert report["report"]["n_real"] == 10_000 and report["report"]["fid"] > 0
    assert not (tmp_path / "empty-cache").exists()  # nothing recomputed, nothing written


def test_a_damaged_cache_file_is_a_notice_and_recomputed(tmp_path):
    cache = StatsCache(tmp_path)
    key = StatsKey("shapes", "test", "net@0", 32, 4)
    cache.path(key).write_bytes(b"PK\x03\x04 truncated")
    with pytest.warns(UserWarning, match="unreadable"):
        assert cache.load(key) is None


@pytest.mark.skipif(not (fm.DEFAULT_ROOT / "train-images-idx3-ubyte.gz").is_file()
                    and not (fm.DEFAULT_ROOT / "train-images-idx3-ubyte").is_file(),
                    reason="needs Debian's dataset-fashion-mnist to recompute the shipped features")
def test_shipped_features_match_a_fresh_extraction(tmp_path):
    from pakhsh.data import DataConfig
    from pakhsh.evaluation import reference_dataset, reference_features

    ext, ext_id = load_extractor(None, "fashion_mnist")
    ds = reference_dataset(DataConfig(name="fashion_mnist", split="train", image_size=32), 10_000)
    ref = reference_features(StatsCache(tmp_path), _key(), ds, ext, 256, False)
    with np.load(SHIPPED_STATS / _key().filename()) as z:
        np.testing.assert_allclose(ref.features.features.numpy(), z["features"], rtol=1e-5, atol=1e-5)
