"""DPM-Solver++(2M): a second-order multistep solver of the diffusion ODE in data prediction (Lu et al. 2022,
"DPM-Solver++", Algorithm 2), for 10-25-step sampling."""

from __future__ import annotations

from typing import Any

import torch

from ..diffusion.gaussian import GaussianDiffusion, ModelFn, _gather
from .common import Callback, SamplerStep, batch_t, check_start, step_indices


@torch.no_grad()
def dpm_solver_pp_2m(
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
    """Solve from x_T (B, C, H, W) over the steps of `diffusion` (respace it, e.g. "20") and return x_0.

    With alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), lambda_t = log(alpha_t / sigma_t) and h the step in
    lambda, each move s -> t is  x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D, where D is the x_0
    prediction (first step) or its 2nd-order multistep combination. The last move goes to sigma = 0 and returns
    the final D (first order there, as the solver's "lower order final" advice). `generator` is unused: the
    solver is deterministic; it is accepted so every sampler shares one signature.
    """
    del generator
    check_start(x_T)
    x = x_T
    prev_x0: torch.Tensor | None = None
    prev_h: torch.Tensor | None = None
    for n, i in enumerate(step_indices(diffusion, start_step, progress, "dpm++2m")):
        s = batch_t(i, x)
        x0 = diffusion.p_mean_variance(model, x, s, cond=cond, clip_denoised=clip_denoised, threshold=threshold).pred_x0
        if i == 0:  # 3. last move to sigma = 0: x_0 = D (first order)
            x = x0
        else:
            abar_s = _gather(diffusion.alphas_cumprod, s, x)
            abar_t = _gather(diffusion.alphas_cumprod, batch_t(i - 1, x), x)
            lam_s = 0.5 * (torch.log(abar_s) - torch.log1p(-abar_s))
            lam_t = 0.5 * (torch.log(abar_t) - torch.log1p(-abar_t))
            h = lam_t - lam_s
            d = x0
            if prev_x0 is not None and prev_h is not None:
                # 1. D = (1 + 1/(2r)) x0_s - 1/(2r) x0_prev with r = h_prev / h   (Algorithm 2, line 7)
                r = prev_h / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * prev_x0
            # 2. x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D   (eq. 9 / Algorithm 2, line 8)
            x = torch.sqrt((1 - abar_t) / (1 - abar_s)) * x - abar_t.sqrt() * torch.expm1(-h) * d
            prev_x0, prev_h = x0, h
        if callback is not None:
            callback(SamplerStep(n, i, x, x0))
    return x
