"""The DDPM properties of the seed paper (Ho et al. 2020, sec. 4.3): latent interpolation and variations."""

from __future__ import annotations

from typing import Any, Literal, Sequence

import torch

from ..diffusion.gaussian import GaussianDiffusion, ModelFn, randn_like
from .ancestral import ancestral_sample

Mixing = Literal[
    "linear",  # x_t = (1 - lam) x_t^a + lam x_t^b (DDPM Fig. 8)
    "slerp",  # signal mixed linearly, noise mixed on the sphere so its variance stays 1
]


def chain_step_for(diffusion: GaussianDiffusion, t: int) -> int:
    """The chain index whose training step is the largest one <= t (t is a *training* step, e.g. 750 of 1000)."""
    steps = diffusion.timestep_map
    if t < int(steps[0]):
        raise ValueError(f"t = {t} is below the first step of this chain ({int(steps[0])})")
    return int((steps <= t).nonzero().max())


def slerp(a: torch.Tensor, b: torch.Tensor, lam: float) -> torch.Tensor:
    """Spherical interpolation per sample between a and b, (B, ...) each."""
    af, bf = a.flatten(1), b.flatten(1)
    cos = (af * bf).sum(1) / (af.norm(dim=1) * bf.norm(dim=1)).clamp(min=1e-12)
    theta = torch.arccos(cos.clamp(-1, 1)).reshape(-1, *([1] * (a.ndim - 1)))
    sin = torch.sin(theta)
    linear = (1 - lam) * a + lam * b  # fallback where a and b are (anti)parallel
    sph = (torch.sin((1 - lam) * theta) * a + torch.sin(lam * theta) * b) / sin.clamp(min=1e-12)
    return torch.where(sin.abs() < 1e-6, linear, sph)


@torch.no_grad()
def interpolate(
    diffusion: GaussianDiffusion,
    model: ModelFn,
    x0_a: torch.Tensor,
    x0_b: torch.Tensor,
    lambdas: Sequence[float],
    t: int,
    *,
    mixing: Mixing = "linear",
    shared_noise: bool = False,
    cond: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Interpolate two images through x_t (DDPM sec. 4.3): encode both with q(x_t | x_0), mix, decode each mix.

    x0_a, x0_b: (1, C, H, W) or (C, H, W). Returns (len(lambdas), C, H, W). The reverse chain uses the same
    noise for every lambda (as the paper fixes it), so rows differ only by the mix. `shared_noise` encodes both
    images with one eps, so the mix moves only the signal.
    """
    a, b = (x if x.ndim == 4 else x.unsqueeze(0) for x in (x0_a, x0_b))
    if a.shape != b.shape or a.shape[0] != 1:
        raise ValueError(f"interpolate needs two single images of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    k = chain_step_for(diffusion, t)
    tk = torch.full((1,), k, dtype=torch.long, device=a.device)
    eps_a = randn_like(a, generator)
    eps_b = eps_a if shared_noise else randn_like(b, generator)
    sqrt_abar = diffusion.sqrt_alphas_cumprod[k].item()
    sqrt_1m = diffusion.sqrt_one_minus_alphas_cumprod[k].item()
    mixes = []
    for lam in lambdas:
        if mixing == "slerp":
            mixes.append(sqrt_abar * ((1 - lam) * a + lam * b) + sqrt_1m * slerp(eps_a, eps_b, lam))
        elif mixing == "linear":
            mixes.append((1 - lam) * diffusion.q_sample(a, tk, eps_a) + lam * diffusion.q_sample(b, tk, eps_b))
        else:
            raise ValueError(f"unknown mixing {mixing!r}; use 'linear' or 'slerp'")
    x_t = torch.cat(mixes)
    # one reverse-noise stream for all lambdas: draw it for a single image, then repeat it over the batch
    return _decode_shared_noise(diffusion, model, x_t, k, cond, generator, progress)


def _decode_shared_noise(
    diffusion: GaussianDiffusion,
    model: ModelFn,
    x_t: torch.Tensor,
    k: int,
    cond: dict[str, Any] | None,
    generator: torch.Generator | None,
    progress: bool,
) -> torch.Tensor:
    """Ancestral decode of a batch from chain step k where every row sees the same reverse noise."""
    # rows run one at a time from one seed: the same noise per row, whatever the batch layout
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item()) if generator is not None else None
    outs = []
    for row in x_t:
        g = torch.Generator(device=generator.device if generator is not None else "cpu")
        if seed is not None:
            g.manual_seed(seed)
        else:
            g.seed()
        outs.append(ancestral_sample(diffusion, model, row.unsqueeze(0), cond=cond, generator=g, start_step=k, progress=progress))
    return torch.cat(outs)


@torch.no_grad()
def vary(
    diffusion: GaussianDiffusion,
    model: ModelFn,
    x0: torch.Tensor,
    t: int,
    count: int,
    *,
    cond: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Variations of one image (DDPM Fig. 9 / sec. 4.3): noise it to x_t, then run the reverse chain from t.

    Small t keeps almost everything; t = 750 of 1000 keeps high-level attributes (pose, colour layout). x0 is
    (1, C, H, W) or (C, H, W); returns (count, C, H, W).
    """
    x = x0 if x0.ndim == 4 else x0.unsqueeze(0)
    if x.shape[0] != 1:
        raise ValueError(f"vary takes one image, got a batch of {x.shape[0]}")
    k = chain_step_for(diffusion, t)
    xs = x.expand(count, *x.shape[1:])
    tk = torch.full((count,), k, dtype=torch.long, device=x.device)
    x_t = diffusion.q_sample(xs, tk, randn_like(xs, generator))
    return ancestral_sample(diffusion, model, x_t, cond=cond, generator=generator, start_step=k, progress=progress)
