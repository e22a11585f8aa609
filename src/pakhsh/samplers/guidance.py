"""Classifier-free guidance as a wrapper around the model callable (Ho & Salimans 2021, eq. 6)."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ..diffusion.gaussian import ModelFn


class ClassifierFreeGuidance:
    """model(x, t, **cond) -> uncond + scale * (cond_out - uncond), in one batched call of the wrapped model.

    `null_cond` gives, per condition keyword, the "no condition" value: a tensor broadcastable to the batch
    (e.g. the null class index, or an empty-prompt embedding of shape (1, ...)). Keywords missing from it are
    passed unchanged to both halves. With a learned variance only the first `guided_channels` output channels
    (the eps prediction) are guided; the rest come from the conditional half (as GLIDE does).
    """

    def __init__(
        self,
        model: ModelFn,
        scale: float,
        null_cond: Mapping[str, Any],
        guided_channels: int | None = None,
    ) -> None:
        self.model = model
        self.scale = float(scale)
        self.null_cond = dict(null_cond)
        self.guided_channels = guided_channels

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        if self.scale == 1.0:  # guidance 1 is the plain conditional model: skip the second half
            return self.model(x, t, **cond)
        b = x.shape[0]
        unknown = set(self.null_cond) - set(cond)
        if unknown:
            raise ValueError(f"guidance null condition names {sorted(unknown)} but the call has {sorted(cond)}")
        both = {k: self._pair(v, self.null_cond.get(k), b) for k, v in cond.items()}
        out = self.model(torch.cat([x, x]), torch.cat([t, t]), **both)
        out_c, out_u = out[:b], out[b:]
        c = self.guided_channels if self.guided_channels is not None else out.shape[1]
        guided = out_u[:, :c] + self.scale * (out_c[:, :c] - out_u[:, :c])
        return torch.cat([guided, out_c[:, c:]], dim=1)

    @staticmethod
    def _pair(value: Any, null: Any, b: int) -> Any:
        """Stack the conditional value over its null counterpart along the batch."""
        if not isinstance(value, torch.Tensor):
            return value
        if null is None:
            return torch.cat([value, value])
        null_t = torch.as_tensor(null, dtype=value.dtype, device=value.device)
        null_t = null_t.expand(b, *value.shape[1:]) if null_t.ndim == value.ndim else null_t.expand_as(value)
        return torch.cat([value, null_t])
