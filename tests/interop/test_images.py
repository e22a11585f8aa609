"""load_image: the user's own image file for vary/interpolate, refused or named when it is no fit."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import pakhsh.data.image_folder as image_folder
from pakhsh.imageio import load_image
from tests.conftest import noise, png_header


def test_decompression_bomb_names_file_and_size(tmp_path):
    with pytest.raises(ValueError, match=r"bomb\.png is too large.*1600000000 pixels"):
        load_image(png_header(tmp_path / "bomb.png", 40_000, 40_000), size=32)
    # above pakhsh's limit, below PIL's error threshold: refused before decoding, with width x height
    with pytest.raises(ValueError, match=r"big\.png is 10000x10000 \(100 MP\), over the 64 MP"):
        load_image(png_header(tmp_path / "big.png", 10_000, 10_000), size=32)


def test_large_jpeg_is_read_at_reduced_scale(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 256, (8, 8, 3)), np.ones((50, 50, 1))).astype(np.uint8)  # 400x400 blocks
    Image.fromarray(smooth).save(tmp_path / "big.jpg", quality=95)
    full = load_image(tmp_path / "big.jpg", size=32)
    monkeypatch.setattr(image_folder, "MAX_PIXELS", 100 * 100)
    reduced = load_image(tmp_path / "big.jpg", size=32)
    assert reduced.shape == full.shape == (1, 3, 32, 32)
    assert (reduced - full).abs().mean() < 0.05  # same picture, decoded at 1/8 scale
    noise(tmp_path / "big.png", (400, 400))
    with pytest.raises(ValueError, match=r"big\.png is 400x400"):
        load_image(tmp_path / "big.png", size=32)


def test_tiny_image_is_named_when_upscaled(tmp_path):
    noise(tmp_path / "dot.png", (1, 1))
    with pytest.warns(UserWarning, match=r"dot\.png is 1x1: upscaled to 32x32"):
        x = load_image(tmp_path / "dot.png", size=32)
    assert x.shape == (1, 3, 32, 32)
    noise(tmp_path / "ok.png", (16, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(tmp_path / "ok.png", size=32, channels=1).shape == (1, 1, 32, 32)


def test_folder_and_garbage_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="is a folder"):
        load_image(tmp_path, size=32)
    (tmp_path / "x.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"cannot read image .*x\.png"):
        load_image(tmp_path / "x.png", size=32)
    assert torch.is_tensor(load_image(noise(tmp_path / "y.png", (40, 30)), size=None))
