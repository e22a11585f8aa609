"""Gaussian diffusion maths (DDPM / Improved DDPM): schedules, forward process, losses, likelihood."""

from .gaussian import DiffusionConfig, GaussianDiffusion, ModelOutput, PMeanVar, VarianceType, process_x0, randn_like
from .likelihood import BpdReport, BpdTerms, calc_bpd, dataset_bpd, prior_bpd
from .losses import (
    LossTerms,
    LossType,
    discretized_gaussian_log_likelihood,
    mean_flat,
    normal_kl,
    training_losses,
    vb_term_bpd,
)
from .schedules import cosine_betas, explicit_betas, linear_betas, named_betas, respace_betas, space_timesteps
from .timesteps import LossAwareSampler, TimestepBatch, UniformSampler, make_timestep_sampler

__all__ = [
    "BpdReport", "BpdTerms", "DiffusionConfig", "GaussianDiffusion", "LossAwareSampler", "LossTerms", "LossType",
    "ModelOutput", "PMeanVar", "TimestepBatch", "UniformSampler", "VarianceType", "calc_bpd", "cosine_betas",
    "dataset_bpd", "discretized_gaussian_log_likelihood", "explicit_betas", "linear_betas", "make_timestep_sampler",
    "mean_flat", "named_betas", "normal_kl", "prior_bpd", "process_x0", "randn_like", "respace_betas",
    "space_timesteps", "training_losses", "vb_term_bpd",
]
