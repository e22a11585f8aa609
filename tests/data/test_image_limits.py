"""Image files that must not be decoded as they are (bombs, huge files) or that are silently upscaled (tiny ones):
the image-folder dataset names them; a data path that is a file is refused with a clear message."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

import pakhsh.data.image_folder as image_folder
from pakhsh.data import DataConfig, build_dataset
from pakhsh.data.image_folder import CorruptImageError, ImageFolderDataset, ImageTooLargeError, open_image
from tests.conftest import noise, png_header


@pytest.fixture
def small_limit(monkeypatch):
    """MAX_PIXELS of 100x100, so that "too large" costs a 400x400 file rather than gigabytes."""
    monkeypatch.setattr(image_folder, "MAX_PIXELS", 100 * 100)


def test_bomb_is_skipped_and_named(tmp_path):
    for i in range(3):
        noise(tmp_path / f"{i}.png", seed=i)
    png_header(tmp_path / "bomb.png", 40_000, 40_000)
    with pytest.warns(UserWarning, match=r"bomb\.png \(too large to decode safely"):
        ds = ImageFolderDataset(tmp_path, 32)
    assert len(ds) == 3 and ds.skipped == [str(tmp_path / "bomb.png")]
    with pytest.raises(CorruptImageError, match=r"bomb\.png.*1600000000 pixels"):
        ImageFolderDataset(tmp_path, 32, strict=True)


def test_over_the_pixel_limit_is_skipped_unless_jpeg(tmp_path, small_limit):
    noise(tmp_path / "a.png")
    noise(tmp_path / "big.png", (400, 400))
    noise(tmp_path / "big.jpg", (400, 400))  # decoded at 1/8 scale: 50x50
    with pytest.warns(UserWarning, match=r"big\.png \(400x400"):
        ds = ImageFolderDataset(tmp_path, 32)
    assert [Path(p).name for p in ds.paths] == ["a.png", "big.jpg"]
    assert ds[1]["image"].shape == (3, 32, 32)


def test_load_time_guard_without_verification(tmp_path, small_limit):
    noise(tmp_path / "a.png")
    noise(tmp_path / "b.png", (400, 400))
    ds = ImageFolderDataset(tmp_path, 32, verify=False)
    with pytest.warns(UserWarning, match=r"b\.png is 400x400"):
        assert ds[1]["path"].endswith("a.png")  # the next readable file stands in
    with pytest.raises(ImageTooLargeError, match="400x400"):
        ImageFolderDataset(tmp_path, 32, verify=False, strict=True)[1]


def test_open_image_reduces_large_jpegs_toward_the_target(tmp_path, small_limit):
    img = open_image(noise(tmp_path / "big.jpg", (400, 400)), size=32)
    assert img.size == (50, 50)  # the smallest DCT scale still >= 32 per side
    with pytest.raises(ImageTooLargeError, match=r"big\.jpg is 400x400"):
        open_image(tmp_path / "big.jpg")  # no target size: no reduced decode


def test_tiny_images_are_named(tmp_path):
    noise(tmp_path / "a.png")
    noise(tmp_path / "dot.png", (1, 1))
    noise(tmp_path / "half.png", (16, 20))  # exactly half: fine
    with pytest.warns(UserWarning, match=r"1 image\(s\) smaller than half of 32x32.*dot\.png \(1x1\)"):
        ds = ImageFolderDataset(tmp_path, 32)
    assert len(ds) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ImageFolderDataset(tmp_path, 2)  # nothing is small for a 2 px model


def test_data_path_that_is_a_file(tmp_path):
    afile = noise(tmp_path / "one.png")
    with pytest.raises(NotADirectoryError, match=r"one\.png is a file, not a folder"):
        build_dataset(DataConfig(name="folder", path=str(afile)))
    idx = tmp_path / "train-images-idx3-ubyte"
    idx.write_bytes(b"\0\0\x08\x03")
    with pytest.raises(NotADirectoryError, match=r"Fashion-MNIST root .*train-images-idx3-ubyte is a file"):
        build_dataset(DataConfig(name="fashion_mnist", path=str(idx)))
