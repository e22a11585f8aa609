"""Generated masks (centre, boxes, free-form, uncropping bands), apply_mask, and user mask files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pakhsh.tasks import apply_mask, box_masks, center_mask, freeform_masks, load_mask, uncrop_mask


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _binary(m: torch.Tensor) -> bool:
    return m.dtype == torch.float32 and set(m.unique().tolist()) <= {0.0, 1.0}


def test_center_mask() -> None:
    m = center_mask(32, 48)
    assert m.shape == (1, 32, 48) and _binary(m)
    expected = torch.zeros(1, 32, 48)
    expected[:, 8:24, 12:36] = 1
    assert torch.equal(m, expected)
    assert center_mask(32, 32, fraction=0.25).sum() == 8 * 8


@pytest.mark.parametrize("make", [box_masks, freeform_masks])
def test_random_masks_shape_and_replay(make) -> None:
    m = make(16, 32, 40, _g(0))
    assert m.shape == (16, 1, 32, 40) and _binary(m)
    assert torch.equal(m, make(16, 32, 40, _g(0)))
    assert not torch.equal(m, make(16, 32, 40, _g(1)))
    cover = m.mean(dim=(1, 2, 3))
    assert (cover > 0).all() and (cover < 1).all()


def test_box_masks_are_unions_of_bounded_boxes() -> None:
    m = box_masks(64, 40, 40, _g(2), max_boxes=1)
    for i in range(64):
        rows, cols = m[i, 0].any(dim=1).nonzero(), m[i, 0].any(dim=0).nonzero()
        bh, bw = len(rows), len(cols)
        assert 4 <= bh <= 20 and 4 <= bw <= 20  # 10%..50% of each side
        assert m[i].sum() == bh * bw  # a single filled rectangle
    many = box_masks(64, 40, 40, _g(2)).mean(dim=(1, 2, 3))
    assert many.max() <= 0.75  # three boxes of at most a quarter each


def test_freeform_masks_cover_sensibly_and_are_irregular() -> None:
    m = freeform_masks(64, 32, 32, _g(3))
    cover = m.mean(dim=(1, 2, 3))
    assert 0.05 <= cover.mean() <= 0.7
    assert (cover >= 0.05).all() and (cover <= 0.7).all()
    # Strokes, not boxes: most masks fill well under their bounding box.
    fill = [m[i].sum() / (m[i, 0].any(1).sum() * m[i, 0].any(0).sum()) for i in range(64)]
    assert sum(f < 0.9 for f in fill) > 48
    assert len({tuple(m[i].flatten().tolist()) for i in range(64)}) == 64


def test_random_masks_leave_global_rng_alone() -> None:
    torch.manual_seed(0)
    before = torch.get_rng_state()
    box_masks(4, 16, 16, _g(0))
    freeform_masks(4, 16, 16, _g(0))
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("side, rows, cols", [
    ("left", slice(None), slice(0, 12)), ("right", slice(None), slice(36, 48)),
    ("top", slice(0, 8), slice(None)), ("bottom", slice(24, 32), slice(None)),
])
def test_uncrop_mask_bands(side: str, rows: slice, cols: slice) -> None:
    m = uncrop_mask(32, 48, side, 0.25)
    expected = torch.zeros(1, 32, 48)
    expected[:, rows, cols] = 1
    assert m.shape == (1, 32, 48) and _binary(m) and torch.equal(m, expected)


def test_uncrop_mask_all_is_a_border() -> None:
    m = uncrop_mask(32, 48, "all", 0.25)
    expected = torch.ones(1, 32, 48)
    expected[:, 8:24, 12:36] = 0
    assert torch.equal(m, expected)
    assert uncrop_mask(30, 30, "right", 0.1).sum() == 30 * 3  # round(3.0)


def test_uncrop_mask_rejects_empty_bands() -> None:
    with pytest.raises(ValueError, match="uncrop side 'middle'"):
        uncrop_mask(32, 32, "middle", 0.25)
    with pytest.raises(ValueError, match="nothing to generate"):
        uncrop_mask(32, 32, "left", 0.01)  # round(0.32) = 0 columns
    with pytest.raises(ValueError, match="on each side"):
        uncrop_mask(32, 32, "all", 0.5)


def test_apply_mask() -> None:
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    m = uncrop_mask(8, 8, "left", 0.5)  # (1, H, W) broadcasts
    y = apply_mask(x, m)
    assert torch.equal(y[..., 4:], x[..., 4:])
    assert (y[..., :4] == 0).all() and not torch.signbit(y[..., :4]).any()  # +0.0, not -0.0


# --- user mask files ----------------------------------------------------------------------------------------

def _save(path: Path, arr: np.ndarray) -> Path:
    Image.fromarray(arr).save(path)
    return path


def test_load_mask_binary(tmp_path: Path) -> None:
    arr = np.zeros((30, 40), dtype=np.uint8)
    arr[5:15, 10:20] = 255
    mask, notice = load_mask(_save(tmp_path / "mask.png", arr), (30, 40))
    assert notice is None
    assert mask.shape == (1, 30, 40) and mask.dtype == torch.float32
    assert torch.equal(mask[0], torch.from_numpy(arr == 255).float())


def test_load_mask_rgb_file(tmp_path: Path) -> None:
    arr = np.zeros((16, 16, 3), dtype=np.uint8)
    arr[:8] = 255
    mask, notice = load_mask(_save(tmp_path / "m.png", arr), (16, 16))
    assert notice is None and mask[0, :8].eq(1).all() and mask[0, 8:].eq(0).all()


def test_load_mask_thresholds_grey(tmp_path: Path) -> None:
    arr = np.array([[0, 100, 127, 128, 200, 255]] * 4, dtype=np.uint8)
    mask, notice = load_mask(_save(tmp_path / "soft.png", arr), (4, 6))
    assert notice is not None and "soft.png is not binary" in notice and "128" in notice
    assert mask[0, 0].tolist() == [0, 0, 0, 1, 1, 1]


def test_load_mask_wrong_size_names_both(tmp_path: Path) -> None:
    path = _save(tmp_path / "mask.png", np.full((30, 40), 255, dtype=np.uint8))
    with pytest.raises(ValueError, match=r"mask\.png is 40x30 but the image is 64x64 \(W x H\)"):
        load_mask(path, (64, 64))


def test_load_mask_all_black(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="black.png is all black"):
        load_mask(_save(tmp_path / "black.png", np.zeros((8, 8), dtype=np.uint8)), (8, 8))


def test_load_mask_not_an_image(tmp_path: Path) -> None:
    text = tmp_path / "notes.png"
    text.write_text("not an image\n")
    with pytest.raises(ValueError, match="notes.png"):
        load_mask(text, (8, 8))
    with pytest.raises(ValueError, match="missing.png: no such"):
        load_mask(tmp_path / "missing.png", (8, 8))
    truncated = tmp_path / "cut.png"
    _save(tmp_path / "whole.png", np.full((64, 64), 255, dtype=np.uint8))
    truncated.write_bytes((tmp_path / "whole.png").read_bytes()[:60])
    with pytest.raises(ValueError, match="cut.png"):
        load_mask(truncated, (64, 64))
