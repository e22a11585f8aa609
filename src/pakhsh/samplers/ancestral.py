"""Ancestral sampling of the reverse chain (DDPM, Ho et al. 2020, Algorithm 2), for any respacing."""

from __future__ import annotations

from typing import Any

import torch

from ..diffusion.gaussian import GaussianDiffusion, ModelFn
from .common import Callback, SamplerStep, batch_t, check_start, randn_like, step_indices


@torch.no_grad()
def ancestral_sample(
    diffusion: GaussianDiffusion,
    model: ModelFn,
    x_T: torch.Tensor,
    *,
    cond: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    clip_denoised: bool = True,
    threshold: float | None = None,
    start_step: int | None = None,
) -> torch.Tensor:
    """Run x_{t-1} ~ p_theta(x_{t-1} | x_t) from x_T (B, C, H, W) down to x_0.

    The steps are those of `diffusion` (respace it for fewer). `start_step` starts the chain at an intermediate
    step with x_T taken as x_t there (DDPM sec. 4.3 variations). Returns x_0, (B, C, H, W).
    """
    check_start(x_T)
    x = x_T
    for n, i in enumerate(step_indices(diffusion, start_step, progress, "ddpm")):
        t = batch_t(i, x)
        out = diffusion.p_mean_variance(model, x, t, cond=cond, clip_denoised=clip_denoised, threshold=threshold)
        # 1. x_{t-1} = mu_theta + sigma_t z, with z = 0 at the last step (Algorithm 2, line 4)
        noise = randn_like(x, generator) if i > 0 else torch.zeros_like(x)
        x = out.mean + torch.exp(0.5 * out.log_variance) * noise
        if callback is not None:
            callback(SamplerStep(n, i, x, out.pred_x0))
    return x
