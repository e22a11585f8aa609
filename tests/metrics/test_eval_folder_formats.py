"""`evaluate` on a folder reads every image at the reference's format: one odd file cannot decide for the rest."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pakhsh.data import DataConfig, build_dataset
from pakhsh.evaluation import EvalConfig, evaluate, image_folder
from pakhsh.imageio import save_images

pytestmark = pytest.mark.filterwarnings("ignore:only .* samples", "ignore:KID subset size")


def shapes_folder(folder: Path, n: int = 24) -> Path:
    """n shapes test images as 32 px RGB PNGs (000000.png, ...)."""
    ds = build_dataset(DataConfig(name="shapes", image_size=32, split="test", length=n))
    save_images(torch.stack([ds[i]["image"] for i in range(n)]), folder)
    return folder


def cfg(folder: Path, stats: Path, **kw) -> EvalConfig:
    base = dict(source=str(folder), dataset="shapes", split="train", num_real=48, stats_dir=str(stats),
                progress=False, device="cpu", batch_size=32, metrics=("fid",))
    return EvalConfig(**{**base, **kw})


def test_one_tiny_file_sorted_first_does_not_shrink_the_others(tmp_path):
    folder = shapes_folder(tmp_path / "imgs")
    clean = evaluate(cfg(folder, tmp_path / "stats")).report.fid
    Image.new("RGB", (1, 1), (250, 20, 20)).save(folder / "0.png")  # sorts before 000000.png
    with pytest.warns(UserWarning, match=r"0\.png is \(3, 1, 1\)"):
        res = evaluate(cfg(folder, tmp_path / "stats"))
    assert res.report.n_fake == 25
    assert res.report.fid < 1.5 * clean  # read at 1x1, every image would score ~15x worse
    assert any("0.png" in n and "converted to (3, 32, 32)" in n for n in res.notices)
    with pytest.raises(ValueError, match=r"0\.png is \(3, 1, 1\).*strict"):
        evaluate(cfg(folder, tmp_path / "stats", strict=True))


def test_one_16bit_grey_file_does_not_make_colour_images_grey(tmp_path):
    folder = shapes_folder(tmp_path / "imgs", n=4)
    grey16 = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 60).astype(np.uint16)
    Image.fromarray(grey16).save(folder / "0.png")  # mode I;16
    with pytest.warns(UserWarning, match=r"0\.png is \(1, 32, 32\)"):
        ds = image_folder(str(folder), strict=False, limit=None, shape=(3, 32))
    colour = ds[1]["image"]
    assert colour.shape == (3, 32, 32)
    assert not torch.allclose(colour[0], colour[1])  # still colour: the grey file did not decide
    assert ds[0]["image"].shape == (3, 32, 32)


def test_only_files_within_the_limit_are_reported(tmp_path):
    folder = shapes_folder(tmp_path / "imgs", n=4)
    Image.new("RGB", (20, 20)).save(folder / "zz_last.png")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ds = image_folder(str(folder), strict=False, limit=4, shape=(3, 32))
    assert len(ds) == 4 and not any("zz_last" in str(w.message) for w in record)
