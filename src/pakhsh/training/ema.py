"""Exponential moving averages of the weights (one per rate), as DDPM / iDDPM sample from (rate 0.9999)."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


class EMA:
    """theta_ema <- rate * theta_ema + (1 - rate) * theta after every optimizer step, for each rate.

    The averages are kept in float32 on the device of the parameter they follow, keyed by parameter name, so
    they can be saved as safetensors and loaded into a fresh network of the same config. The EMA may be built
    before accelerate moves the model (CPU -> GPU); each shadow then follows its parameter on first use.
    """

    def __init__(self, model: nn.Module, rates: Iterable[float]) -> None:
        self.rates = [float(r) for r in rates]
        for r in self.rates:
            if not 0.0 <= r < 1.0:
                raise ValueError(f"EMA rate must be in [0, 1), got {r}")
        params = dict(model.named_parameters())
        self.shadows = {r: {k: p.detach().float().clone() for k, p in params.items()} for r in self.rates}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int | None = None) -> None:
        """Average in the current weights. With `step` given, each rate is capped at (1 + step) / (10 + step)
        so short runs are not dominated by the random initialisation (a common EMA warm-up)."""
        rates = {r: r if step is None else min(r, (1 + step) / (10 + step)) for r in self.rates}
        named = [(name, p.detach().float()) for name, p in model.named_parameters()]
        srcs = [src for _, src in named]
        for r, eff in rates.items():
            shadows = [self._on_device(r, name, src.device) for name, src in named]
            # one multi-tensor kernel instead of one lerp per parameter: on a GPU a small net's step is
            # bound by kernel launches, and the per-parameter loop was ~250 of them
            torch._foreach_lerp_(shadows, srcs, 1.0 - eff)

    def to(self, device: torch.device | str) -> "EMA":
        """Move every average to `device` (e.g. where accelerate put the model)."""
        for shadow in self.shadows.values():
            for name, v in shadow.items():
                shadow[name] = v.to(device)
        return self

    def _on_device(self, rate: float, name: str, device: torch.device) -> torch.Tensor:
        """The shadow of `name`, moved to `device` first when the model moved since the EMA was built."""
        shadow = self.shadows[rate][name]
        if shadow.device != device:
            shadow = self.shadows[rate][name] = shadow.to(device)
        return shadow

    def state_dict(self, rate: float) -> dict[str, torch.Tensor]:
        """The averaged parameters for one rate (buffers are not averaged; take them from the model)."""
        return self.shadows[rate]

    def load_state_dict(self, rate: float, state: dict[str, torch.Tensor]) -> None:
        own = self.shadows[rate]
        missing, unexpected = set(own) - set(state), set(state) - set(own)
        if missing or unexpected:
            raise ValueError(f"EMA {rate}: missing keys {sorted(missing)}, unexpected keys {sorted(unexpected)}")
        shapes = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if v.shape != own[k].shape]
        if shapes:
            raise ValueError(f"EMA {rate}: shape mismatches {'; '.join(shapes[:5])}")
        for k, v in state.items():
            own[k].copy_(v)  # copy_ moves across devices: the shadows stay where the model is

    def copy_to(self, model: nn.Module, rate: float) -> None:
        """Overwrite the model's parameters with the average for `rate`."""
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(self.shadows[rate][name].to(device=p.device, dtype=p.dtype))


def rate_name(rate: float) -> str:
    """A filename-safe name for a rate: 0.9999 -> "ema_0.9999"."""
    return f"ema_{rate:g}"
