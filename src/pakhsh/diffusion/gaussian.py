"""Gaussian diffusion (DDPM, Ho et al. 2020; Improved DDPM, Nichol & Dhariwal 2021) over a plain model callable.

The model is any callable `model(x_t, t, **cond) -> Tensor` with x_t of shape (B, C, H, W) and t of shape (B,)
holding *training* timestep indices in [0, T). Its output is (B, C, H, W), or (B, 2C, H, W) when the variance
is learned (first C channels: the eps / x_0 / v prediction, last C: the variance interpolation value).

A respaced diffusion (fewer steps, `GaussianDiffusion.respace`) keeps a `timestep_map` from its own step index to
the original training step, and always calls the model with the original step, so one trained network serves
every spacing.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import torch

from .schedules import explicit_betas, named_betas, respace_betas, space_timesteps

ModelFn = Callable[..., torch.Tensor]


class ModelOutput(str, enum.Enum):
    """What the network predicts."""

    EPS = "eps"  # the noise eps that made x_t from x_0 (DDPM)
    X0 = "x0"  # the clean image x_0 directly
    V = "v"  # v = sqrt(abar) eps - sqrt(1 - abar) x_0 (Salimans & Ho 2022, progressive distillation)


class VarianceType(str, enum.Enum):
    """How the reverse-process variance Sigma_theta(x_t, t) is chosen."""

    FIXED_SMALL = "fixed_small"  # posterior variance beta-tilde_t: the lower bound of DDPM sec. 3.2
    FIXED_LARGE = "fixed_large"  # beta_t: the upper bound of DDPM sec. 3.2
    LEARNED_RANGE = "learned_range"  # iDDPM eq. 15: exp(v log beta + (1 - v) log beta-tilde), v from the net


class PMeanVar(NamedTuple):
    """p_theta(x_{t-1} | x_t) and the predictions behind it; all (B, C, H, W)."""

    mean: torch.Tensor
    variance: torch.Tensor
    log_variance: torch.Tensor
    pred_x0: torch.Tensor
    pred_eps: torch.Tensor
    model_output: torch.Tensor  # raw network output (B, C or 2C, H, W), kept for the losses


@dataclass
class DiffusionConfig:
    """Everything that defines a Gaussian diffusion process; saved beside the network weights."""

    num_steps: int = 1000  # T
    schedule: str = "linear"  # "linear" | "cosine"; ignored when `betas` is given
    betas: list[float] | None = None  # an explicit schedule of length num_steps
    model_output: ModelOutput = ModelOutput.EPS
    variance: VarianceType = VarianceType.FIXED_SMALL
    loss: str = "simple"  # see pakhsh.diffusion.losses.LossType
    vlb_weight: float = 0.001  # lambda of L_hybrid (iDDPM sec. 3.1)


def _gather(arr: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """arr[t] reshaped to (B, 1, 1, ...) to broadcast over `like`, in like's dtype and device."""
    out = arr.to(t.device)[t].to(like.dtype)
    return out.reshape(-1, *([1] * (like.ndim - 1)))


