"""Where each block of our ADM UNet sits, so its weights can be renamed into other libraries' layouts.

Our `UNet` (pakhsh.nets.unet) keeps improved-diffusion's block order but its own names: `down.K.P`, `middle.P`,
`up.K.P` hold the K-th encoder/decoder step and the P-th layer inside it. `walk_unet` names each block by its
place in the architecture (level, index within the level, role), which is what both improved-diffusion's flat
`input_blocks.N.P` and diffusers' nested `down_blocks.L.resnets.J` are functions of. The converters in
`interop.openai` and `interop.diffusers` are then a table of renames each, plus the attention qkv layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Literal

import torch
from torch import nn

from ..nets.attention import AttentionBlock
from ..nets.layers import Downsample, ResBlock, Upsample
from ..nets.transformer import SpatialTransformer
from ..nets.unet import UNet

Role = Literal["res", "attn", "down", "up"]


@dataclass(frozen=True)
class Block:
    """One block of the UNet body and its place in the architecture."""

    ours: str  # module prefix in our UNet, e.g. "down.3.1"
    module: nn.Module
    section: Literal["down", "mid", "up"]
    step: int  # index K into our `down` / `up` ModuleList (improved-diffusion's input_blocks index is K + 1)
    pos: int  # index P of the layer inside that step
    level: int  # down: 0 = full resolution; up: 0 = the deepest level (diffusers' up_blocks order)
    index: int  # which ResBlock / attention of its level (diffusers' resnets.J / attentions.J)
    role: Role


def _role(module: nn.Module) -> Role:
    # A SpatialTransformer (cross-attention UNets) sits where an AttentionBlock would: diffusers' attentions.J.
    if isinstance(module, (AttentionBlock, SpatialTransformer)):
        return "attn"
    if isinstance(module, Downsample) or (isinstance(module, ResBlock) and module.resample == "down"):
        return "down"
    if isinstance(module, Upsample) or (isinstance(module, ResBlock) and module.resample == "up"):
        return "up"
    if isinstance(module, ResBlock):
        return "res"
    raise TypeError(f"unexpected layer {type(module).__name__} in the UNet body")


def walk_unet(net: UNet) -> Iterator[Block]:
    """Every block of the encoder, middle and decoder, in forward order."""
    cfg = net.cfg
    levels = len(cfg.channel_mult)
    step = 0
    for level in range(levels):  # encoder: num_res_blocks steps per level, then a downsampling step
        for index in range(cfg.num_res_blocks + (level != levels - 1)):
            for pos, layer in enumerate(net.down[step]):
                yield Block(f"down.{step}.{pos}", layer, "down", step, pos, level, index, _role(layer))
            step += 1
    for pos, layer in enumerate(net.middle):  # res, attention, res: diffusers' resnets.0, attentions.0, resnets.1
        yield Block(f"middle.{pos}", layer, "mid", 0, pos, 0, pos // 2 if pos != 1 else 0, _role(layer))
    step = 0
    for level in range(levels):  # decoder, deepest level first: num_res_blocks + 1 steps per level
        for index in range(cfg.num_res_blocks + 1):
            for pos, layer in enumerate(net.up[step]):
                yield Block(f"up.{step}.{pos}", layer, "up", step, pos, level, index, _role(layer))
            step += 1


# Sub-module names of our ResBlock -> the same tensors in another layout
RESBLOCK_PARTS = ("norm1", "conv1", "emb_proj", "norm2", "conv2", "skip")


def split_qkv(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Our fused qkv rows are [q | k | v], each head-major: split into the three projections."""
    return tuple(weight.chunk(3, dim=0))  # type: ignore[return-value]


def qkv_to_head_major(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """[q | k | v] (each head-major) -> per head [q_h | k_h | v_h]: improved-diffusion's (legacy) qkv order."""
    rest = weight.shape[1:]
    d = weight.shape[0] // (3 * heads)
    return weight.reshape(3, heads, d, *rest).transpose(0, 1).reshape(weight.shape)


def qkv_from_head_major(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of `qkv_to_head_major`."""
    rest = weight.shape[1:]
    d = weight.shape[0] // (3 * heads)
    return weight.reshape(heads, 3, d, *rest).transpose(0, 1).reshape(weight.shape)
