"""Spatial multi-head self-attention block of the ADM UNet.

Every pixel attends to every other pixel of the same feature map. The block is residual with a zero-initialised
output projection, so at init it is the identity. Attention itself is `F.scaled_dot_product_attention`, which
picks a fused (flash / memory-efficient) kernel where one exists and keeps softmax in fp32 internally.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from pakhsh.nets.layers import norm, zero_module


def resolve_heads(channels: int, num_heads: int, num_head_channels: int) -> int:
    """Number of heads for a `channels`-wide block: fixed width per head if `num_head_channels` > 0."""
    if num_head_channels > 0:
        if channels % num_head_channels:
            raise ValueError(f"num_head_channels={num_head_channels} does not divide attention width {channels}")
        return channels // num_head_channels
    if channels % num_heads:
        raise ValueError(f"num_heads={num_heads} does not divide attention width {channels}")
    return num_heads


class AttentionBlock(nn.Module):
    """Residual multi-head self-attention over the H*W positions of a (B, C, H, W) map."""

    def __init__(
        self, channels: int, num_heads: int = 1, use_checkpoint: bool = False, max_groups: int = 32
    ) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"num_heads={num_heads} does not divide channels={channels}")
        self.num_heads = num_heads
        self.use_checkpoint = use_checkpoint
        self.norm = norm(channels, max_groups)
        # Linear over the channel axis == the 1x1 conv of ADM, but works directly on (B, HW, C) tokens.
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj_out = zero_module(nn.Linear(channels, channels))

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, C, H, W)
        if self.use_checkpoint and torch.is_grad_enabled():  # recompute in backward instead of storing
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        # (B, C, H, W) -> (B, HW, C). For a channels_last input this permute+reshape is a free view.
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c)
        qkv = self.qkv(tokens).view(b, h * w, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, heads, HW, d)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, d)
        out = self.proj_out(out.transpose(1, 2).reshape(b, h * w, c))  # (B, HW, C)
        # Back to (B, C, H, W) as a channels_last view: no copy.
        out = out.view(b, h, w, c).permute(0, 3, 1, 2)
        return x + out
