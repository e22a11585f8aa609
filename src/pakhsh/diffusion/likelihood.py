"""The full variational bound in bits/dim (Improved DDPM sec. 3; iDDPM's calc_bpd_loop).

-log p(x_0) <= L_vlb = L_T + sum_{t>1} L_{t-1} + L_0   (DDPM eq. 5), each term evaluated exactly (no sampling of
t): the prior term KL(q(x_T|x_0) || N(0, I)), every KL term at fresh noise, and the discretized decoder NLL.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from tqdm.auto import tqdm

from .gaussian import GaussianDiffusion, ModelFn, randn_like
from .losses import mean_flat, normal_kl, vb_term_bpd


@dataclass
class BpdTerms:
    """The bound of one batch, per sample."""

    total_bpd: torch.Tensor  # (B,) prior + sum of all T terms
    prior_bpd: torch.Tensor  # (B,) L_T
    vb: torch.Tensor  # (B, T) L_t for t = 0 .. T-1 (t = 0 is the decoder NLL)
    x0_mse: torch.Tensor  # (B, T) MSE of the predicted x_0 at each t
    eps_mse: torch.Tensor  # (B, T) MSE of the predicted eps at each t


@dataclass
class BpdReport:
    """Mean bound over a dataset."""

    bpd: float  # mean total bits/dim
    prior_bpd: float
    terms_bpd: list[float]  # mean L_t per step (length T)
    num_images: int


def prior_bpd(diffusion: GaussianDiffusion, x0: torch.Tensor) -> torch.Tensor:
    """L_T = KL(q(x_T | x_0) || N(0, I)) in bits/dim, (B,). Not trained; near zero for a good schedule."""
    t = torch.full((x0.shape[0],), diffusion.num_steps - 1, device=x0.device, dtype=torch.long)
    mean, _, log_var = diffusion.q_mean_variance(x0, t)
    kl = normal_kl(mean, log_var, torch.zeros_like(mean), torch.zeros_like(log_var))
    return mean_flat(kl) / math.log(2.0)


@torch.no_grad()
def calc_bpd(
    diffusion: GaussianDiffusion,
    model: ModelFn,
    x0: torch.Tensor,
    *,
    cond: dict[str, Any] | None = None,
    clip_denoised: bool = True,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> BpdTerms:
    """Every term of the bound for a batch x_0 (B, C, H, W) in [-1, 1] (8-bit data): T network evaluations.

    The network runs in x_0's dtype; the bound itself (posteriors, KLs, decoder NLL, MSEs, sums) is evaluated in
    float64 from that same x_t and network output, and every returned tensor is float64: the T terms are small
    differences of O(1) quantities summed T times, which float32 would round away.
    """
    b, steps = x0.shape[0], diffusion.num_steps
    vb, x0_mse, eps_mse = (torch.zeros(b, steps, device=x0.device, dtype=torch.float64) for _ in range(3))
    x0_64 = x0.double()
    for i in tqdm(range(steps - 1, -1, -1), disable=not progress, desc="bpd", leave=False):
        t = torch.full((b,), i, device=x0.device, dtype=torch.long)
        # 1. x_t ~ q(x_t | x_0) in the network's dtype, and its network output
        noise = randn_like(x0, generator)
        x_t = diffusion.q_sample(x0, t, noise)
        out = diffusion.call_model(model, x_t, t, cond)
        # 2. L_t (DDPM eq. 5) in float64 from exactly that x_t and output
        x_t64, noise64 = x_t.double(), noise.double()
        term, pred_x0 = vb_term_bpd(
            diffusion, model, x0_64, x_t64, t, cond=cond, clip_denoised=clip_denoised, model_output=out.double()
        )
        vb[:, i] = term
        x0_mse[:, i] = mean_flat((pred_x0 - x0_64) ** 2)
        eps_mse[:, i] = mean_flat((diffusion.eps_from_x0(x_t64, t, pred_x0) - noise64) ** 2)
    # 3. L_T, and the total  L_T + sum_t L_t
    prior = prior_bpd(diffusion, x0_64)
    return BpdTerms(vb.sum(dim=1) + prior, prior, vb, x0_mse, eps_mse)


def dataset_bpd(
    diffusion: GaussianDiffusion,
    model: ModelFn,
    batches: Iterable[torch.Tensor | dict[str, Any]],
    *,
    max_images: int | None = None,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
    progress: bool = True,
    cond_fn: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> BpdReport:
    """Mean bits/dim over batches of images (tensors, or dicts with "image"), stopping after `max_images`.

    `cond_fn` maps a dict batch to the model's condition keywords (e.g. {"y": labels}) for conditional models.
    """
    total, prior, terms, n = 0.0, 0.0, None, 0
    bar = tqdm(total=max_images, disable=not progress, desc="bits/dim", unit="img")
    for batch in batches:
        x0 = (batch["image"] if isinstance(batch, dict) else batch).to(device)
        keep = x0.shape[0] if max_images is None else max_images - n
        x0 = x0[:keep]
        cond = None
        if cond_fn is not None and isinstance(batch, dict):
            cond = {k: v[:keep].to(device) for k, v in cond_fn(batch).items()}
        out = calc_bpd(diffusion, model, x0, cond=cond, generator=generator)
        total += out.total_bpd.sum().item()
        prior += out.prior_bpd.sum().item()
        terms = out.vb.sum(0) if terms is None else terms + out.vb.sum(0)
        n += x0.shape[0]
        bar.update(x0.shape[0])
        bar.set_postfix(bpd=f"{total / n:.4f}")
        if max_images is not None and n >= max_images:
            break
    bar.close()
    if n == 0:
        raise ValueError("no images to evaluate bits/dim on")
    return BpdReport(total / n, prior / n, (terms / n).tolist(), n)
