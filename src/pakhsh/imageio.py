"""Images in and out: [-1, 1] tensors <-> uint8 arrays, PNG grids, and loading a user's image file."""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8, rounding to the nearest of the 256 levels."""
    if x.ndim != 4:
        raise ValueError(f"expected images (B, C, H, W), got shape {tuple(x.shape)}")
    arr = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return arr.permute(0, 2, 3, 1).cpu().numpy()


def make_grid(x: torch.Tensor, nrow: int | None = None, pad: int = 2, pad_value: int = 255) -> np.ndarray:
    """Tile (B, C, H, W) images in [-1, 1] into one (rows*H', cols*W', C) uint8 array (C = 1 or 3)."""
    imgs = to_uint8(x)
    b, h, w, c = imgs.shape
    cols = nrow or max(1, math.ceil(math.sqrt(b)))
    rows = math.ceil(b / cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), pad_value, dtype=np.uint8)
    for i in range(b):
        r, k = divmod(i, cols)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + k * (w + pad) : pad + k * (w + pad) + w] = imgs[i]
    return grid


# Formats an output path's suffix may name; PIL can write each of them without extra options.
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP", ".tif": "TIFF",
                 ".tiff": "TIFF", ".gif": "GIF"}


def image_format(path: str | Path, flag: str = "path") -> str:
    """The PIL format an output path's suffix names; an unknown or missing suffix raises ValueError naming `flag`."""
    suffix = Path(path).suffix.lower()
    if suffix not in IMAGE_FORMATS:
        what = f"unknown image type {suffix!r}" if suffix else "no suffix to say the image type"
        raise ValueError(f"{flag} {path}: {what}; use one of {', '.join(sorted(IMAGE_FORMATS))}")
    return IMAGE_FORMATS[suffix]


def save_image(array: np.ndarray, path: str | Path, scale: int = 1) -> Path:
    """Save a (H, W, C) uint8 array in the format its suffix names (optionally upscaled by an integer factor,
    nearest), atomically: a reader never sees half a file."""
    return _save(array, path, image_format(path), scale)


def save_png(array: np.ndarray, path: str | Path, scale: int = 1) -> Path:
    """Save a (H, W, C) uint8 array as PNG whatever the suffix (see `save_image` for suffix-chosen formats)."""
    return _save(array, path, "PNG", scale)


def _save(array: np.ndarray, path: str | Path, fmt: str, scale: int) -> Path:
    arr = array[..., 0] if array.shape[-1] == 1 else array
    img = Image.fromarray(arr)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    img.save(tmp, format=fmt, **({"quality": 95} if fmt in ("JPEG", "WEBP") else {}))
    os.replace(tmp, p)
    return p


def save_grid(x: torch.Tensor, path: str | Path, nrow: int | None = None, scale: int = 1) -> Path:
    """Save (B, C, H, W) images in [-1, 1] as one grid image, in the format the path's suffix names."""
    return save_image(make_grid(x, nrow), path, scale)


def save_npz(x: torch.Tensor, path: str | Path, labels: torch.Tensor | None = None) -> Path:
    """Save (B, C, H, W) images in [-1, 1] as uint8 NHWC under "arr_0" (and (B,) int64 labels under "arr_1"):
    what improved-diffusion's image_sample.py writes and the ADM evaluator reads. Written atomically."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    arrays = [to_uint8(x)] + ([labels.detach().cpu().numpy().astype(np.int64)] if labels is not None else [])
    tmp = p.with_name(p.name + ".tmp.npz")  # np.savez appends .npz to names without it
    np.savez(tmp, *arrays)
    os.replace(tmp, p)
    return p


def save_images(x: torch.Tensor, folder: str | Path, prefix: str = "", start: int = 0) -> list[Path]:
    """Save each image of (B, C, H, W) in [-1, 1] as its own PNG: folder/{prefix}{index:06d}.png."""
    out = []
    for i, arr in enumerate(to_uint8(x)):
        out.append(save_png(arr, Path(folder) / f"{prefix}{start + i:06d}.png"))
    return out


def load_image(path: str | Path, size: int | None = None, channels: int = 3) -> torch.Tensor:
    """Read one image file -> (1, C, H, W) in [-1, 1], resized (shorter side) and centre-cropped to `size`.

    Refuses images too large to decode safely (see `pakhsh.data.image_folder.MAX_PIXELS`), and warns, naming the
    file, when the image is so much smaller than `size` that the upscaled input is mostly blur.
    """
    from .data.image_folder import CorruptImageError, is_small, open_image
    from .data.transforms import ImageTransform  # data owns mode conversion (16-bit, CMYK, palette, alpha)

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"image not found: {p}" + (" (it is a folder)" if p.is_dir() else ""))
    try:
        img = open_image(p, size)
    except CorruptImageError:
        raise  # names the file and its size already
    except (OSError, ValueError, SyntaxError) as e:  # SyntaxError: PIL's word for some malformed headers
        raise ValueError(f"cannot read image {p}: {e}") from None
    if size and is_small(img.size, size):
        warnings.warn(f"{p} is {img.width}x{img.height}: upscaled to {size}x{size} for this model, so it is mostly "
                      f"blur; use an image of at least {size}x{size}", stacklevel=2)
    side = size or min(img.size)
    try:
        return ImageTransform(size=side, channels=channels)(img).unsqueeze(0)
    except ValueError as e:
        raise ValueError(f"cannot read image {p}: {e}") from None
