"""pakhsh.evaluation: a folder of images against a tiny built-in split, with the shipped feature nets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pakhsh.data import DataConfig, build_dataset
from pakhsh.data.image_folder import CorruptImageError
from pakhsh.evaluation import EvalConfig, evaluate, load_extractor, shipped_feature_nets
from pakhsh.imageio import save_images
from pakhsh.metrics import FeatureNetExtractor

pytestmark = pytest.mark.filterwarnings("ignore:only .* samples", "ignore:KID subset size")


def shapes_folder(folder: Path, n: int = 24, size: int = 32) -> Path:
    """n images of the built-in shapes test split written as PNGs at `size` (RGB; generated, needs no download)."""
    ds = build_dataset(DataConfig(name="shapes", image_size=size, split="test", length=n))
    save_images(torch.stack([ds[i]["image"] for i in range(n)]), folder)
    return folder


def tiny_cfg(folder: Path, stats: Path, **kw) -> EvalConfig:
    base = dict(source=str(folder), dataset="shapes", split="test", num_real=48, stats_dir=str(stats),
                progress=False, device="cpu", batch_size=32)
    return EvalConfig(**{**base, **kw})


def test_shipped_feature_nets_are_found():
    assert {"fashion_mnist", "shapes"} <= set(shipped_feature_nets())
    ext, ext_id = load_extractor(None, "fashion_mnist")
    assert isinstance(ext, FeatureNetExtractor)
    assert ext.name == "fashion-net" and ext_id.startswith("fashion-net@") and len(ext_id.split("@")[1]) == 10
    assert (ext.in_channels, ext.image_size) == (1, 32)
    shapes, _ = load_extractor(None, "shapes")
    assert shapes.name == "shapes-net" and shapes.in_channels == 3


def test_unknown_feature_net_lists_the_shipped_ones():
    with pytest.raises(FileNotFoundError, match="fashion_mnist"):
        load_extractor(None, "digits")
    with pytest.raises(FileNotFoundError, match="inception"):
        load_extractor("no-such-net", "fashion_mnist")


def test_folder_against_split_and_stats_cache_reuse(tmp_path):
    folder = shapes_folder(tmp_path / "imgs")
    first = evaluate(tiny_cfg(folder, tmp_path / "stats"))
    rep = first.report
    assert rep.labels()["fid"] == "FID[shapes-net]-24"
    assert (rep.n_real, rep.n_fake) == (48, 24)
    assert rep.fid is not None and rep.fid >= 0 and rep.is_mean >= 1.0 and 0 <= rep.precision <= 1
    assert first.kind == "images" and not first.stats_cached
    stats = Path(first.stats_path)
    assert stats.is_file() and stats.parent == tmp_path / "stats"
    assert "shapes__test__shapes-net" in stats.name and "32px__n48" in stats.name
    stamp = stats.stat().st_mtime_ns
    second = evaluate(tiny_cfg(folder, tmp_path / "stats"))
    assert second.stats_cached and stats.stat().st_mtime_ns == stamp  # read, not rewritten
    assert second.report.fid == pytest.approx(rep.fid)
    assert json.loads(json.dumps(second.to_dict()))["labels"]["fid"] == "FID[shapes-net]-24"


def test_real_images_score_better_than_noise(tmp_path):
    good = evaluate(tiny_cfg(shapes_folder(tmp_path / "real"), tmp_path / "stats", metrics=("fid",)))
    noise = (torch.rand(24, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    save_images(noise, tmp_path / "noise")
    bad = evaluate(tiny_cfg(tmp_path / "noise", tmp_path / "stats", metrics=("fid",)))
    assert good.report.fid < bad.report.fid


def test_size_mismatch_is_a_notice_or_a_strict_error(tmp_path):
    folder = shapes_folder(tmp_path / "small", size=28)
    with pytest.warns(UserWarning, match=r"\(3, 28, 28\)"):
        res = evaluate(tiny_cfg(folder, tmp_path / "stats", metrics=("fid",)))
    assert any("(3, 28, 28)" in n and "converted" in n for n in res.notices)
    assert "converted" in res.to_markdown()
    with pytest.raises(ValueError, match="strict"):
        evaluate(tiny_cfg(folder, tmp_path / "stats", metrics=("fid",), strict=True))


def test_channel_mismatch_is_converted_with_a_notice(tmp_path):
    rgb = shapes_folder(tmp_path / "rgb").glob("*.png")
    from PIL import Image

    (tmp_path / "grey").mkdir()
    for p in rgb:
        Image.open(p).convert("L").save(tmp_path / "grey" / p.name)
    with pytest.warns(UserWarning, match="converted"):
        res = evaluate(tiny_cfg(tmp_path / "grey", tmp_path / "stats", metrics=("fid",)))
    assert any("(1, 32, 32)" in n for n in res.notices)


def test_unreadable_file_is_named(tmp_path):
    folder = shapes_folder(tmp_path / "imgs", n=20)
    bad = folder / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.warns(UserWarning, match="broken.png"):
        res = evaluate(tiny_cfg(folder, tmp_path / "stats", metrics=("fid",)))
    assert res.report.n_fake == 20
    with pytest.raises(CorruptImageError, match="broken.png"):
        evaluate(tiny_cfg(folder, tmp_path / "stats", metrics=("fid",), strict=True))


def test_folder_needs_a_dataset_and_cannot_give_bpd(tmp_path):
    folder = shapes_folder(tmp_path / "imgs", n=4)
    with pytest.raises(ValueError, match="--dataset"):
        evaluate(tiny_cfg(folder, tmp_path / "stats", dataset=None))
    with pytest.raises(ValueError, match="checkpoint"):
        evaluate(tiny_cfg(folder, tmp_path / "stats", bpd=True))
    with pytest.raises(ValueError, match="unknown metric"):
        evaluate(tiny_cfg(folder, tmp_path / "stats", metrics=("fid", "lpips")))
