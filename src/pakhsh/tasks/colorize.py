"""Colourisation's degradation: an RGB image -> its Rec. 601 luma, replicated to three channels."""

from __future__ import annotations

import torch
from torch import Tensor

# ITU-R BT.601 luma weights, the ones PIL's convert("L") and Palette's colourisation data use.
REC601 = (0.299, 0.587, 0.114)


def to_luma(x: Tensor) -> Tensor:
    """(B, 3, H, W) RGB in [-1, 1] -> (B, 3, H, W) grey: Y = 0.299 R + 0.587 G + 0.114 B in every channel.

    Y is computed on [0, 1] values and mapped back to [-1, 1]. A (B, 1, H, W) grey input is already luma and
    is repeated to three channels, so a user's greyscale photo is a valid colourisation input.
    """
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"to_luma: expected images (B, 3, H, W) or (B, 1, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] == 1:
        return x.repeat(1, 3, 1, 1)
    w = torch.tensor(REC601, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    y01 = ((x + 1.0) * 0.5 * w).sum(dim=1, keepdim=True)
    y = (y01 * 2.0 - 1.0).clamp(-1.0, 1.0)  # the weights sum to 1 only up to float rounding
    return y.expand(-1, 3, -1, -1).contiguous()
