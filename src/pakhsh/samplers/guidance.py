"""Classifier-free guidance as a wrapper around the model callable (Ho & Salimans 2021, eq. 6)."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ..diffusion.gaussian import ModelFn


class ClassifierFreeGuidance:
    """model(x, t, **cond) -> uncond + scale * (cond_out - uncond), in one batched call of the wrapped model.

    `null_cond` gives, per condition keyword, the "no condition" value, stacked under the call's value along the
    batch: a scalar or lower-rank value broadcast to it (the null class index), a (1, ...) tensor shared by every
    row (one empty-prompt embedding), or a (B, ...) tensor taken row by row (each image's own negative prompt:
    text models pass `context` (B, L, D) and `context_mask` (B, L) this way; build one wrapper per batch). Keywords
    missing from it are passed unchanged to both halves. With a learned variance only the first `guided_channels`
    output channels (the eps prediction) are guided; the rest come from the conditional half (as GLIDE does).
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
        both = {k: self._pair(k, v, self.null_cond.get(k)) for k, v in cond.items()}
        out = self.model(torch.cat([x, x]), torch.cat([t, t]), **both)
        out_c, out_u = out[:b], out[b:]
        c = self.guided_channels if self.guided_channels is not None else out.shape[1]
        guided = out_u[:, :c] + self.scale * (out_c[:, :c] - out_u[:, :c])
        return torch.cat([guided, out_c[:, c:]], dim=1)

    @staticmethod
    def _pair(key: str, value: Any, null: Any) -> Any:
        """Stack the conditional value (B, ...) over its null counterpart: (2B, ...)."""
        if not isinstance(value, torch.Tensor):
            return value
        if null is None:
            return torch.cat([value, value])
        null_t = torch.as_tensor(null, dtype=value.dtype, device=value.device)
        if null_t.ndim == value.ndim:
            ok = null_t.shape[0] in (1, value.shape[0]) and null_t.shape[1:] == value.shape[1:]
        else:  # a scalar label, or a value that broadcasts over the leading dimensions
            ok = null_t.ndim < value.ndim and _broadcasts(null_t.shape, value.shape)
        if not ok:
            trailing = ", ".join(str(n) for n in value.shape[1:])
            raise ValueError(f"guidance null condition {key!r} has shape {tuple(null_t.shape)}; with {key} of shape "
                             f"{tuple(value.shape)} it must be (1, {trailing}) or ({value.shape[0]}, {trailing})")
        return torch.cat([value, null_t.expand_as(value)])


def _broadcasts(small: torch.Size, big: torch.Size) -> bool:
    """Whether a tensor of shape `small` expands to `big` as it is."""
    try:
        return torch.broadcast_shapes(small, big) == big
    except RuntimeError:
        return False
