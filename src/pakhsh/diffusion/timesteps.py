"""Sampling the training timestep t: uniform, or loss-aware importance sampling (Improved DDPM sec. 3.3).

Importance sampling draws t with p_t proportional to sqrt(E[L_t^2]) and weights each loss by 1 / (T p_t), so the
weighted loss stays an unbiased estimate of L_vlb while its variance drops.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch


class TimestepBatch(NamedTuple):
    """Sampled steps and the importance weights that keep the loss unbiased; both (B,)."""

    t: torch.Tensor  # long
    weights: torch.Tensor  # float32


class UniformSampler:
    """t ~ Uniform{0, ..., T-1}, all weights 1."""

    def __init__(self, num_steps: int) -> None:
        self.num_steps = num_steps

    def probabilities(self) -> np.ndarray:
        """p_t over the T steps, shape (T,)."""
        return np.full(self.num_steps, 1.0 / self.num_steps)

    def sample(self, batch_size: int, device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> TimestepBatch:
        """Draw `batch_size` steps with their weights 1 / (T p_t)."""
        p = torch.from_numpy(self.probabilities())
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        w = 1.0 / (self.num_steps * p[t])
        return TimestepBatch(t.to(device), w.float().to(device))

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Uniform sampling ignores the losses."""


class LossAwareSampler(UniformSampler):
    """p_t proportional to sqrt(mean of the last `history` values of L_t^2), mixed with `uniform_prob` of uniform.

    Until every step has `history` losses recorded, sampling stays uniform (iDDPM's warm-up). Call `update`
    with the per-sample (unweighted) vb losses of every batch -- gathered across processes when distributed.
    """

    def __init__(self, num_steps: int, history: int = 10, uniform_prob: float = 0.001) -> None:
        super().__init__(num_steps)
        self.history = history
        self.uniform_prob = uniform_prob
        self.loss_history = np.zeros((num_steps, history), dtype=np.float64)
        self.counts = np.zeros(num_steps, dtype=np.int64)

    def warmed_up(self) -> bool:
        return bool((self.counts == self.history).all())

    def probabilities(self) -> np.ndarray:
        if not self.warmed_up():
            return super().probabilities()
        w = np.sqrt(np.mean(self.loss_history**2, axis=-1))
        w = w / w.sum()
        return w * (1 - self.uniform_prob) + self.uniform_prob / self.num_steps

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        for step, loss in zip(t.tolist(), losses.detach().float().cpu().tolist()):
            if self.counts[step] == self.history:  # a ring buffer: drop the oldest
                self.loss_history[step, :-1] = self.loss_history[step, 1:]
                self.loss_history[step, -1] = loss
            else:
                self.loss_history[step, self.counts[step]] = loss
                self.counts[step] += 1

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"loss_history": self.loss_history.copy(), "counts": self.counts.copy()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        if state["loss_history"].shape != self.loss_history.shape:
            raise ValueError(f"loss history shape {state['loss_history'].shape} != {self.loss_history.shape}")
        self.loss_history = np.asarray(state["loss_history"], dtype=np.float64).copy()
        self.counts = np.asarray(state["counts"], dtype=np.int64).copy()


def make_timestep_sampler(name: str, num_steps: int) -> UniformSampler:
    """"uniform" or "loss-aware"."""
    if name == "uniform":
        return UniformSampler(num_steps)
    if name in ("loss-aware", "loss_aware", "loss-second-moment"):
        return LossAwareSampler(num_steps)
    raise ValueError(f"unknown timestep sampler {name!r}; known: 'uniform', 'loss-aware'")
