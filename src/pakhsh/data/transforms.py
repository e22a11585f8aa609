"""PIL image -> model tensor: mode normalisation, resize, crop, flip (no torchvision).

Pipeline of `ImageTransform`: `normalize_mode` (any PIL mode -> "L", "F" or "RGB") -> `resize_shorter`
(bicubic, antialiased) -> `center_crop` / `random_crop` -> optional `hflip` -> `pil_to_tensor` in [-1, 1].
Random choices take `rng`: a numpy Generator/RandomState or a torch.Generator (None: torch's global RNG).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

import numpy as np
import torch
from PIL import Image

Rng = Union[np.random.Generator, np.random.RandomState, torch.Generator, None]

AlphaMode = Literal[
    "white",  # composite transparent pixels over a white background (what viewers show)
    "drop",  # discard the alpha channel, keeping the raw colour under it
]
CropMode = Literal[
    "center",  # deterministic centre crop (evaluation, reference sets)
    "random",  # uniformly placed crop (training augmentation)
]

# 16-bit and 32-bit integer greyscale modes; their values are taken as 16-bit (0..65535).
_WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _randint(rng: Rng, high: int) -> int:
    """Uniform int in [0, high)."""
    if high <= 1:
        return 0
    if isinstance(rng, torch.Generator) or rng is None:
        return int(torch.randint(0, high, (1,), generator=rng).item())
    if isinstance(rng, np.random.RandomState):
        return int(rng.randint(0, high))
    return int(rng.integers(0, high))


def _coin(rng: Rng, p: float = 0.5) -> bool:
    """True with probability p."""
    if isinstance(rng, torch.Generator) or rng is None:
        return bool(torch.rand((), generator=rng).item() < p)
    return bool(rng.random() < p)


def _composite_over_white(img: Image.Image) -> Image.Image:
    """RGBA -> RGB, blending each pixel with white by its alpha."""
    white = Image.new("RGBA", img.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, img).convert("RGB")


def _wide_grey_to_float(img: Image.Image) -> Image.Image:
    """16-bit greyscale -> mode "F" in 0..255 (value * 255 / 65535), keeping the extra precision.

    Converting with PIL's convert("L") would clip everything above 255 to white instead of rescaling.
    """
    arr = np.asarray(img).astype(np.float32)  # (H, W); "I;16B" arrives big-endian, astype fixes the order
    arr = np.clip(arr, 0.0, 65535.0) * (255.0 / 65535.0)
    return Image.fromarray(arr, mode="F")


def normalize_mode(img: Image.Image, channels: int, alpha: AlphaMode = "white") -> Image.Image:
    """Any PIL mode -> "RGB" (channels=3), or "L"/"F" (channels=1; "F" holds 16-bit sources in 0..255).

    Handles 1-bit, L, LA/La, P/PA (via RGBA, so palette transparency is honoured), RGBA/RGBa, RGBX,
    CMYK, YCbCr, HSV, I;16* and I (16-bit range) and F (taken in 0..255, PIL's convention).
    A 16-bit grey source with channels=3 stays "F"; `pil_to_tensor(..., channels=3)` repeats it.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    mode = img.mode
    if mode in _WIDE_GREY_MODES:
        return _wide_grey_to_float(img)
    if mode == "F":
        return Image.fromarray(np.clip(np.asarray(img, dtype=np.float32), 0.0, 255.0), mode="F")
    if mode in ("P", "PA", "LA", "La", "RGBa", "RGBA"):
        img = img.convert("RGBA")  # palette transparency and premultiplied alpha both resolve here
        img = _composite_over_white(img) if alpha == "white" else img.convert("RGB")
    elif mode not in ("L", "RGB"):
        try:  # 1, CMYK, YCbCr, HSV, RGBX: PIL converts these to RGB directly
            img = img.convert("RGB")
        except ValueError as e:
            raise ValueError(f"cannot convert PIL mode {mode!r} to RGB: {e}") from None
    if channels == 1 and img.mode != "L":
        img = img.convert("L")  # ITU-R 601 luma; exact for grey RGB
    elif channels == 3 and img.mode != "RGB":
        img = img.convert("RGB")
    return img


def resize_shorter(img: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is `size`, keeping the aspect ratio (bicubic; Pillow antialiases downscaling)."""
    w, h = img.size
    if min(w, h) == size:
        return img
    scale = size / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    return img.resize(new, Image.Resampling.BICUBIC)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """Central size x size window (image must be at least that large)."""
    w, h = img.size
    if w < size or h < size:
        raise ValueError(f"cannot crop {size}x{size} from a {w}x{h} image")
    left, top = round((w - size) / 2), round((h - size) / 2)
    return img.crop((left, top, left + size, top + size))


def random_crop(img: Image.Image, size: int, rng: Rng = None) -> Image.Image:
    """Uniformly placed size x size window."""
    w, h = img.size
    if w < size or h < size:
        raise ValueError(f"cannot crop {size}x{size} from a {w}x{h} image")
    left, top = _randint(rng, w - size + 1), _randint(rng, h - size + 1)
    return img.crop((left, top, left + size, top + size))


def random_hflip(img: Image.Image, rng: Rng = None, p: float = 0.5) -> Image.Image:
    """Mirror left-right with probability p."""
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if _coin(rng, p) else img


def random_hflip_tensor(x: torch.Tensor, rng: Rng = None, p: float = 0.5) -> torch.Tensor:
    """Mirror a (..., H, W) tensor along W with probability p."""
    return x.flip(-1) if _coin(rng, p) else x


def pil_to_tensor(img: Image.Image, channels: int | None = None) -> torch.Tensor:
    """PIL "L", "F" (0..255) or "RGB" -> float32 (C, H, W) in [-1, 1]; 1-band images repeat to `channels`."""
    if img.mode not in ("L", "F", "RGB"):
        raise ValueError(f"pil_to_tensor expects mode L, F or RGB (use normalize_mode first), got {img.mode!r}")
    arr = np.array(img, dtype=np.float32)  # (H, W) or (H, W, 3); a writable copy for torch
    if arr.ndim == 2:
        arr = arr[None]
    else:
        arr = arr.transpose(2, 0, 1)
    x = torch.from_numpy(np.ascontiguousarray(arr)) / 127.5 - 1.0
    if img.mode == "F":
        x = x.clamp(-1.0, 1.0)  # bicubic overshoot on float images is not clipped by PIL
    if channels is not None and x.shape[0] != channels:
        if x.shape[0] != 1:
            raise ValueError(f"cannot make {channels} channels from a {img.mode} image")
        x = x.expand(channels, -1, -1).contiguous()
    return x


def uint8_to_tensor(arr: np.ndarray) -> torch.Tensor:
    """uint8 (H, W) or (H, W, C) array -> float32 (C, H, W) in [-1, 1]."""
    a = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(np.array(a, dtype=np.float32)) / 127.5 - 1.0  # copy: PIL arrays are read-only


@dataclass(frozen=True)
class ImageTransform:
    """Callable config: PIL image of any mode/size -> float32 (channels, size, size) in [-1, 1]."""

    size: int
    channels: int = 3
    crop: CropMode = "center"
    random_flip: bool = False
    alpha: AlphaMode = "white"

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"size must be positive, got {self.size}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.crop not in ("center", "random"):
            raise ValueError(f"crop must be 'center' or 'random', got {self.crop!r}")
        if self.alpha not in ("white", "drop"):
            raise ValueError(f"alpha must be 'white' or 'drop', got {self.alpha!r}")

    def __call__(self, img: Image.Image, rng: Rng = None) -> torch.Tensor:
        img = normalize_mode(img, self.channels, self.alpha)
        img = resize_shorter(img, self.size)
        img = random_crop(img, self.size, rng) if self.crop == "random" else center_crop(img, self.size)
        if self.random_flip:
            img = random_hflip(img, rng)
        x = pil_to_tensor(img, self.channels)  # (C, size, size)
        assert x.shape == (self.channels, self.size, self.size), x.shape
        return x
