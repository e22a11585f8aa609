"""DDIM sampling and deterministic inversion (Song, Meng & Ermon 2021, eq. 12 and 13)."""

from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from ..diffusion.gaussian import GaussianDiffusion, ModelFn, _gather
from .common import Callback, SamplerStep, batch_t, check_start, randn_like, step_indices


@torch.no_grad()
def ddim_sample(
    diffusion: GaussianDiffusion,
    model: ModelFn,
    x_T: torch.Tensor,
    *,
    eta: float = 0.0,
    cond: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    clip_denoised: bool = True,
    threshold: float | None = None,
    start_step: int | None = None,
) -> torch.Tensor:
    """DDIM from x_T (B, C, H, W) over the steps of `diffusion` (respace it, e.g. "ddim50"). eta = 0 is
    deterministic; eta = 1 matches DDPM's ancestral variance. Returns x_0."""
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"DDIM eta must be in [0, 1], got {eta}")
    check_start(x_T)
    x = x_T
    for n, i in enumerate(step_indices(diffusion, start_step, progress, "ddim")):
        t = batch_t(i, x)
        out = diffusion.p_mean_variance(model, x, t, cond=cond, clip_denoised=clip_denoised, threshold=threshold)
        abar = _gather(diffusion.alphas_cumprod, t, x)
        abar_prev = _gather(diffusion.alphas_cumprod_prev, t, x)
        # 1. sigma_t(eta) = eta sqrt((1 - abar_prev) / (1 - abar)) sqrt(1 - abar / abar_prev)   (eq. 16)
        sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
        # 2. x_{t-1} = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z   (eq. 12)
        x = abar_prev.sqrt() * out.pred_x0 + torch.sqrt(1 - abar_prev - sigma**2) * out.pred_eps
        if i > 0 and eta > 0:
            x = x + sigma * randn_like(x, generator)
        if callback is not None:
            callback(SamplerStep(n, i, x, out.pred_x0))
    return x


@torch.no_grad()
def ddim_invert(
    diffusion: GaussianDiffusion,
    model: ModelFn,
    x0: torch.Tensor,
    *,
    cond: dict[str, Any] | None = None,
    callback: Callback | None = None,
    progress: bool = False,
    clip_denoised: bool = True,
    end_step: int | None = None,
) -> torch.Tensor:
    """Deterministic DDIM inversion x_0 -> x_T (eta = 0 run backwards, eq. 13 as an ODE).

    The clean image stands in for the state at chain step 0; each move then goes from step i-1 to i re-using
    the eps predicted at i-1. A move to step 0 itself would be the identity (x = sqrt(abar) x0_hat +
    sqrt(1 - abar) eps_hat holds by construction of x0_hat and eps_hat at that step, clipped or not), so it is
    skipped: inverting to step `end_step` costs exactly `end_step` network calls. With a perfect eps model,
    `ddim_sample` of the result gives x_0 back exactly. `end_step` stops at that chain step (default T - 1) so
    sampling can restart there with `start_step`. The callback sees one SamplerStep per move (index from 0,
    t = the step reached).
    """
    check_start(x0)
    end = diffusion.num_steps - 1 if end_step is None else int(end_step)
    if not 0 <= end < diffusion.num_steps:
        raise ValueError(f"end_step must be in [0, {diffusion.num_steps}), got {end_step}")
    x = x0.clone()  # a fresh tensor even when end = 0, so callers may edit the result in place
    for n, i in enumerate(tqdm(range(1, end + 1), disable=not progress, desc="ddim-invert", leave=False)):
        # 1. x0_hat, eps_hat from the network at the step we stand on (i - 1)
        out = diffusion.p_mean_variance(model, x, batch_t(i - 1, x), cond=cond, clip_denoised=clip_denoised)
        abar_next = _gather(diffusion.alphas_cumprod, batch_t(i, x), x)
        # 2. x_{t_i} = sqrt(abar_i) x0_hat + sqrt(1 - abar_i) eps_hat   (eq. 12 with sigma = 0, solved forward)
        x = abar_next.sqrt() * out.pred_x0 + torch.sqrt(1 - abar_next) * out.pred_eps
        if callback is not None:
            callback(SamplerStep(n, i, x, out.pred_x0))
    return x
