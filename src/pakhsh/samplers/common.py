"""Pieces every sampler shares: the callback record, the step loop, noise drawing (one generator per image when
asked) and a progress bar that counts network evaluations."""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..diffusion.gaussian import GaussianDiffusion, ModelFn
from ..diffusion.gaussian import randn_like as _randn_one_stream


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


# ---------------------------------------------------------------------------------------------- noise per image
def image_seed(seed: int, index: int) -> int:
    """A 63-bit seed for image `index` of a run seeded with `seed`: a hash of the pair, so neighbouring seeds and
    indices give unrelated streams (seed + index would make image 1 of seed 0 equal image 0 of seed 1)."""
    state = np.random.SeedSequence([int(seed) % 2**64, int(index)]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31 | int(state[1]) >> 1) & (2**63 - 1)


class ImageGenerators:
    """One torch.Generator per image of a batch, accepted wherever a sampler takes `generator`.

    Every draw for row i (its starting noise, then each step's noise) comes from generator i, so an image depends
    only on (seed, its index) and not on how images are split into batches. Deliberately not a torch.Generator:
    a torch function handed one by mistake fails loudly instead of drawing one shared stream.
    """

    def __init__(self, generators: Sequence[torch.Generator]) -> None:
        if not generators:
            raise ValueError("ImageGenerators needs at least one generator")
        self.generators = list(generators)

    @classmethod
    def for_images(cls, seed: int, indices: Iterable[int], device: str | torch.device = "cpu") -> "ImageGenerators":
        """Generators for the images `indices` (e.g. range(32, 64) for the second batch of 32) of seed `seed`."""
        return cls([torch.Generator(device=device).manual_seed(image_seed(seed, i)) for i in indices])

    @property
    def device(self) -> torch.device:
        return self.generators[0].device

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(len(self), *shape) standard normal noise, row i from generator i (on the generators' device)."""
        return torch.stack([torch.randn(shape, generator=g, device=g.device, dtype=dtype) for g in self.generators])


def randn_like(x: torch.Tensor, generator: torch.Generator | ImageGenerators | None = None) -> torch.Tensor:
    """Noise shaped like x (B, ...): per image from ImageGenerators, else one stream (see diffusion.randn_like)."""
    if not isinstance(generator, ImageGenerators):
        return _randn_one_stream(x, generator)
    if len(generator) != x.shape[0]:
        raise ValueError(f"{len(generator)} per-image generators for a batch of {x.shape[0]}")
    return generator.randn(*x.shape[1:]).to(device=x.device, dtype=x.dtype)


# ---------------------------------------------------------------------------------------------- progress
class StepProgress:
    """A tqdm bar that moves once per network evaluation (a denoising step, or a timestep of the bound) and so
    shows a steady rate and an ETA even when one batch takes minutes. Use as a context manager; `counted(model)`
    returns the model callable that ticks it."""

    def __init__(self, total: int | None, desc: str, enabled: bool = True, unit: str = "step") -> None:
        self.bar = tqdm(total=total, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True)

    def counted(self, model: ModelFn) -> ModelFn:
        """`model` with one tick per call (classifier-free guidance batches both halves into one call)."""

        def tick(x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
            out = model(x, t, **cond)
            self.bar.update(1)
            return out

        return tick

    def set_total(self, total: int) -> None:
        """Set the total once it is known (e.g. after the first batch shows the batch size)."""
        self.bar.total = total
        self.bar.refresh()

    def __enter__(self) -> "StepProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.close()


def steps_for(num_images: int, batch_size: int, steps_per_batch: int) -> int:
    """Network evaluations of `num_images` images in batches: one per step per batch."""
    return math.ceil(num_images / batch_size) * steps_per_batch
