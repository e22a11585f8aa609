"""Image conditions stacked onto x_t as extra input channels (Palette, Saharia et al. 2022).

A Palette network sees [x_t, y, m]: the state, the degraded image y and the mask m (1 = pixel to generate,
0 = known pixel). Known pixels are handed to the network clean in the x_t slot too, during training and
sampling alike, and the loss covers generated pixels only. Every sampler of the core updates pixels
elementwise from (x_t, eps), so the network's view of an unknown pixel never depends on what the chain holds at
a known one: pasting the known pixels into the result at the end (`paste_known`) is the same as re-imposing
them at every step, whatever the sampler.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..diffusion.gaussian import GaussianDiffusion
from ..samplers import SAMPLERS


class ConcatConditioned:
    """`model(x_t, t, cond_image=..., mask=..., y=...)` over a UNet built with cond_channels = C + 1.

    cond_image: (B, C, H, W) in [-1, 1], the degraded image; mask: (B, 1, H, W) of 0/1 (1 = generate).
    Not an nn.Module: it wraps whatever the trainer or pipeline holds (a DDP-wrapped net too) without
    registering its parameters a second time.
    """

    def __init__(self, net: Any) -> None:
        self.net = net

    def __call__(self, x_t: Tensor, t: Tensor, *, cond_image: Tensor, mask: Tensor, y: Tensor | None = None) -> Tensor:
        if cond_image.shape != x_t.shape:
            raise ValueError(f"cond_image {tuple(cond_image.shape)} must have the shape of x_t {tuple(x_t.shape)}")
        if mask.shape != (x_t.shape[0], 1, *x_t.shape[2:]):
            raise ValueError(f"mask must be (B, 1, H, W) = {(x_t.shape[0], 1, *x_t.shape[2:])}, got {tuple(mask.shape)}")
        cond_image, mask = cond_image.to(x_t.dtype), mask.to(x_t.dtype)
        x_in = known_into(x_t, cond_image, mask)
        kwargs = {} if y is None else {"y": y}
        return self.net(x_in, t, concat=torch.cat([cond_image, mask], dim=1), **kwargs)


def known_into(x: Tensor, cond_image: Tensor, mask: Tensor) -> Tensor:
    """x with its known pixels (mask 0) replaced by the condition's: (B, C, H, W)."""
    return torch.where(mask > 0.5, x, cond_image.to(x.dtype))


def paste_known(x: Tensor, cond_image: Tensor, mask: Tensor) -> Tensor:
    """The final output: generated pixels from x, known pixels exactly as given (bit-identical)."""
    return known_into(x, cond_image, mask)


def restore(diffusion: GaussianDiffusion, net: Any, cond: dict[str, Tensor], x_T: Tensor, *, sampler: str = "ddpm",
            objective: str = "diffusion", **sampler_kwargs: Any) -> Tensor:
    """Palette inference for one batch: x_T (B, C, H, W) noise -> output (B, C, H, W) with the known pixels of
    cond["cond_image"] pasted in exactly. `diffusion` is the (respaced) chain the sampler walks; a regression
    model ignores it and x_T and predicts x_0 in one pass. sampler_kwargs go to the sampler (generator,
    clip_denoised, eta, callback, ...)."""
    wrapped = ConcatConditioned(net)
    if objective == "regression":
        x = regression_x0(wrapped, cond).float()
    else:
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; known: {', '.join(SAMPLERS)}")
        x = SAMPLERS[sampler](diffusion, wrapped, x_T, cond=cond, **sampler_kwargs).float()
    return paste_known(x.clamp(-1, 1), cond["cond_image"].float(), cond["mask"].float())


def regression_x0(net: ConcatConditioned, cond: dict[str, Tensor]) -> Tensor:
    """The regression baseline's prediction (Palette's "Regression" row): the degraded image in the x_t slot,
    t = 0, the output read as x_0 (B, C, H, W)."""
    x_in = cond["cond_image"]
    t = torch.zeros(x_in.shape[0], dtype=torch.long, device=x_in.device)
    return net(x_in, t, **cond)[:, : x_in.shape[1]]
