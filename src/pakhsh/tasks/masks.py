"""Masks of the pixels a model generates (1) versus keeps (0): centre box, random boxes, free-form strokes,
uncropping bands.

Every mask is float32 of exactly 0.0 / 1.0: (1, H, W) for a fixed mask, (B, 1, H, W) for a random batch.
Random masks take all their numbers from a CPU `torch.Generator`, never the global RNG, so a training step's
masks replay from its seed.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from pakhsh.tasks.config import UNCROP_SIDES


def _check_size(h: int, w: int) -> None:
    if h < 2 or w < 2:
        raise ValueError(f"mask size {w}x{h} (W x H): each side must be at least 2 pixels")


def check_generator(generator: torch.Generator) -> None:
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise ValueError("masks and degradations need a CPU torch.Generator (their numbers must replay on any device)")


def apply_mask(x0: Tensor, mask: Tensor) -> Tensor:
    """x0 with the pixels to generate (mask == 1) set to 0.0, mid grey; known pixels are kept bit for bit.

    x0 (B, C, H, W); mask (B, 1, H, W) or (1, H, W), broadcast over channels.
    """
    zero = torch.zeros((), dtype=x0.dtype, device=x0.device)
    return torch.where(mask.to(x0.device) > 0.5, zero, x0)  # where, not x0 * (1 - mask): no -0.0 and no NaN leaks


def band_width(size: int, fraction: float) -> int:
    """Pixels of a side of `size` pixels that an uncropping `fraction` generates: round(fraction * size)."""
    return int(round(fraction * size))


def center_mask(h: int, w: int, fraction: float = 0.5) -> Tensor:
    """(1, H, W): a centred box of round(fraction * H) rows by round(fraction * W) columns is 1."""
    _check_size(h, w)
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"center mask fraction={fraction}: must be in (0, 1)")
    bh, bw = max(1, band_width(h, fraction)), max(1, band_width(w, fraction))
    top, left = (h - bh) // 2, (w - bw) // 2
    mask = torch.zeros(1, h, w, dtype=torch.float32)
    mask[:, top : top + bh, left : left + bw] = 1.0
    return mask


def box_masks(b: int, h: int, w: int, generator: torch.Generator, max_boxes: int = 3) -> Tensor:
    """(B, 1, H, W): each image gets 1..max_boxes rectangles, each side 10%-50% of the image side, placed
    uniformly (they may overlap). Three boxes of at most a quarter of the area each never cover everything.
    """
    _check_size(h, w)
    check_generator(generator)
    if max_boxes < 1:
        raise ValueError(f"max_boxes={max_boxes}: must be at least 1")
    # A fixed count of numbers per call, whatever the draws, so later draws do not shift with these.
    count = torch.randint(1, max_boxes + 1, (b,), generator=generator)
    u = torch.rand(b, max_boxes, 4, generator=generator)
    sides = []
    for k, size in enumerate((h, w)):
        lo = max(1, band_width(size, 0.1))
        hi = max(lo, band_width(size, 0.5))
        extent = lo + (u[..., k] * (hi - lo + 1)).long().clamp(max=hi - lo)  # (B, max_boxes)
        start = (u[..., k + 2] * (size - extent + 1)).long().clamp(max=size - extent)
        grid = torch.arange(size).view(1, 1, size)
        sides.append((grid >= start[..., None]) & (grid < (start + extent)[..., None]))  # (B, max_boxes, size)
    rows, cols = sides
    used = torch.arange(max_boxes).view(1, max_boxes) < count[:, None]  # (B, max_boxes)
    boxes = rows[..., :, None] & cols[..., None, :] & used[..., None, None]  # (B, max_boxes, H, W)
    return boxes.any(dim=1, keepdim=True).float()


# DeepFill v2's free-form strokes (Yu et al. 2019), as Palette uses them; lengths are for 256 x 256 images
# and scale with the image so a 32 x 32 mask covers about as much as a 256 x 256 one.
_VERTICES = (4, 12)  # vertices per stroke, [lo, hi)
_STROKES = (1, 4)  # strokes per mask, [lo, hi)
_MEAN_ANGLE = 2 * math.pi / 5
_ANGLE_RANGE = 2 * math.pi / 15
_WIDTH_256 = (12.0, 40.0)  # brush width in pixels at 256 x 256
_COVER = (0.05, 0.7)  # a mask covering outside this fraction is redrawn: never (nearly) empty or all-covering
_MAX_TRIES = 50


class _Numbers:
    """Uniform and normal numbers from a torch.Generator, pulled in blocks (one torch call per block)."""

    def __init__(self, generator: torch.Generator, block: int = 256) -> None:
        self.generator, self.block = generator, block
        self.buf: list[float] = []

    def uniform(self, lo: float = 0.0, hi: float = 1.0) -> float:
        if not self.buf:
            self.buf = torch.rand(self.block, generator=self.generator, dtype=torch.float64).tolist()[::-1]
        return lo + (hi - lo) * self.buf.pop()

    def randint(self, lo: int, hi: int) -> int:
        """Uniform int in [lo, hi)."""
        return min(hi - 1, lo + int(self.uniform() * (hi - lo)))

    def normal(self, mean: float, std: float) -> float:
        u1, u2 = 1.0 - self.uniform(), self.uniform()  # Box-Muller; u1 in (0, 1] so the log is finite
        return mean + std * math.sqrt(-2.0 * math.log(u1)) * math.cos(2 * math.pi * u2)


def _freeform(h: int, w: int, rnd: _Numbers) -> np.ndarray:
    """One (H, W) uint8 0/1 free-form mask: 1-3 strokes of 4-11 vertices with round joints."""
    scale = math.sqrt(h * w) / 256.0
    radius = math.sqrt(h * h + w * w) / 8  # mean segment length
    img = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(img)
    for _ in range(rnd.randint(*_STROKES)):
        n = rnd.randint(*_VERTICES)
        a_min = _MEAN_ANGLE - rnd.uniform(0, _ANGLE_RANGE)
        a_max = _MEAN_ANGLE + rnd.uniform(0, _ANGLE_RANGE)
        # Alternate turning directions so a stroke zigzags instead of curling into a circle.
        angles = [rnd.uniform(a_min, a_max) * (-1 if i % 2 == 0 else 1) for i in range(n)]
        pts = [(rnd.uniform(0, w), rnd.uniform(0, h))]
        for a in angles:
            r = min(max(rnd.normal(radius, radius / 2), 0.0), 2 * radius)
            x = min(max(pts[-1][0] + r * math.cos(a), 0.0), w - 1.0)
            y = min(max(pts[-1][1] + r * math.sin(a), 0.0), h - 1.0)
            pts.append((x, y))
        width = max(1, int(round(rnd.uniform(*_WIDTH_256) * scale)))
        draw.line(pts, fill=1, width=width)
        half = width / 2
        for x, y in pts:  # round joints and ends, as a brush leaves them
            draw.ellipse((x - half, y - half, x + half, y + half), fill=1)
    mask = np.asarray(img, dtype=np.uint8)
    if rnd.uniform() < 0.5:
        mask = mask[::-1]
    if rnd.uniform() < 0.5:
        mask = mask[:, ::-1]
    return mask


def freeform_masks(b: int, h: int, w: int, generator: torch.Generator) -> Tensor:
    """(B, 1, H, W) irregular brush-stroke masks (DeepFill v2 / Palette free-form), typically 10-50% covered.

    A mask covering under 5% or over 70% of the image is redrawn from the same stream, so none is empty or
    all-covering and the result still replays from the generator's state.
    """
    _check_size(h, w)
    check_generator(generator)
    rnd = _Numbers(generator)
    out = np.zeros((b, 1, h, w), dtype=np.float32)
    for i in range(b):
        for _ in range(_MAX_TRIES):
            m = _freeform(h, w, rnd)
            if _COVER[0] <= m.mean() <= _COVER[1]:
                break
        else:  # a tiny image where strokes cannot land in the window: accept anything but empty / full
            m = np.zeros((h, w), dtype=np.uint8)
            m[h // 4 : h // 4 + max(1, h // 2), w // 4 : w // 4 + max(1, w // 2)] = 1
        out[i, 0] = m
    return torch.from_numpy(out)


def uncrop_mask(h: int, w: int, side: str, fraction: float) -> Tensor:
    """(1, H, W): the band an uncropping generates.

    left / right: the first / last round(fraction * W) columns; top / bottom: the first / last
    round(fraction * H) rows; all: a border of round(fraction * H) rows and round(fraction * W) columns on every
    side, the centre known.
    """
    _check_size(h, w)
    if side not in UNCROP_SIDES:
        raise ValueError(f"uncrop side {side!r}: use {', '.join(UNCROP_SIDES)}")
    bh, bw = band_width(h, fraction), band_width(w, fraction)
    mask = torch.zeros(1, h, w, dtype=torch.float32)
    if side in ("left", "right"):
        _check_band(bw, w, fraction, "columns", 1)
        cols = slice(0, bw) if side == "left" else slice(w - bw, w)
        mask[:, :, cols] = 1.0
    elif side in ("top", "bottom"):
        _check_band(bh, h, fraction, "rows", 1)
        rows = slice(0, bh) if side == "top" else slice(h - bh, h)
        mask[:, rows, :] = 1.0
    else:
        _check_band(bh, h, fraction, "rows", 2)
        _check_band(bw, w, fraction, "columns", 2)
        mask.fill_(1.0)
        mask[:, bh : h - bh, bw : w - bw] = 0.0
    return mask


def _check_band(band: int, size: int, fraction: float, what: str, bands: int) -> None:
    """A band must generate at least one line and leave at least one known."""
    if band < 1 or bands * band >= size:
        raise ValueError(
            f"uncrop fraction {fraction} of {size} {what} gives {band} {what} to generate"
            f"{' on each side' if bands == 2 else ''}: nothing to generate or nothing known"
        )
