"""Uncropping canvases and panorama bookkeeping: exact copies, exact stitching, no seams, tile counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pakhsh.tasks import panorama_step, panorama_tiles_needed, stitch_panorama, uncrop_canvas, uncrop_mask


def _image(h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _pil_resize(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Independent reference: PIL's antialiased bilinear resize of each channel in float mode."""
    chans = [np.asarray(Image.fromarray(c.numpy(), mode="F").resize((w, h), Image.BILINEAR)) for c in x[0]]
    return torch.from_numpy(np.stack(chans))[None]


@pytest.mark.parametrize("side, rows, cols", [
    ("right", slice(0, 32), slice(0, 36)), ("left", slice(0, 32), slice(12, 48)),
    ("top", slice(8, 32), slice(0, 48)), ("bottom", slice(0, 24), slice(0, 48)),
    ("all", slice(8, 24), slice(12, 36)),
])
def test_uncrop_canvas_holds_resized_image(side: str, rows: slice, cols: slice) -> None:
    x = _image(32, 48)
    canvas, mask = uncrop_canvas(x, side, 0.25)
    assert canvas.shape == x.shape and mask.shape == (1, 1, 32, 48)
    assert torch.equal(mask[0], uncrop_mask(32, 48, side, 0.25))
    known = canvas[:, :, rows, cols]
    ref = _pil_resize(x, rows.stop - rows.start, cols.stop - cols.start)
    torch.testing.assert_close(known, ref, atol=2e-3, rtol=0)
    assert (canvas * mask == 0).all()  # the band to generate is 0.0
    assert (mask[:, :, rows, cols] == 0).all() and mask.sum() == 32 * 48 - known[0, 0].numel()


def test_uncrop_canvas_squeezes_along_one_axis_only() -> None:
    x = torch.linspace(-1, 1, 32).view(1, 1, 32, 1).expand(1, 3, 32, 32).contiguous()  # constant along rows
    canvas, _ = uncrop_canvas(x, "right", 0.25)
    torch.testing.assert_close(canvas[..., :24], x[..., :24], atol=1e-6, rtol=0)


def test_uncrop_canvas_errors() -> None:
    with pytest.raises(ValueError, match="must be in \\(0, 0.5\\)"):
        uncrop_canvas(_image(), "all", 0.5)
    with pytest.raises(ValueError, match="uncrop side 'random'"):
        uncrop_canvas(_image(), "random", 0.25)
    with pytest.raises(ValueError, match="B, C, H, W"):
        uncrop_canvas(_image()[0], "left", 0.25)


def test_panorama_step_copies_exactly() -> None:
    prev = _image(16, 32)
    canvas, mask = panorama_step(prev, 0.25)
    assert torch.equal(canvas[..., :24], prev[..., 8:])
    assert (canvas[..., 24:] == 0).all()
    assert torch.equal(mask[0], uncrop_mask(16, 32, "right", 0.25))


def _scene(cols: torch.Tensor, h: int = 16) -> torch.Tensor:
    """A known image as a function of global column index: (1, 3, h, len(cols))."""
    rows = torch.arange(h, dtype=torch.float32).view(h, 1)
    c = cols.float().view(1, -1)
    chans = [torch.sin(0.3 * c + 0.1 * rows), torch.cos(0.17 * c - 0.2 * rows), (c % 7) / 7 - rows / h]
    return torch.stack(chans)[None].clamp(-1, 1)


@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.1])
def test_stitch_of_fake_generation_is_exact(fraction: float) -> None:
    w, n = 32, 6
    band = round(fraction * w)
    tiles = [_scene(torch.arange(w))]
    for k in range(1, n):
        canvas, mask = panorama_step(tiles[-1], fraction)
        # A fake model that paints the true scene into the masked columns of tile k (global cols k*band...).
        truth = _scene(torch.arange(k * band, k * band + w))
        tiles.append(torch.where(mask.bool(), truth, canvas))
    strip = stitch_panorama(tiles, fraction)
    assert strip.shape == (1, 3, 16, w + (n - 1) * band)
    assert torch.equal(strip, _scene(torch.arange(w + (n - 1) * band)))


def test_panorama_bookkeeping_adds_no_seams() -> None:
    w, band, n = 32, 8, 5
    source = _image(16, w + (n - 1) * band, seed=7)
    tiles = [source[..., k * band : k * band + w] for k in range(n)]
    for k in range(n - 1):
        canvas, mask = panorama_step(tiles[k], 0.25)
        keep = mask[0, 0, 0] == 0
        assert torch.equal(canvas[..., keep], tiles[k + 1][..., keep])
    strip = stitch_panorama(tiles, 0.25)
    assert torch.equal(strip, source)
    for k in range(1, n):  # the columns either side of each join
        join = w + (k - 1) * band
        assert torch.equal(strip[..., join - 1 : join + 1], source[..., join - 1 : join + 1])


def test_stitch_errors() -> None:
    with pytest.raises(ValueError, match="no tiles"):
        stitch_panorama([], 0.25)
    with pytest.raises(ValueError, match="tile 1 has shape"):
        stitch_panorama([_image(16, 32), _image(16, 24)], 0.25)


@pytest.mark.parametrize("width, tile_w, fraction, n", [
    (32, 32, 0.25, 1), (10, 32, 0.25, 1), (40, 32, 0.25, 2), (41, 32, 0.25, 3), (100, 32, 0.5, 6),
])
def test_panorama_tiles_needed(width: int, tile_w: int, fraction: float, n: int) -> None:
    assert panorama_tiles_needed(width, tile_w, fraction) == n


def test_panorama_tiles_needed_is_the_fewest() -> None:
    for width in range(1, 200, 7):
        n = panorama_tiles_needed(width, 32, 0.3)
        band = round(0.3 * 32)
        assert 32 + (n - 1) * band >= width
        assert n == 1 or 32 + (n - 2) * band < width


def test_panorama_errors() -> None:
    with pytest.raises(ValueError, match="new columns"):
        panorama_tiles_needed(100, 32, 0.0)
    with pytest.raises(ValueError, match="new columns"):
        panorama_step(_image(), 1.0)
    with pytest.raises(ValueError, match="panorama width=0"):
        panorama_tiles_needed(0, 32, 0.25)