class GaussianDiffusion:
    """The forward process q and the reverse-process parameterisation p_theta for a schedule of betas.

    All per-step constants are float64 tensors of shape (T,), named as in improved-diffusion so the
    equations read the same: alphas_cumprod = abar_t, posterior_* = q(x_{t-1} | x_t, x_0).
    """

    def __init__(
        self,
        betas: np.ndarray | Sequence[float],
        model_output: ModelOutput | str = ModelOutput.EPS,
        variance: VarianceType | str = VarianceType.FIXED_SMALL,
        timestep_map: Sequence[int] | None = None,
    ) -> None:
        b = explicit_betas(betas)
        self.model_output = ModelOutput(model_output)
        self.variance = VarianceType(variance)
        self.num_steps = int(b.shape[0])
        tm = list(range(self.num_steps)) if timestep_map is None else [int(x) for x in timestep_map]
        if len(tm) != self.num_steps:
            raise ValueError(f"timestep_map has {len(tm)} entries for {self.num_steps} steps")
        self.timestep_map = torch.tensor(tm, dtype=torch.long)

        alphas = 1.0 - b
        abar = np.cumprod(alphas)
        abar_prev = np.append(1.0, abar[:-1])
        # q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta-tilde_t)   (DDPM eq. 6-7)
        post_var = b * (1.0 - abar_prev) / (1.0 - abar)
        consts = {
            "betas": b,
            "alphas_cumprod": abar,
            "alphas_cumprod_prev": abar_prev,
            "alphas_cumprod_next": np.append(abar[1:], 0.0),
            "sqrt_alphas_cumprod": np.sqrt(abar),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - abar),
            "log_one_minus_alphas_cumprod": np.log(1.0 - abar),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / abar),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / abar - 1.0),
            "posterior_variance": post_var,
            # beta-tilde_0 = 0, so log is clipped by reusing beta-tilde_1 at t = 0 (as iDDPM does)
            "posterior_log_variance_clipped": np.log(np.append(post_var[1], post_var[1:]))
            if self.num_steps > 1
            else np.log(np.maximum(post_var, 1e-20)),
            "posterior_mean_coef1": b * np.sqrt(abar_prev) / (1.0 - abar),
            "posterior_mean_coef2": (1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar),
        }
        for name, value in consts.items():
            setattr(self, name, torch.from_numpy(np.asarray(value, dtype=np.float64)))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, cfg: DiffusionConfig) -> "GaussianDiffusion":
        """Build from a DiffusionConfig (explicit betas win over the named schedule)."""
        betas = cfg.betas if cfg.betas is not None else named_betas(cfg.schedule, cfg.num_steps)
        if cfg.betas is not None and len(cfg.betas) != cfg.num_steps:
            raise ValueError(f"betas has {len(cfg.betas)} entries but num_steps = {cfg.num_steps}")
        return cls(betas, cfg.model_output, cfg.variance)

    def respace(self, spacing: str | int | Sequence[int]) -> "GaussianDiffusion":
        """A shorter chain over a subset of this chain's steps ("50", "ddim25", "10,15,20", or a list).

        Betas are recomputed so alpha-bar is unchanged at the kept steps; the model is still called with the
        original training step (composed with this diffusion's own map, so respacing twice is exact too).
        """
        kept = space_timesteps(self.num_steps, spacing)
        betas = respace_betas(self.alphas_cumprod.numpy(), kept)
        tmap = self.timestep_map[kept].tolist()
        return GaussianDiffusion(betas, self.model_output, self.variance, timestep_map=tmap)

    @property
    def learned_variance(self) -> bool:
        return self.variance == VarianceType.LEARNED_RANGE

    # ------------------------------------------------------------------ forward process
    def q_mean_variance(self, x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)   (DDPM eq. 4). Returns (mean, var, log_var)."""
        mean = _gather(self.sqrt_alphas_cumprod, t, x0) * x0
        var = _gather(1.0 - self.alphas_cumprod, t, x0).expand_as(x0)
        return mean, var, _gather(self.log_one_minus_alphas_cumprod, t, x0).expand_as(x0)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) with the given noise: sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
        if noise.shape != x0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x0 shape {tuple(x0.shape)}")
        return _gather(self.sqrt_alphas_cumprod, t, x0) * x0 + _gather(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    def q_posterior(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q(x_{t-1} | x_t, x_0): (mean, variance, clipped log-variance)   (DDPM eq. 6-7)."""
        mean = _gather(self.posterior_mean_coef1, t, x_t) * x0 + _gather(self.posterior_mean_coef2, t, x_t) * x_t
        var = _gather(self.posterior_variance, t, x_t).expand_as(x_t)
        log_var = _gather(self.posterior_log_variance_clipped, t, x_t).expand_as(x_t)
        return mean, var, log_var

    # ------------------------------------------------------------------ eps / x0 / v conversions
    def x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)."""
        return _gather(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - _gather(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps

    def eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """eps = (x_t / sqrt(abar) - x_0) / sqrt(1/abar - 1)."""
        return (_gather(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x0) / _gather(self.sqrt_recipm1_alphas_cumprod, t, x_t)

    def x0_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """x_0 = sqrt(abar) x_t - sqrt(1 - abar) v."""
        return _gather(self.sqrt_alphas_cumprod, t, x_t) * x_t - _gather(self.sqrt_one_minus_alphas_cumprod, t, x_t) * v

    def v_from_eps(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """v = sqrt(abar) eps - sqrt(1 - abar) x_0."""
        return _gather(self.sqrt_alphas_cumprod, t, x0) * eps - _gather(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0

    def training_target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the network should output for this (x_0, t, eps): eps, x_0 or v."""
        if self.model_output == ModelOutput.EPS:
            return noise
        if self.model_output == ModelOutput.X0:
            return x0
        return self.v_from_eps(x0, t, noise)

    # ------------------------------------------------------------------ reverse process
    def call_model(self, model: ModelFn, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, Any] | None) -> torch.Tensor:
        """Run the network at this chain's step index t, mapped back to the training step it was trained on."""
        out = model(x_t, self.timestep_map.to(t.device)[t], **(cond or {}))
        channels = x_t.shape[1] * (2 if self.learned_variance else 1)
        if out.shape[0] != x_t.shape[0] or out.shape[1] != channels or out.shape[2:] != x_t.shape[2:]:
            raise ValueError(
                f"model output shape {tuple(out.shape)} does not fit x_t {tuple(x_t.shape)}: expected "
                f"{channels} channels ({'learned' if self.learned_variance else 'fixed'} variance)"
            )
        return out

    def p_mean_variance(
        self,
        model: ModelFn,
        x_t: torch.Tensor,
        t: torch.Tensor,
        *,
        cond: dict[str, Any] | None = None,
        clip_denoised: bool = True,
        threshold: float | None = None,
        model_output: torch.Tensor | None = None,
    ) -> PMeanVar:
        """p_theta(x_{t-1} | x_t): mean from the predicted x_0 through the posterior (DDPM eq. 7, 11).

        clip_denoised clamps the predicted x_0 to [-1, 1]; `threshold` (a percentile in (0, 1), e.g. 0.995)
        applies Imagen's dynamic thresholding instead. Pass `model_output` to reuse a network evaluation.
        """
        out = self.call_model(model, x_t, t, cond) if model_output is None else model_output
        c = x_t.shape[1]
        pred, var_values = (out[:, :c], out[:, c:]) if self.learned_variance else (out, None)
        log_var, var = self._model_log_variance(var_values, t, x_t)

        if self.model_output == ModelOutput.EPS:
            pred_x0 = self.x0_from_eps(x_t, t, pred)
        elif self.model_output == ModelOutput.X0:
            pred_x0 = pred
        else:
            pred_x0 = self.x0_from_v(x_t, t, pred)
        pred_x0 = process_x0(pred_x0, clip_denoised, threshold)
        # eps is re-derived from the (possibly clipped) x_0 so DDIM-type updates stay consistent with it
        pred_eps = self.eps_from_x0(x_t, t, pred_x0) if (clip_denoised or threshold or self.model_output != ModelOutput.EPS) else pred
        mean, _, _ = self.q_posterior(pred_x0, x_t, t)
        return PMeanVar(mean, var, log_var, pred_x0, pred_eps, out)

    def _model_log_variance(
        self, var_values: torch.Tensor | None, t: torch.Tensor, x_t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(log variance, variance) of p_theta for this variance type, shaped like x_t."""
        if self.variance == VarianceType.LEARNED_RANGE:
            assert var_values is not None
            min_log = _gather(self.posterior_log_variance_clipped, t, x_t)
            max_log = _gather(torch.log(self.betas), t, x_t)
            frac = (var_values + 1) / 2  # network's v in [-1, 1] -> [0, 1]   (iDDPM eq. 15)
            log_var = frac * max_log + (1 - frac) * min_log
            return log_var, torch.exp(log_var)
        if self.variance == VarianceType.FIXED_LARGE:
            # beta_t, except at t = 0 where beta-tilde_1 keeps the decoder's log-variance finite (iDDPM)
            var_arr = torch.cat([self.posterior_variance[1:2], self.betas[1:]]) if self.num_steps > 1 else self.betas
            log_arr = torch.log(var_arr)
        else:
            var_arr, log_arr = self.posterior_variance, self.posterior_log_variance_clipped
        return _gather(log_arr, t, x_t).expand_as(x_t), _gather(var_arr, t, x_t).expand_as(x_t)


def process_x0(x0: torch.Tensor, clip: bool, threshold: float | None = None) -> torch.Tensor:
    """Clip a predicted x_0 to [-1, 1], or apply dynamic thresholding (Imagen, Saharia et al. 2022, sec. 2.3).

    Dynamic thresholding: s = the `threshold` percentile of |x_0| per sample, s = max(s, 1), x_0 = clamp(x_0, -s, s) / s.
    """
    if threshold is not None:
        if not 0 < threshold < 1:
            raise ValueError(f"dynamic threshold percentile must be in (0, 1), got {threshold}")
        flat = x0.reshape(x0.shape[0], -1).abs().float()
        s = torch.quantile(flat, threshold, dim=1).clamp(min=1.0).to(x0.dtype)
        s = s.reshape(-1, *([1] * (x0.ndim - 1)))
        return torch.maximum(torch.minimum(x0, s), -s) / s
    return x0.clamp(-1, 1) if clip else x0


def randn_like(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard normal noise shaped like x, drawn on the generator's device (so a CPU-seeded run gives the
    same numbers whether the model lives on CPU or GPU) and then moved to x's device and dtype."""
    if generator is None:
        return torch.randn_like(x)
    noise = torch.randn(x.shape, generator=generator, device=generator.device, dtype=torch.float32)
    return noise.to(device=x.device, dtype=x.dtype)
