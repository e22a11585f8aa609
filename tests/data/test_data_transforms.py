"""Mode conversion, resize/crop/flip and ImageTransform, on tiny images written to and read back from disk."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pakhsh.data.transforms import (
    ImageTransform,
    center_crop,
    normalize_mode,
    pil_to_tensor,
    random_crop,
    random_hflip,
    resize_shorter,
)
from pakhsh.config import ConfigError, from_dict


def roundtrip(img: Image.Image, tmp_path, name: str) -> Image.Image:
    """Save and reopen, so the test sees the mode a real file decodes to."""
    path = tmp_path / name
    img.save(path)
    out = Image.open(path)
    out.load()
    return out


def to_tensor(img: Image.Image, channels: int, alpha: str = "white") -> torch.Tensor:
    return pil_to_tensor(normalize_mode(img, channels, alpha), channels)


def as_u8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] tensor back to 0..255 floats for readable expectations."""
    return ((x + 1) * 127.5).numpy()


def test_rgb(tmp_path):
    img = roundtrip(Image.new("RGB", (2, 1), (255, 0, 0)), tmp_path, "rgb.png")
    assert img.mode == "RGB"
    x = to_tensor(img, 3)
    assert x.shape == (3, 1, 2) and x.dtype == torch.float32
    assert torch.equal(x[:, 0, 0], torch.tensor([1.0, -1.0, -1.0]))
    grey = to_tensor(img, 1)  # ITU-R 601 luma of pure red is 76
    assert grey.shape == (1, 1, 2) and as_u8(grey)[0, 0, 0] == pytest.approx(76, abs=0.5)


def test_l_and_repeat_to_rgb(tmp_path):
    img = roundtrip(Image.fromarray(np.array([[0, 255, 51]], dtype=np.uint8)), tmp_path, "l.png")
    assert img.mode == "L"
    x = to_tensor(img, 1)
    assert x.shape == (1, 1, 3)
    assert np.allclose(as_u8(x)[0, 0], [0, 255, 51], atol=1e-4)
    x3 = to_tensor(img, 3)
    assert x3.shape == (3, 1, 3) and torch.equal(x3[0], x3[2])


def test_rgba_composites_over_white_or_drops(tmp_path):
    arr = np.array([[[0, 0, 0, 0], [0, 0, 0, 255], [0, 0, 0, 128], [200, 10, 10, 0]]], dtype=np.uint8)
    img = roundtrip(Image.fromarray(arr, "RGBA"), tmp_path, "rgba.png")
    assert img.mode == "RGBA"
    white = as_u8(to_tensor(img, 3, "white"))[:, 0]  # (3, 4)
    assert np.allclose(white[:, 0], 255) and np.allclose(white[:, 1], 0)
    assert np.allclose(white[:, 2], 127, atol=1.5)  # half-transparent black over white is mid grey
    dropped = as_u8(to_tensor(img, 3, "drop"))[:, 0]
    assert np.allclose(dropped[:, 0], 0) and np.allclose(dropped[:, 3], [200, 10, 10], atol=1e-3)


def test_la_composites(tmp_path):
    arr = np.array([[[0, 0], [0, 255]]], dtype=np.uint8)
    img = roundtrip(Image.fromarray(arr, "LA"), tmp_path, "la.png")
    assert img.mode == "LA"
    x = as_u8(to_tensor(img, 1))
    assert x.shape == (1, 1, 2) and np.allclose(x[0, 0], [255, 0], atol=1e-3)


def test_palette_with_transparency(tmp_path):
    img = Image.new("P", (2, 1))
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.putpixel((0, 0), 0)
    img.putpixel((1, 0), 1)
    img.info["transparency"] = 1  # palette entry 1 (blue) is transparent
    img = roundtrip(img, tmp_path, "p.png")
    assert img.mode == "P"
    x = as_u8(to_tensor(img, 3))[:, 0]
    assert np.allclose(x[:, 0], [255, 0, 0], atol=1e-3)
    assert np.allclose(x[:, 1], [255, 255, 255], atol=1e-3)  # transparent -> white, not blue


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_16bit_scales_instead_of_clipping(tmp_path, dtype):
    values = np.array([[0, 65535, 32768, 1000]], dtype=dtype)
    img = Image.fromarray(values)
    if dtype == np.uint16:
        img = roundtrip(img, tmp_path, "i16.png")
        assert img.mode.startswith("I;16")
    else:
        assert img.mode == "I"
    x = as_u8(to_tensor(img, 1))[0, 0]
    expected = values[0].astype(np.float64) * 255 / 65535
    assert np.allclose(x, expected, atol=1e-3)  # 1000 -> 3.9, not clipped to 255
    assert to_tensor(img, 3).shape == (3, 1, 4)


def test_cmyk(tmp_path):
    arr = np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 0, 0, 255]]], dtype=np.uint8)
    img = roundtrip(Image.fromarray(arr, "CMYK"), tmp_path, "cmyk.tif")
    assert img.mode == "CMYK"
    x = as_u8(to_tensor(img, 3))[:, 0]
    assert np.allclose(x[:, 0], [255, 255, 255], atol=1e-3)  # no ink: white
    assert np.allclose(x[:, 1], [0, 255, 255], atol=1e-3)  # cyan
    assert np.allclose(x[:, 2], [0, 0, 0], atol=1e-3)  # full black


def test_one_bit(tmp_path):
    img = Image.new("1", (2, 1), 0)
    img.putpixel((1, 0), 1)
    img = roundtrip(img, tmp_path, "bw.png")
    assert img.mode == "1"
    assert torch.equal(to_tensor(img, 1)[0, 0], torch.tensor([-1.0, 1.0]))


def test_resize_shorter_and_crops():
    img = Image.new("RGB", (40, 20))
    assert resize_shorter(img, 10).size == (20, 10)
    arr = np.arange(6 * 4, dtype=np.uint8).reshape(4, 6)  # (H=4, W=6)
    small = Image.fromarray(arr)
    assert np.array_equal(np.asarray(center_crop(small, 4)), arr[:, 1:5])
    a = random_crop(small, 2, torch.Generator().manual_seed(3))
    b = random_crop(small, 2, torch.Generator().manual_seed(3))
    assert np.array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="cannot crop"):
        center_crop(small, 5)


def test_flip_deterministic_with_generators():
    img = Image.fromarray(np.array([[0, 255]], dtype=np.uint8))
    flips = {np.asarray(random_hflip(img, np.random.RandomState(s)))[0, 0] for s in range(20)}
    assert flips == {0, 255}  # both outcomes occur
    for rng_factory in (lambda: np.random.default_rng(7), lambda: torch.Generator().manual_seed(7)):
        runs = [[np.asarray(random_hflip(img, r))[0, 0] for _ in range(10)] for r in (rng_factory(), rng_factory())]
        assert runs[0] == runs[1]


def test_image_transform_any_input():
    t = ImageTransform(size=16, channels=3, crop="random", random_flip=True)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 50, 4), dtype=np.uint8), "RGBA")
    x = t(img, np.random.default_rng(1))
    assert x.shape == (3, 16, 16) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(x, t(img, np.random.default_rng(1)))
    assert ImageTransform(size=8, channels=1)(img).shape == (1, 8, 8)


def test_image_transform_config():
    t = from_dict(ImageTransform, {"size": "24", "crop": "random"})
    assert t.size == 24 and t.crop == "random"
    with pytest.raises(ConfigError, match="sizee"):
        from_dict(ImageTransform, {"sizee": 3})
    with pytest.raises(ConfigError, match="crop"):
        from_dict(ImageTransform, {"size": 3, "crop": "middle"})
