"""Samplers over a GaussianDiffusion and a model callable; all share one signature:

    sampler(diffusion, model, x_T, *, cond, generator, callback, progress, clip_denoised, threshold, start_step)

The steps walked are those of the `diffusion` passed in: respace it (`diffusion.respace("50")`) for fewer.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, Mapping, get_args

import torch

from ..diffusion.gaussian import GaussianDiffusion, ModelFn
from .ancestral import ancestral_sample
from .common import Callback, SamplerStep
from .ddim import ddim_invert, ddim_sample
from .dpm_solver import dpm_solver_pp_2m, sde_dpm_solver_pp_2m
from .editing import interpolate, slerp, vary
from .guidance import ClassifierFreeGuidance

SamplerName = Literal[
    "ddpm",  # ancestral sampling, any spacing (DDPM Algorithm 2)
    "ddim",  # DDIM, eta in [0, 1] (eta = 0 deterministic)
    "dpm++2m",  # DPM-Solver++(2M), good at 10-25 steps
    "sde-dpm++2m",  # SDE-DPM-Solver++(2M): stochastic 2M, fresh noise each step; wants a few more steps than dpm++2m
]

SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddpm": ancestral_sample,
    "ddim": ddim_sample,
    "dpm++2m": dpm_solver_pp_2m,
    "sde-dpm++2m": sde_dpm_solver_pp_2m,
}


SpacingName = Literal[
    "uniform",  # evenly strided over [0, T) with both ends kept: improved-diffusion's "N" ("ddimN" for DDIM)
    "noise-dense",  # t_i = (T-1)(1 - (1 - i/(N-1))^2): steps crowd towards pure noise, twice the uniform stride
    # at the data end; where the global layout of an image is decided, a stochastic solver gets more moves
]
SPACINGS: tuple[str, ...] = get_args(SpacingName)


def resolve_spacing(spacing: str, sampler: str, auto: Mapping[str, str]) -> str:
    """A spacing setting as the steps to walk: "auto" becomes auto[sampler] (uniform for samplers it does not name),
    the others are checked. Each pipeline keeps its own `auto` table: what was measured best for its models."""
    if spacing == "auto":
        return auto.get(sampler, "uniform")
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; known: auto, {', '.join(SPACINGS)}")
    return spacing


def noise_dense_steps(steps: int, num_train_steps: int) -> list[int]:
    """`steps` distinct training steps from 0 to T-1, dense near T-1: t_i = round((T-1)(1 - (1 - i/(N-1))^2)).

    Near T the rounded values collide when N is close to T; walking down from T-1, each step is kept strictly
    below the one above it. That never goes under i, because (T-1)(1 - (1-u)^2) >= (T-1)u >= i."""
    if not 2 <= steps <= num_train_steps:
        raise ValueError(f"noise-dense spacing needs 2 <= steps <= {num_train_steps}, got {steps}")
    top = num_train_steps - 1
    ideal = [round(top * (1.0 - (1.0 - i / (steps - 1)) ** 2)) for i in range(steps)]
    kept = [top]
    for t in reversed(ideal[:-1]):
        kept.append(min(t, kept[-1] - 1))
    return kept[::-1]


def default_spacing(sampler: str, steps: int | None, num_train_steps: int,
                    spacing: str = "uniform") -> str | list[int] | None:
    """The respacing (a GaussianDiffusion.respace argument) for `steps` sampling steps; None = all training steps.

    Uniform: DDIM takes the paper's integer-stride "ddimN" spacing (it starts at t = 0), every other sampler
    improved-diffusion's "N", evenly strided over [0, T) with both ends kept. "noise-dense": noise_dense_steps.
    """
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; known: {', '.join(SPACINGS)}")
    if steps is None or steps >= num_train_steps:
        return None
    if steps == 1:  # one step from pure noise (t = T-1) to the x_0 prediction; "ddim1" / "1" would start at t = 0
        return [num_train_steps - 1]
    if spacing == "noise-dense":
        return noise_dense_steps(steps, num_train_steps)
    return f"ddim{steps}" if sampler == "ddim" else str(steps)


def sample(
    diffusion: GaussianDiffusion,
    model: ModelFn,
    x_T: torch.Tensor,
    *,
    sampler: str = "ddpm",
    spacing: str | None = None,
    eta: float = 0.0,
    **kwargs: Any,
) -> torch.Tensor:
    """Respace (if asked) and run the named sampler; kwargs go to the sampler (cond, generator, callback, ...)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; known: {', '.join(SAMPLERS)}")
    d = diffusion.respace(spacing) if spacing else diffusion
    if sampler == "ddim":
        kwargs["eta"] = eta
    return SAMPLERS[sampler](d, model, x_T, **kwargs)


__all__ = [
    "SAMPLERS",
    "SPACINGS",
    "Callback",
    "ClassifierFreeGuidance",
    "SamplerStep",
    "ancestral_sample",
    "ddim_invert",
    "ddim_sample",
    "default_spacing",
    "resolve_spacing",
    "dpm_solver_pp_2m",
    "interpolate",
    "noise_dense_steps",
    "sample",
    "sde_dpm_solver_pp_2m",
    "slerp",
    "vary",
]
