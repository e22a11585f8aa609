"""Semantic maps as a condition: latent diffusion's semantic synthesis (Rombach et al. 2022, sec. 4.3.2).

The model sees the map as extra input channels stacked onto x_t (UNetConfig.cond_channels = num_classes): a
per-pixel one-hot of the class ids, area-averaged down to the resolution the UNet runs at (the latent grid), so
each channel holds the fraction of a cell covered by that class and the channels of every cell sum to 1.

On disk a map is a PNG in one of two forms:
  * colour: each class painted in its fixed PALETTE colour (class 0, the background, black), the form a person
    can look at and paint; `save_segmap` writes this form by default;
  * class ids: a grayscale ('L', 16-bit 'I;16'/'I') or palette ('P') PNG whose pixel values (for 'P': palette
    indices, whatever colours the palette gives them) are the class ids 0..num_classes-1.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

# --- palette ------------------------------------------------------------------------------------------------
# Every colour lies on the grid {0, 85, 170, 255}^3, so two classes differ by >= 85 in some channel and a colour
# within COLOR_TOLERANCE (per channel) of a palette entry is unambiguous. The first entries are the most distinct
# (maps with few classes are the easiest to read); the rest of the grid follows in a fixed order.
_LEVELS = (0, 85, 170, 255)
_FIRST = (
    (0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255),
    (255, 170, 0), (170, 0, 255), (0, 170, 255), (255, 0, 170), (170, 255, 0), (0, 255, 170),
    (255, 255, 255), (170, 85, 0), (85, 85, 170),
)  # fmt: skip
PALETTE: tuple[tuple[int, int, int], ...] = _FIRST + tuple(
    (r, g, b) for r in _LEVELS for g in _LEVELS for b in _LEVELS if (r, g, b) not in _FIRST
)
COLOR_TOLERANCE = 40  # most a colour may differ from its palette entry, per channel (half the spacing is 42.5)
_ID_MODES = ("L", "P", "I", "I;16", "I;16L", "I;16B", "I;16N", "1")  # pixel values are the class ids


def _as_int_map(seg: Tensor | np.ndarray, what: str, ndim: int) -> Tensor:
    if isinstance(seg, np.ndarray):
        seg = torch.from_numpy(seg)
    if not isinstance(seg, Tensor):
        raise ValueError(f"{what} must be an integer tensor, got {type(seg).__name__}")
    if seg.ndim != ndim or seg.is_floating_point() or seg.is_complex() or seg.dtype == torch.bool:
        shape = "(B, H, W)" if ndim == 3 else "(H, W)"
        raise ValueError(f"{what} must be integer class ids of shape {shape}, got {seg.dtype} {tuple(seg.shape)}")
    return seg


def _size2(size: int | tuple[int, int], what: str = "size") -> tuple[int, int]:
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if len(hw) != 2 or not all(isinstance(v, int) and v >= 1 for v in hw):
        raise ValueError(f"{what} must be a positive int or (h, w) of positive ints, got {size!r}")
    return hw  # type: ignore[return-value]


def one_hot_map(seg: Tensor, num_classes: int, size: int | tuple[int, int]) -> Tensor:
    """Class ids (B, H, W) -> (B, num_classes, h, w) float32 class fractions of each output cell (sum 1 per cell).

    One-hot per pixel, then averaged over the pixels each output cell covers (adaptive average pooling: exact
    area averages when H, W are multiples of h, w; for other sizes the cells overlap slightly, still summing to 1).
    Ids outside [0, num_classes) raise ValueError naming the value.
    """
    seg = _as_int_map(seg, "segmentation", 3)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    h, w = _size2(size)
    if seg.numel():
        lo, hi = int(seg.min()), int(seg.max())
        if lo < 0 or hi >= num_classes:
            bad = lo if lo < 0 else hi
            raise ValueError(f"segmentation holds class {bad}, outside [0, {num_classes - 1}] "
                             f"(num_classes={num_classes})")
    onehot = F.one_hot(seg.long(), num_classes).permute(0, 3, 1, 2).float()  # (B, K, H, W)
    if tuple(onehot.shape[2:]) == (h, w):
        return onehot.contiguous()
    return F.adaptive_avg_pool2d(onehot, (h, w))


# --- files --------------------------------------------------------------------------------------------------
def colorize(seg: Tensor | np.ndarray) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) uint8 in PALETTE colours; ids outside the palette raise ValueError."""
    seg = _as_int_map(seg, "segmentation", 2)
    arr = seg.cpu().numpy().astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= len(PALETTE)):
        bad = int(arr.min()) if arr.min() < 0 else int(arr.max())
        raise ValueError(f"segmentation holds class {bad}; the colour palette has classes 0..{len(PALETTE) - 1} "
                         f"(save class ids instead: save_segmap(..., ids=True))")
    return np.asarray(PALETTE, dtype=np.uint8)[arr]


def save_segmap(path: str | Path, seg: Tensor | np.ndarray, *, ids: bool = False) -> Path:
    """Write (H, W) class ids as a PNG (atomically: a reader never sees half a file), whatever the suffix.

    By default in PALETTE colours; with `ids=True` as a grayscale 'L' PNG whose values are the class ids (0..255).
    """
    from pakhsh.imageio import save_png

    if ids:
        seg = _as_int_map(seg, "segmentation", 2)
        arr = seg.cpu().numpy()
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            bad = int(arr.min()) if arr.min() < 0 else int(arr.max())
            raise ValueError(f"segmentation holds class {bad}; a grayscale class-id PNG holds 0..255")
        return save_png(arr.astype(np.uint8)[..., None], path)
    return save_png(colorize(seg), path)


