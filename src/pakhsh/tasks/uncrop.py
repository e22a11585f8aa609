"""Uncropping at inference: a user image placed on a larger canvas, and panoramas grown tile by tile.

A panorama grows to the right: each step keeps the right (1 - fraction) of the previous tile, shifted left
without resampling, and generates round(fraction * W) new columns. Stitching the first tile with each later
tile's new columns gives a strip W + (n - 1) * round(fraction * W) wide.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from pakhsh.tasks.config import check_uncrop_fraction
from pakhsh.tasks.masks import band_width, uncrop_mask


def _check_images(x: Tensor, what: str) -> None:
    if x.ndim != 4:
        raise ValueError(f"{what}: expected images (B, C, H, W), got shape {tuple(x.shape)}")


def known_region(h: int, w: int, side: str, fraction: float) -> tuple[slice, slice]:
    """(rows, cols) of the pixels an uncropping keeps: everything outside `uncrop_mask`'s band."""
    bh, bw = band_width(h, fraction), band_width(w, fraction)
    rows, cols = slice(0, h), slice(0, w)
    if side == "left":
        cols = slice(bw, w)
    elif side == "right":
        cols = slice(0, w - bw)
    elif side == "top":
        rows = slice(bh, h)
    elif side == "bottom":
        rows = slice(0, h - bh)
    else:  # all
        rows, cols = slice(bh, h - bh), slice(bw, w - bw)
    return rows, cols


def uncrop_canvas(image: Tensor, side: str, fraction: float) -> tuple[Tensor, Tensor]:
    """Prepare a user image (B, C, H, W) in [-1, 1] for uncropping on `side`.

    Returns (canvas (B, C, H, W), mask (B, 1, H, W)): the known region holds the whole image resized (bilinear,
    antialiased) to fit it, e.g. side="right", fraction=0.25 squeezes it into the left 75% of the columns and
    "all" into the centre; the band to generate is 0.0 and mask = `uncrop_mask`. H and W are unchanged.
    """
    _check_images(image, "uncrop_canvas")
    check_uncrop_fraction(fraction, side, "uncrop fraction")
    b, _, h, w = image.shape
    mask = uncrop_mask(h, w, side, fraction)  # validates side and that both band and known part are non-empty
    rows, cols = known_region(h, w, side, fraction)
    size = (rows.stop - rows.start, cols.stop - cols.start)
    fitted = F.interpolate(image.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
    canvas = torch.zeros_like(image)
    canvas[:, :, rows, cols] = fitted.clamp(-1.0, 1.0).to(image.dtype)
    return canvas, mask.to(image.device).expand(b, 1, h, w).contiguous()


def _panorama_band(w: int, fraction: float) -> int:
    band = band_width(w, fraction)
    if not 0.0 < fraction < 1.0 or not 1 <= band < w:
        raise ValueError(f"panorama fraction {fraction} of a {w}-pixel-wide tile gives {band} new columns: "
                         f"must be 1..{w - 1}")
    return band


def panorama_step(prev: Tensor, fraction: float) -> tuple[Tensor, Tensor]:
    """Previous tile (B, C, H, W) -> (canvas, mask (B, 1, H, W)) for extending it to the right.

    The canvas's left W - band columns are prev's right W - band columns, copied bit for bit; its rightmost
    band = round(fraction * W) columns are 0.0 and are the mask's ones.
    """
    _check_images(prev, "panorama_step")
    b, _, h, w = prev.shape
    band = _panorama_band(w, fraction)
    canvas = torch.zeros_like(prev)
    canvas[..., : w - band] = prev[..., band:]
    mask = torch.zeros(b, 1, h, w, dtype=torch.float32, device=prev.device)
    mask[..., w - band :] = 1.0
    return canvas, mask


def stitch_panorama(tiles: list[Tensor], fraction: float) -> Tensor:
    """Tiles from repeated `panorama_step` + generation -> (B, C, H, W + (n - 1) * band): the first tile, then
    each later tile's new rightmost band = round(fraction * W) columns."""
    if not tiles:
        raise ValueError("stitch_panorama: no tiles")
    for i, t in enumerate(tiles):
        _check_images(t, f"stitch_panorama tile {i}")
        if t.shape != tiles[0].shape:
            raise ValueError(f"stitch_panorama: tile {i} has shape {tuple(t.shape)}, tile 0 {tuple(tiles[0].shape)}")
    w = tiles[0].shape[-1]
    band = _panorama_band(w, fraction)
    return torch.cat([tiles[0]] + [t[..., w - band :] for t in tiles[1:]], dim=-1)


def panorama_tiles_needed(width: int, tile_w: int, fraction: float) -> int:
    """Tiles (the first one included) whose stitched strip is at least `width` wide; the caller crops it."""
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"panorama width={width!r}: must be a positive whole number of pixels")
    if isinstance(tile_w, bool) or not isinstance(tile_w, int) or tile_w < 2:
        raise ValueError(f"panorama tile width={tile_w!r}: must be a whole number of at least 2 pixels")
    band = _panorama_band(tile_w, fraction)
    return 1 + max(0, math.ceil((width - tile_w) / band))
