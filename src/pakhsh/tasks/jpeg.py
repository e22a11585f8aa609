"""JPEG restoration's degradation: a Pillow JPEG encode / decode round trip at a given quality."""

from __future__ import annotations

import io
import numbers

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def check_quality(quality: object) -> int:
    """Return `quality` as an int, or raise ValueError unless it is a whole number in 1..100.

    Pillow silently accepts 0 and 101 (and floats), so the range is enforced here.
    """
    if isinstance(quality, bool) or not isinstance(quality, numbers.Integral) or not 1 <= int(quality) <= 100:
        raise ValueError(f"--quality {quality!r}: must be a whole number in 1..100")
    return int(quality)


def jpeg_compress(x: Tensor, quality: int) -> Tensor:
    """(B, C, H, W) in [-1, 1], C = 1 (JPEG "L") or 3 ("RGB") -> the same images after a JPEG round trip.

    Each image is quantised to uint8, encoded with Pillow's default chroma subsampling and decoded back; the
    result has x's dtype and device and holds 8-bit levels. libjpeg is deterministic, and so is this.
    """
    q = check_quality(quality)
    return jpeg_compress_each(x, [q] * len(x))


def jpeg_compress_each(x: Tensor, qualities: list[int]) -> Tensor:
    """`jpeg_compress` with one quality per image (qualities already checked), in one tensor <-> numpy pass."""
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"jpeg_compress: expected images (B, 1 or 3, H, W), got shape {tuple(x.shape)}")
    arr = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    arr = arr.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, C)
    out = np.stack([_round_trip(a, q) for a, q in zip(arr, qualities)])
    y = torch.from_numpy(out).permute(0, 3, 1, 2).to(device=x.device, dtype=torch.float32) / 127.5 - 1.0
    return y.to(x.dtype)


def _round_trip(a: np.ndarray, quality: int) -> np.ndarray:
    """(H, W, C) uint8 -> (H, W, C) uint8 after JPEG encode + decode."""
    img = Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as dec:
        out = np.asarray(dec.convert(img.mode))
    return out[..., None] if out.ndim == 2 else out