def _open(p: Path) -> Image.Image:
    """Decode an image file with pakhsh's safe decoding and the one-line errors of `pakhsh.imageio.load_image`."""
    from pakhsh.data.image_folder import CorruptImageError, open_image

    if not p.is_file():
        raise FileNotFoundError(f"image not found: {p}" + (" (it is a folder)" if p.is_dir() else ""))
    try:
        return open_image(p)
    except CorruptImageError:
        raise  # names the file and its size already
    except (OSError, ValueError, SyntaxError) as e:  # SyntaxError: PIL's word for some malformed headers
        raise ValueError(f"cannot read image {p}: {e}") from None


def _ids_from_colors(p: Path, rgb: np.ndarray, num_classes: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) int64 by nearest palette colour; colours far from all of them raise ValueError."""
    packed = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    colors, inverse, counts = np.unique(packed.ravel(), return_inverse=True, return_counts=True)
    uniq = np.stack([(colors >> 16) & 255, (colors >> 8) & 255, colors & 255], axis=1)  # (U, 3)
    pal = np.asarray(PALETTE, dtype=np.int64)  # (K, 3)
    dist = np.abs(uniq[:, None, :] - pal[None, :, :]).max(axis=2)  # (U, K) per-channel (L-inf) distance
    nearest = dist.argmin(axis=1)
    far = dist[np.arange(len(uniq)), nearest] > COLOR_TOLERANCE
    if far.any():
        worst = np.flatnonzero(far)[counts[far].argmax()]  # the most common offending colour
        n_far = int(counts[far].sum())
        raise ValueError(f"segmentation map {p}: {n_far} pixel(s) in {int(far.sum())} colour(s) are not palette "
                         f"colours, e.g. {tuple(int(v) for v in uniq[worst])} ({int(counts[worst])} pixels), more "
                         f"than {COLOR_TOLERANCE} per channel from every class colour (pakhsh.conditioning.segmap."
                         f"PALETTE); or save the map as a grayscale PNG of class ids")
    too_high = nearest >= num_classes
    if too_high.any():
        worst = np.flatnonzero(too_high)[counts[too_high].argmax()]
        raise ValueError(f"segmentation map {p}: {int(counts[too_high].sum())} pixel(s) have the colour of class "
                         f"{int(nearest[worst])} {tuple(int(v) for v in uniq[worst])}, outside [0, {num_classes - 1}] "
                         f"(num_classes={num_classes})")
    return nearest[inverse].reshape(rgb.shape[:2]).astype(np.int64)


def _resize_nearest(arr: np.ndarray, h: int, w: int) -> np.ndarray:
    """Nearest-neighbour resize of an (H, W) map: output pixel i samples input row floor((i + 0.5) * H / h)."""
    rows = np.minimum(((np.arange(h) + 0.5) * arr.shape[0] / h).astype(np.int64), arr.shape[0] - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * arr.shape[1] / w).astype(np.int64), arr.shape[1] - 1)
    return arr[rows[:, None], cols[None, :]]


def read_segmap(path: str | Path, num_classes: int, size: int | None = None) -> Tensor:
    """Read a semantic map PNG -> (size, size) int64 class ids in [0, num_classes).

    RGB(A) images are read as PALETTE colours: each pixel takes the class of the nearest palette colour, and
    pixels more than COLOR_TOLERANCE (per channel) from every palette colour raise ValueError naming the file,
    the colour and how many pixels have it. Grayscale ('L', 16-bit) and palette ('P') images are read as class
    ids (for 'P' the palette indices, not their colours); ids >= num_classes raise ValueError. A map of another
    size is resized to size x size with nearest neighbour (class ids are never blended); a non-square map is
    stretched, with a warning. size=None keeps the file's size. A missing or non-image file raises the
    FileNotFoundError / one-line ValueError of `pakhsh.imageio.load_image`.
    """
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    if size is not None and (not isinstance(size, int) or size < 1):
        raise ValueError(f"size must be a positive int or None, got {size!r}")
    p = Path(path)
    img = _open(p)
    if img.mode in _ID_MODES or img.mode == "LA":
        arr = np.asarray(img.getchannel(0) if img.mode == "LA" else img).astype(np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
            bad = int(arr.max()) if arr.max() >= num_classes else int(arr.min())
            n_bad = int(((arr < 0) | (arr >= num_classes)).sum())
            raise ValueError(f"segmentation map {p}: grayscale class ids must be in [0, {num_classes - 1}] "
                             f"(num_classes={num_classes}), but {n_bad} pixel(s) hold values up to {bad} (a colour "
                             f"map must be saved as RGB)")
    elif img.mode == "F":
        raise ValueError(f"segmentation map {p}: floating-point image (mode F); save class ids as an 8- or "
                         f"16-bit grayscale PNG")
    else:  # RGB, RGBA, CMYK, YCbCr, ...: colours
        arr = _ids_from_colors(p, np.asarray(img.convert("RGB")), num_classes)
    if size is not None and arr.shape != (size, size):
        if arr.shape[0] != arr.shape[1]:
            warnings.warn(f"segmentation map {p} is {arr.shape[1]}x{arr.shape[0]}: stretched to {size}x{size} "
                          f"(nearest neighbour)", stacklevel=2)
        arr = _resize_nearest(arr, size, size)
    return torch.from_numpy(np.ascontiguousarray(arr))
