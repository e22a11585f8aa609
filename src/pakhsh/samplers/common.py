"""Pieces every sampler shares: the callback record and the step loop with its progress bar."""

from __future__ import annotations

from typing import Any, Callable, Iterator, NamedTuple

import torch
from tqdm.auto import tqdm

from ..diffusion.gaussian import GaussianDiffusion


class SamplerStep(NamedTuple):
    """What a sampler reports to its callback after each step."""

    index: int  # 0-based count of steps taken
    t: int  # the chain's step index just processed (respaced index; diffusion.timestep_map gives the training step)
    x: torch.Tensor  # the new state, (B, C, H, W)
    pred_x0: torch.Tensor  # the model's x_0 estimate at this step, (B, C, H, W)


Callback = Callable[[SamplerStep], Any]


def step_indices(
    diffusion: GaussianDiffusion, start_step: int | None, progress: bool, desc: str
) -> Iterator[int]:
    """Chain indices from `start_step` (default T - 1) down to 0, with an optional tqdm bar."""
    start = diffusion.num_steps - 1 if start_step is None else int(start_step)
    if not 0 <= start < diffusion.num_steps:
        raise ValueError(f"start_step must be in [0, {diffusion.num_steps}), got {start_step}")
    return iter(tqdm(range(start, -1, -1), disable=not progress, desc=desc, leave=False))


def batch_t(i: int, x: torch.Tensor) -> torch.Tensor:
    """The step index i as a (B,) long tensor on x's device."""
    return torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)


def check_start(x: torch.Tensor) -> None:
    if x.ndim < 2:
        raise ValueError(f"x_T must be batched (B, C, ...), got shape {tuple(x.shape)}")
