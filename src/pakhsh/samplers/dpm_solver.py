"""DPM-Solver++(2M) and its stochastic twin SDE-DPM-Solver++(2M): second-order multistep solvers of the diffusion
ODE / reverse SDE in data prediction (Lu et al. 2022, "DPM-Solver++", Algorithm 2), for 10-25-step sampling.

Notation: alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), lambda_t = log(alpha_t / sigma_t) (half the log-SNR),
h = lambda_t - lambda_s > 0 for a move s -> t towards the data. Both solvers move with

    x_t = A x_s + B D + C z,   z ~ N(0, I),

where D is the model's x_0 prediction (first step) or its multistep combination, and (A, B, C) come from
integrating the linear part of the ODE / SDE exactly over [lambda_s, lambda_t]:

    ODE (DPM-Solver++, eq. 9):   A = sigma_t / sigma_s,            B = -alpha_t (e^{-h} - 1),   C = 0
    SDE (sde-dpmsolver++):        A = (sigma_t / sigma_s) e^{-h},   B = -alpha_t (e^{-2h} - 1),
                                  C = sigma_t sqrt(1 - e^{-2h})

The SDE's first-order move is exactly DDPM's posterior step q(x_t | x_s, x_0 = D), so SDE-DPM-Solver++ is a
higher-order generalisation of ancestral sampling.

The chain ends with two first-order moves. The move into chain step 0 is long in lambda (with "N" or "ddimN"
spacing step 0 is training step 0, where abar ~ 1), so h_prev / h is small there and the 2M weights would
extrapolate the x_0 predictions far off: it uses D = x_0 prediction alone ("lower order final", DPM-Solver's
advice for few steps, which we take at any step count). The last move, step 0 -> sigma = 0, has A = C = 0 and
B = 1: it returns the x_0 prediction at step 0. This is diffusers' DPMSolverMultistepScheduler over our steps
above t = 0 with final_sigmas_type="sigma_min" and a first-order last step (lower_order_final below 15 steps,
euler_at_final at any count), followed by one denoising x_0 prediction at t = 0.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from ..diffusion.gaussian import GaussianDiffusion, ModelFn
from .common import Callback, SamplerStep, batch_t, check_start, randn_like, step_indices


class _Move(NamedTuple):
    """Coefficients of one move s -> t:  x_t = a x_s + b D + c z, and its step size h in lambda."""

    a: float
    b: float
    c: float
    h: float


def _half_log_snr(abar: float) -> float:
    """lambda = log(alpha / sigma) = (log abar - log(1 - abar)) / 2; log1p keeps it exact for abar near 0."""
    return 0.5 * (math.log(abar) - math.log1p(-abar))


def _move(diffusion: GaussianDiffusion, i: int, stochastic: bool) -> _Move:
    """The (A, B, C, h) of the move from chain step i to i - 1 (i >= 1), in float64 whatever the images' dtype:
    h is a difference of two lambdas and loses digits fast in float32 at small steps."""
    abar_s = float(diffusion.alphas_cumprod[i])
    abar_t = float(diffusion.alphas_cumprod[i - 1])
    h = _half_log_snr(abar_t) - _half_log_snr(abar_s)
    ratio = math.sqrt((1.0 - abar_t) / (1.0 - abar_s))  # sigma_t / sigma_s
    if not stochastic:
        return _Move(ratio, -math.sqrt(abar_t) * math.expm1(-h), 0.0, h)
    # expm1(-2h) keeps 1 - e^{-2h} accurate for the small h of long chains
    one_minus = -math.expm1(-2.0 * h)
    noise_scale = math.sqrt(1.0 - abar_t) * math.sqrt(one_minus)  # sigma_t sqrt(1 - e^{-2h})
    return _Move(ratio * math.exp(-h), math.sqrt(abar_t) * one_minus, noise_scale, h)


def _multistep_d(x0: torch.Tensor, prev_x0: torch.Tensor, r: float) -> torch.Tensor:
    """D = (1 + 1/(2r)) x0_s - 1/(2r) x0_prev with r = h_prev / h: the midpoint 2M combination D0 + D1 / 2
    with D1 = (x0_s - x0_prev) / r (Algorithm 2, line 7); the same D serves the ODE and the SDE."""
    w = 1.0 / (2.0 * r)
    return (1.0 + w) * x0 - w * prev_x0


def _solve(
    diffusion: GaussianDiffusion,
    model: ModelFn,
    x_T: torch.Tensor,
    *,
    stochastic: bool,
    desc: str,
    cond: dict[str, Any] | None,
    generator: torch.Generator | None,
    callback: Callback | None,
    progress: bool,
    clip_denoised: bool,
    threshold: float | None,
    start_step: int | None,
) -> torch.Tensor:
    """The 2M loop shared by the ODE and the SDE solver (one network call per chain step)."""
    check_start(x_T)
    x = x_T
    prev: tuple[torch.Tensor, float] | None = None  # (x_0 prediction, h) of the previous move
    for n, i in enumerate(step_indices(diffusion, start_step, progress, desc)):
        s = batch_t(i, x)
        x0 = diffusion.p_mean_variance(model, x, s, cond=cond, clip_denoised=clip_denoised, threshold=threshold).pred_x0
        if i > 0:
            m = _move(diffusion, i, stochastic)
            # 1. D: the x_0 prediction alone on the first move (no history yet) and on the move into step 0
            #    (lower order final, see the module docstring); the 2M combination in between
            d = x0 if prev is None or i == 1 else _multistep_d(x0, prev[0], prev[1] / m.h)
            # 2. x_t = A x_s + B D (+ C z for the SDE)
            x = m.a * x + m.b * d
            if stochastic:
                x = x + m.c * randn_like(x, generator)
            prev = (x0, m.h)
        else:
            # 3. denoise, step 0 -> sigma = 0: A = C = 0 and B = 1, so x = the x_0 prediction at step 0
            x = x0
        if callback is not None:
            callback(SamplerStep(n, i, x, x0))
    return x


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
    """DPM-Solver++(2M) (deterministic) from x_T (B, C, H, W) over the steps of `diffusion` (respace it, e.g.
    "20"); returns x_0.

    Each move s -> t is  x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D  (eq. 9), D the x_0 prediction
    on the first move and on the move into step 0, the 2M combination in between; the chain ends with the x_0
    prediction at step 0. `generator` is unused: it is accepted so every sampler shares one signature.
    """
    del generator
    return _solve(
        diffusion, model, x_T, stochastic=False, desc="dpm++2m", cond=cond, generator=None, callback=callback,
        progress=progress, clip_denoised=clip_denoised, threshold=threshold, start_step=start_step,
    )


@torch.no_grad()
def sde_dpm_solver_pp_2m(
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
    """SDE-DPM-Solver++(2M) (stochastic, midpoint) from x_T (B, C, H, W) over the steps of `diffusion`.

    Each move s -> t is  x_t = (sigma_t / sigma_s) e^{-h} x_s + alpha_t (1 - e^{-2h}) D + sigma_t sqrt(1 - e^{-2h}) z,
    the reverse SDE in data prediction with its linear part and noise integrated exactly (as diffusers'
    `algorithm_type="sde-dpmsolver++"`, `solver_type="midpoint"`). One fresh z per move except the last (to
    sigma = 0, where its weight is 0), drawn from `generator` on the generator's device. Returns x_0.
    """
    return _solve(
        diffusion, model, x_T, stochastic=True, desc="sde-dpm++2m", cond=cond, generator=generator,
        callback=callback, progress=progress, clip_denoised=clip_denoised, threshold=threshold, start_step=start_step,
    )
