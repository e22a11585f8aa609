"""Training objectives: L_simple, L_vlb, L_hybrid (DDPM sec. 3.4; Improved DDPM sec. 3.1) and their pieces.

Units follow improved-diffusion: per-timestep variational terms are means over all dimensions, in bits; the
MSE is a mean over dimensions. With t drawn uniformly, T * L_t is an unbiased estimate of the full bound, so the
paper's L_hybrid = L_simple + lambda * L_vlb becomes  mse + lambda * T * L_t  per sample (lambda = 0.001).
"""

from __future__ import annotations

import enum
import math
from typing import Any, NamedTuple

import torch

from .gaussian import GaussianDiffusion, ModelFn, randn_like


class LossType(str, enum.Enum):
    """Which objective trains the network."""

    SIMPLE = "simple"  # L_simple: MSE on the eps / x_0 / v target (DDPM eq. 14); fixed variance only
    L1 = "l1"  # mean absolute error on the same target (Palette's L1 ablation: less sample diversity)
    HYBRID = "hybrid"  # L_simple + lambda * L_vlb, vlb through the variance only (iDDPM sec. 3.1)
    KL = "kl"  # L_vlb: the per-step variational term L_t, trains mean and variance (DDPM eq. 5)
    RESCALED_KL = "rescaled_kl"  # T * L_t: the same bound estimate scaled to the full sum (iDDPM)


class LossTerms(NamedTuple):
    """Per-sample losses, each of shape (B,)."""

    loss: torch.Tensor  # what is minimised
    mse: torch.Tensor  # MSE (L1: mean absolute error) on the target (zeros for the pure KL objectives)
    vb: torch.Tensor  # L_t in bits per dimension (zeros for L_simple)


def mean_flat(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over all non-batch dimensions: (B, ...) -> (B,). With a mask (B, 1 or C, ...) of 0/1, the mean over
    the elements where it is 1 (Palette: only generated pixels count; known ones are given to the net)."""
    dims = tuple(range(1, x.ndim))
    if mask is None:
        return x.mean(dim=dims)
    mask = mask.to(x.dtype).expand_as(x)
    return (x * mask).sum(dim=dims) / mask.sum(dim=dims).clamp(min=1.0)


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Fast tanh approximation of the standard normal CDF (used by DDPM/iDDPM for the decoder likelihood)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, *, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """log p(x) of 8-bit data x in [-1, 1] under a Gaussian discretised into 256 bins (DDPM eq. 13), in nats.

    log_scales is log(sigma) (half the log-variance). The two edge bins take the whole tail, so the 256 bin
    probabilities sum to exactly one.
    """
    if not (x.shape == means.shape == log_scales.shape):
        raise ValueError(f"shapes differ: x {tuple(x.shape)}, means {tuple(means.shape)}, log_scales {tuple(log_scales.shape)}")
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def vb_term_bpd(
    diffusion: GaussianDiffusion,
    model: ModelFn,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    *,
    cond: dict[str, Any] | None = None,
    clip_denoised: bool = False,
    model_output: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L_t in bits/dim: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0, decoder NLL -log p(x_0|x_1) at t = 0.

    Returns (vb (B,), pred_x0 (B, C, H, W)).
    """
    true_mean, _, true_log_var = diffusion.q_posterior(x0, x_t, t)
    out = diffusion.p_mean_variance(model, x_t, t, cond=cond, clip_denoised=clip_denoised, model_output=model_output)
    kl = mean_flat(normal_kl(true_mean, true_log_var, out.mean, out.log_variance), mask) / math.log(2.0)
    nll = -discretized_gaussian_log_likelihood(x0, means=out.mean, log_scales=0.5 * out.log_variance)
    nll = mean_flat(nll, mask) / math.log(2.0)
    return torch.where(t == 0, nll, kl), out.pred_x0


def training_losses(
    diffusion: GaussianDiffusion,
    model: ModelFn,
    x0: torch.Tensor,
    t: torch.Tensor,
    *,
    loss_type: LossType | str = LossType.SIMPLE,
    noise: torch.Tensor | None = None,
    cond: dict[str, Any] | None = None,
    vlb_weight: float = 0.001,
    generator: torch.Generator | None = None,
    mask: torch.Tensor | None = None,
) -> LossTerms:
    """Per-sample training losses for one batch of x_0 (B, C, H, W) at steps t (B,).

    `mask` (B, 1, H, W) of 0/1 restricts every term to the pixels where it is 1 (conditional models that are
    given the other pixels)."""
    loss_type = LossType(loss_type)
    if loss_type in (LossType.SIMPLE, LossType.L1) and diffusion.learned_variance:
        raise ValueError(f"loss '{loss_type.value}' cannot train a learned variance: use 'hybrid' (iDDPM) or 'kl'")
    if loss_type == LossType.HYBRID and not diffusion.learned_variance:
        raise ValueError(f"loss 'hybrid' needs variance 'learned_range', got '{diffusion.variance.value}'")
    if noise is None:
        noise = randn_like(x0, generator)
    x_t = diffusion.q_sample(x0, t, noise)
    out = diffusion.call_model(model, x_t, t, cond)
    zeros = torch.zeros(x0.shape[0], device=x0.device, dtype=out.dtype)

    if loss_type in (LossType.KL, LossType.RESCALED_KL):
        vb, _ = vb_term_bpd(diffusion, model, x0, x_t, t, model_output=out, mask=mask, cond=cond)
        if loss_type == LossType.RESCALED_KL:
            vb = vb * diffusion.num_steps
        return LossTerms(vb, zeros, vb)

    c = x0.shape[1]
    target = diffusion.training_target(x0, t, noise)
    if loss_type == LossType.L1:
        l1 = mean_flat((out[:, :c] - target).abs(), mask)
        return LossTerms(l1, l1, zeros)
    mse = mean_flat((out[:, :c] - target) ** 2, mask)
    if loss_type == LossType.SIMPLE:
        return LossTerms(mse, mse, zeros)
    # L_hybrid: the vlb sees a detached mean prediction so it only trains the variance (iDDPM sec. 3.1)
    frozen = torch.cat([out[:, :c].detach(), out[:, c:]], dim=1)
    vb, _ = vb_term_bpd(diffusion, model, x0, x_t, t, model_output=frozen, mask=mask, cond=cond)
    vb_scaled = vb * (vlb_weight * diffusion.num_steps)
    return LossTerms(mse + vb_scaled, mse, vb)

