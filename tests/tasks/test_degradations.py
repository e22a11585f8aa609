"""Luma, JPEG round trips and `degrade` for each task: values, masks, task ids, determinism, RNG hygiene."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pakhsh.tasks import (
    TASK_NAMES, TaskConfig, center_mask, degrade, jpeg_compress, to_luma, uncrop_mask,
)


def _images(b: int = 8, c: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Random images in [-1, 1]: smooth (upsampled noise) so JPEG behaves as on photos."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(b, c, size // 4, size // 4, generator=g) * 2 - 1
    return F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False).clamp(-1, 1)


# --- luma -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rgb, y", [((1, 0, 0), 0.299), ((0, 1, 0), 0.587), ((0, 0, 1), 0.114),
                                    ((1, 1, 1), 1.0), ((0, 0, 0), 0.0), ((1, 1, 0), 0.886)])
def test_luma_of_known_colours(rgb: tuple[int, int, int], y: float) -> None:
    x = (torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1) * 2 - 1).expand(2, 3, 4, 5)
    out = to_luma(x)
    assert out.shape == (2, 3, 4, 5)
    torch.testing.assert_close((out + 1) / 2, torch.full_like(out, y), atol=1e-6, rtol=0)


def test_luma_is_grey_and_matches_pil() -> None:
    arr = np.random.default_rng(0).integers(0, 256, (16, 20, 3), dtype=np.uint8)
    x = torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 127.5 - 1
    y = to_luma(x)
    assert torch.equal(y[:, 0], y[:, 1]) and torch.equal(y[:, 1], y[:, 2])
    ours = ((y[0, 0] + 1) * 127.5).numpy()
    pil = np.asarray(Image.fromarray(arr).convert("L"), dtype=np.float64)
    assert np.abs(ours - pil).max() <= 1.0  # PIL rounds its fixed-point result to a level


def test_luma_of_grey_input_repeats_it() -> None:
    x = _images(c=1)
    assert torch.equal(to_luma(x), x.repeat(1, 3, 1, 1))
    with pytest.raises(ValueError, match="B, 3, H, W"):
        to_luma(torch.zeros(1, 2, 4, 4))


# --- JPEG -------------------------------------------------------------------------------------------------

def test_jpeg_shape_range_and_levels() -> None:
    x = _images()
    y = jpeg_compress(x, 10)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert y.min() >= -1 and y.max() <= 1
    levels = (y + 1) * 127.5
    torch.testing.assert_close(levels, levels.round(), atol=1e-4, rtol=0)  # decoded 8-bit values
    assert not torch.equal(y, x)


def test_jpeg_lower_quality_larger_error() -> None:
    x = _images(b=4, size=64)
    err = {q: (jpeg_compress(x, q) - x).abs().mean().item() for q in (5, 30, 95)}
    assert err[5] > err[30] > err[95]
    grey = x[:, :1]  # no chroma subsampling (Pillow's default 4:2:0 blurs colour even at q=95)
    assert (jpeg_compress(grey, 95) - grey).abs().mean() < 0.02


def test_jpeg_grey_and_deterministic() -> None:
    x = _images(c=1)
    y = jpeg_compress(x, 20)
    assert y.shape == x.shape
    assert torch.equal(y, jpeg_compress(x.clone(), 20))


@pytest.mark.parametrize("quality", [0, 101, 5.5, -1, True, "50"])
def test_jpeg_quality_out_of_range(quality: object) -> None:
    with pytest.raises(ValueError, match=r"1\.\.100"):
        jpeg_compress(_images(b=1), quality)  # type: ignore[arg-type]


# --- degrade ----------------------------------------------------------------------------------------------

def _run(cfg: TaskConfig, x: torch.Tensor, seed: int = 0):
    return degrade(x, cfg, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", TASK_NAMES + ("multi",))
def test_degrade_shapes_ranges_and_ids(name: str) -> None:
    x = _images()
    (cond, mask), ids = _run(TaskConfig(name=name), x)
    assert cond.shape == x.shape and cond.dtype == x.dtype
    assert mask.shape == (8, 1, 32, 32) and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert cond.min() >= -1 and cond.max() <= 1
    assert ids.shape == (8,) and ids.dtype == torch.int64
    if name != "multi":
        assert (ids == TASK_NAMES.index(name)).all()


@pytest.mark.parametrize("name", ["inpaint", "uncrop"])
def test_degrade_keeps_known_pixels_exactly(name: str) -> None:
    x = _images()
    (cond, mask), _ = _run(TaskConfig(name=name), x)
    known = (mask == 0).expand_as(x)
    assert known.any() and (~known).any()
    assert torch.equal(cond[known], x[known])
    assert (cond[~known] == 0).all()
    per_image = mask.mean(dim=(1, 2, 3))
    assert (per_image > 0).all() and (per_image < 1).all()


def test_degrade_colorize_and_jpeg_values() -> None:
    x = _images()
    (cond, mask), _ = _run(TaskConfig(name="colorize"), x)
    assert torch.equal(cond, to_luma(x)) and (mask == 1).all()
    (cond, mask), _ = _run(TaskConfig(name="jpeg", jpeg_quality=(12, 12)), x)
    assert torch.equal(cond, jpeg_compress(x, 12)) and (mask == 1).all()


def test_degrade_jpeg_draws_quality_in_range() -> None:
    x = _images(b=4, size=64)
    (low, _), _ = _run(TaskConfig(name="jpeg", jpeg_quality=(5, 8)), x)
    (high, _), _ = _run(TaskConfig(name="jpeg", jpeg_quality=(90, 95)), x)
    assert (low - x).abs().mean() > (high - x).abs().mean()


def test_degrade_multi_draws_every_task_and_applies_it_per_image() -> None:
    x = _images(b=64, size=16)
    (cond, mask), ids = _run(TaskConfig(name="multi"), x)
    assert set(ids.tolist()) == {0, 1, 2, 3}
    for i, t in enumerate(ids.tolist()):
        task = TASK_NAMES[t]
        if task == "colorize":
            assert torch.equal(cond[i], to_luma(x[i : i + 1])[0]) and (mask[i] == 1).all()
        elif task == "jpeg":
            assert (mask[i] == 1).all() and not torch.equal(cond[i, 0], cond[i, 1])  # still colour
        else:
            assert 0 < mask[i].mean() < 1
            known = (mask[i] == 0).expand_as(x[i])
            assert torch.equal(cond[i][known], x[i][known])


@pytest.mark.parametrize("name", TASK_NAMES + ("multi",))
def test_degrade_is_deterministic_and_seed_dependent(name: str) -> None:
    x = _images()
    cfg = TaskConfig(name=name)
    (c1, m1), i1 = _run(cfg, x, seed=3)
    (c2, m2), i2 = _run(cfg, x, seed=3)
    assert torch.equal(c1, c2) and torch.equal(m1, m2) and torch.equal(i1, i2)
    if name != "colorize":  # the only task without randomness
        (c3, m3), i3 = _run(cfg, x, seed=4)
        assert not (torch.equal(c1, c3) and torch.equal(m1, m3) and torch.equal(i1, i3))


def test_degrade_leaves_global_rng_alone() -> None:
    x = _images()
    torch.manual_seed(123)
    np.random.seed(5)
    before, np_before = torch.get_rng_state(), np.random.get_state()[1].copy()
    for name in TASK_NAMES + ("multi",):
        _run(TaskConfig(name=name), x)
    assert torch.equal(torch.get_rng_state(), before)
    assert np.array_equal(np.random.get_state()[1], np_before)


@pytest.mark.parametrize("side", ["left", "right", "top", "bottom", "all"])
def test_degrade_uncrop_fixed_side(side: str) -> None:
    x = _images(b=4)
    (_, mask), _ = _run(TaskConfig(name="uncrop", uncrop_side=side, uncrop_fraction=0.25), x)
    assert torch.equal(mask, uncrop_mask(32, 32, side, 0.25).expand(4, 1, 32, 32))


def test_degrade_uncrop_random_draws_several_sides() -> None:
    (_, mask), _ = _run(TaskConfig(name="uncrop"), _images(b=32, size=16))
    bands = {tuple(mask[i].flatten().tolist()) for i in range(32)}
    assert len(bands) == 5


def test_degrade_inpaint_mask_kinds() -> None:
    x = _images(b=32, size=16)
    (_, mask), _ = _run(TaskConfig(name="inpaint", mask="center"), x)
    assert torch.equal(mask, center_mask(16, 16).expand(32, 1, 16, 16))
    (_, mask), _ = _run(TaskConfig(name="inpaint", mask="mixed"), x)
    is_center = [torch.equal(mask[i], center_mask(16, 16)) for i in range(32)]
    assert any(is_center) and not all(is_center)


def test_degrade_grey_images() -> None:
    x = _images(c=1)
    for name in ("inpaint", "uncrop", "jpeg"):
        (cond, _), _ = _run(TaskConfig(name=name), x)
        assert cond.shape == x.shape
    for name in ("colorize", "multi"):
        with pytest.raises(ValueError, match="colorize needs RGB"):
            _run(TaskConfig(name=name), x)


def test_degrade_bad_inputs() -> None:
    with pytest.raises(ValueError, match="B, 1 or 3, H, W"):
        _run(TaskConfig(), torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="CPU torch.Generator"):
        degrade(_images(), TaskConfig(name="inpaint"), None)  # type: ignore[arg-type]
