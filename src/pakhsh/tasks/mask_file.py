"""A user's inpainting mask from an image file: white = generate, black = keep."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from pakhsh.data.transforms import normalize_mode

_THRESHOLD = 128  # grey levels >= this (in L mode, 0..255) are "generate"


def load_mask(path: str | Path, size: tuple[int, int]) -> tuple[Tensor, str | None]:
    """Read a mask image for an image of `size` = (H, W): returns ((1, H, W) float32 0/1 mask, notice or None).

    Any mode is read as grey (colour via PIL's luma, alpha ignored). A mask with levels other than 0 and 255
    (anti-aliased edges, a JPEG) is thresholded at 128 and the notice says so. Raises ValueError naming the
    file when it is missing or not an image, its size differs from `size`, or it is all black.
    """
    name = str(path)
    img = _open(Path(path))
    h, w = size
    if img.size != (w, h):
        raise ValueError(f"{name} is {img.width}x{img.height} but the image is {w}x{h} (W x H)")
    grey = np.asarray(normalize_mode(img, 1, alpha="drop"), dtype=np.float32)  # (H, W) in 0..255 ("L" or "F")
    notice = None
    if not np.isin(grey, (0.0, 255.0)).all():
        notice = f"{name} is not binary: thresholded at {_THRESHOLD}"
    mask = (grey >= _THRESHOLD).astype(np.float32)
    if not mask.any():
        raise ValueError(f"{name} is all black: nothing to generate (white pixels mark what to generate)")
    return torch.from_numpy(mask)[None], notice


def _open(path: Path) -> Image.Image:
    """Open and fully decode an image, turning every failure into a one-line ValueError naming the file."""
    if not path.exists():
        raise ValueError(f"{path}: no such mask file")
    if path.is_dir():
        raise ValueError(f"{path}: is a folder, not a mask image")
    try:
        with Image.open(path) as img:
            img.load()  # decode now so a truncated file fails here, not later
            return img.copy()
    except UnidentifiedImageError:
        raise ValueError(f"{path}: not an image (Pillow cannot identify it)") from None
    except Image.DecompressionBombError:
        raise ValueError(f"{path}: too many pixels for a mask (Pillow's decompression-bomb limit)") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data; PIL raises all three
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{path}: cannot read the mask image ({why})") from None
