"""Super-resolution's condition (SR3; unCLIP's diffusion upsamplers): the image area-downsampled by an integer
`scale`, optionally blurred and noised, then brought back to full size so it can be concatenated to x_t.

Training (`superres_degrade`) and sampling (`superres_condition`) go through the one function `_condition`, so
a model sees at sampling time exactly the kind of input it was trained on: with no augmentation drawn, the
training condition of an image equals `superres_condition(area_downsample(image, scale), scale)` bit for bit.

The low-resolution image is brought back up with nearest-neighbour repetition, not bilinear or bicubic
interpolation: the condition then holds the low-resolution pixels exactly (each scale x scale block is one),
and the only low-pass filter the model ever sees on its input is the Gaussian blur whose strength it was trained
on, so `blur_sigma` means the same at sampling as in training. A convolutional net sees several low-res pixels in
its first layers, so the blocky look costs it nothing that interpolation would have given it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from pakhsh.tasks.config import MAX_BLUR_SIGMA, MAX_SCALE, Degraded, TaskConfig
from pakhsh.tasks.masks import check_generator

_TAIL = 3.0  # the blur kernel reaches ceil(3 sigma) pixels: past that the Gaussian holds under 0.3% of its mass


def _check_images(x: Tensor, what: str) -> None:
    if x.ndim != 4:
        raise ValueError(f"{what}: expected images (B, C, H, W), got shape {tuple(x.shape)}")


def _check_scale(scale: object, key: str = "scale") -> int:
    if isinstance(scale, bool) or not isinstance(scale, int) or not 1 <= scale <= MAX_SCALE:
        raise ValueError(f"{key}={scale!r}: must be a whole number in 1..{MAX_SCALE}")
    return scale


def area_downsample(x: Tensor, scale: int) -> Tensor:
    """(B, C, H, W) -> (B, C, H / scale, W / scale): each output pixel is the mean of a scale x scale block.

    Box averaging is what a camera sensor of larger pixels records and what SR3 / DALL-E 2 train on; it adds
    no ringing, so values stay in [-1, 1]. H and W must be multiples of `scale` (else a ValueError naming both).
    """
    _check_images(x, "area_downsample")
    s = _check_scale(scale)
    h, w = x.shape[-2:]
    if h % s or w % s:
        raise ValueError(f"superres scale {s}: the image is {w}x{h} (W x H); both sides must be multiples of {s}")
    return x if s == 1 else F.avg_pool2d(x, s)


def upsample_nearest(low: Tensor, scale: int) -> Tensor:
    """(B, C, h, w) -> (B, C, h * scale, w * scale), every low-res pixel repeated as a scale x scale block (exact)."""
    return low.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)


def _normal_cdf(z: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.special.erf(z / math.sqrt(2.0)))


def blur_kernels(sigma: Tensor, radius: int) -> Tensor:
    """(B,) sigmas -> (B, 2 * radius + 1) float64 1-D Gaussian kernels that each sum to 1.

    Each tap is the Gaussian's integral over its pixel, [k - 1/2, k + 1/2], not its value at k: sigma = 0 is then
    exactly the identity and small sigmas blur a little rather than not at all, so blur strength grows smoothly
    with sigma. Taps past ceil(3 sigma) are 0, so an image's kernel depends on its own sigma only, not on the
    largest sigma in the batch.
    """
    sig = sigma.to(torch.float64).clamp_min(1e-12)[:, None]  # 0 -> a step function: the integral is a delta
    k = torch.arange(-radius, radius + 1, dtype=torch.float64)[None, :]
    taps = _normal_cdf((k + 0.5) / sig) - _normal_cdf((k - 0.5) / sig)
    taps = torch.where(k.abs() <= torch.ceil(_TAIL * sig), taps, torch.zeros_like(taps))
    return taps / taps.sum(dim=1, keepdim=True)


def gaussian_blur(x: Tensor, sigma: Tensor | float) -> Tensor:
    """Blur each image of x (B, C, H, W) with its own Gaussian of std sigma (a float or (B,) values, in pixels).

    Separable, borders replicated (no dark or mirrored edge), computed in float32 and returned in x's dtype;
    sigma 0 returns the image unchanged.
    """
    _check_images(x, "gaussian_blur")
    b, c, h, w = x.shape
    sig = torch.as_tensor(sigma, dtype=torch.float64).flatten().cpu()
    if sig.numel() == 1:
        sig = sig.expand(b)
    if sig.numel() != b:
        raise ValueError(f"gaussian_blur: {sig.numel()} sigmas for a batch of {b} images")
    radius = int(math.ceil(_TAIL * float(sig.max()))) if b else 0
    if radius == 0:
        return x.clone()
    taps = blur_kernels(sig, radius).to(device=x.device, dtype=torch.float32).repeat_interleave(c, dim=0)
    y = F.pad(x.float().reshape(1, b * c, h, w), (radius, radius, radius, radius), mode="replicate")
    y = F.conv2d(y, taps.view(b * c, 1, 1, -1), groups=b * c)  # along W
    y = F.conv2d(y, taps.view(b * c, 1, -1, 1), groups=b * c)  # along H
    return y.reshape(b, c, h, w).to(x.dtype)


def _condition(low: Tensor, scale: int, sigma: Tensor, std: Tensor, eps: Tensor | None) -> Tensor:
    """The one path from a low-res batch to the condition: blur (sigma per image) -> + std * eps -> clamp to
    [-1, 1] -> nearest upsampling by `scale`. Both training and sampling call this."""
    x = gaussian_blur(low.float(), sigma)
    if eps is not None:
        x = x + std.to(x.device, torch.float32).view(-1, 1, 1, 1) * eps.to(x.device, torch.float32)
    return upsample_nearest(x.clamp(-1.0, 1.0), scale)


def superres_degrade(x0: Tensor, cfg: TaskConfig, generator: torch.Generator) -> Degraded:
    """Training condition for super-resolution: x0 (B, C, H, W) in [-1, 1] -> Degraded(cond (B, C, H, W), mask
    all ones (B, 1, H, W): every pixel is generated).

    cond is x0 area-downsampled by cfg.scale; with probability cfg.aug_prob an image is then blurred with a sigma
    drawn uniformly from cfg.blur_sigma and given Gaussian noise of a std drawn from cfg.cond_noise; then clamped
    and upsampled back (see `_condition`). The generator gives, in this order and always the same count whatever
    the draws: (B, 3) uniforms (augment?, sigma, std), then (B, C, H / scale, W / scale) normals for the noise,
    so a batch replays exactly from the generator's state. Computed on the CPU; outputs on x0's device.
    """
    _check_images(x0, "degrade")
    check_generator(generator)
    b, c, h, w = x0.shape
    low = area_downsample(x0.detach().float().cpu(), cfg.scale)
    u = torch.rand(b, 3, generator=generator, dtype=torch.float64)
    eps = torch.randn(b, c, h // cfg.scale, w // cfg.scale, generator=generator)
    on = u[:, 0] < cfg.aug_prob
    (s_lo, s_hi), (n_lo, n_hi) = cfg.blur_sigma, cfg.cond_noise
    zero = torch.zeros(b, dtype=torch.float64)
    sigma = torch.where(on, s_lo + (s_hi - s_lo) * u[:, 1], zero)
    std = torch.where(on, n_lo + (n_hi - n_lo) * u[:, 2], zero)
    cond = _condition(low, cfg.scale, sigma, std, eps)
    mask = torch.ones(b, 1, h, w, dtype=torch.float32)
    return Degraded(cond.to(x0.device, x0.dtype), mask.to(x0.device))


def superres_condition(low: Tensor, scale: int, size: tuple[int, int] | None = None,
                       blur_sigma: float = 0.0) -> tuple[Tensor, Tensor]:
    """Sampling condition for super-resolution: a low-res batch (B, C, h, w) in [-1, 1] -> (cond_image
    (B, C, h * scale, w * scale), mask (B, 1, h * scale, w * scale) of ones), on low's device.

    The training path without random draws: `blur_sigma` (low-res pixels, 0 = none) blurs as a drawn sigma
    would; no noise is added. `size` = (H, W), when given, must be what `scale` makes of the input (a ValueError
    names both otherwise), so a caller passing another model's output learns at once that the sizes disagree.
    """
    _check_images(low, "superres_condition")
    s = _check_scale(scale, "superres scale")
    b, _, h, w = low.shape
    if size is not None and tuple(size) != (h * s, w * s):
        hh, ww = size
        raise ValueError(f"superres: a {w}x{h} (W x H) low-res input upsampled {s}x is {w * s}x{h * s}, "
                         f"not the requested {ww}x{hh}; give a {ww // s}x{hh // s} input")
    if isinstance(blur_sigma, bool) or not isinstance(blur_sigma, (int, float)) or not (
            math.isfinite(blur_sigma) and 0.0 <= blur_sigma <= MAX_BLUR_SIGMA):
        raise ValueError(f"blur_sigma={blur_sigma!r}: must be a number in [0, {MAX_BLUR_SIGMA:g}] (low-res pixels)")
    sigma = torch.full((b,), float(blur_sigma), dtype=torch.float64)
    cond = _condition(low, s, sigma, sigma, None).to(low.dtype)
    return cond, torch.ones(b, 1, h * s, w * s, dtype=torch.float32, device=low.device)
