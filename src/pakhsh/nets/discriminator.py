"""A patch discriminator (pix2pix / taming-transformers' NLayerDiscriminator, with GroupNorm instead of BatchNorm):
image (B, C, H, W) -> a map of real/fake logits, one per overlapping patch. Latent diffusion's autoencoders add
its hinge loss after a warm-up so that reconstructions keep sharp edges an L1 loss alone blurs."""

from __future__ import annotations

from torch import Tensor, nn

from pakhsh.nets.layers import num_groups_for


class PatchDiscriminator(nn.Module):
    """`layers` stride-2 4x4 convs (width doubling, capped at 8x) after a first stride-2 conv, then a stride-1
    conv and a 1-channel logit conv; LeakyReLU(0.2). (B, C, H, W) -> (B, 1, ~H/2^(layers+1), ...)."""

    def __init__(self, in_channels: int = 3, channels: int = 32, layers: int = 2) -> None:
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, layers + 1):
            out = channels * min(2 ** i, 8)
            stride = 2 if i < layers else 1
            mods += [nn.Conv2d(width, out, 4, stride, 1, bias=False), nn.GroupNorm(num_groups_for(out, 32), out),
                     nn.LeakyReLU(0.2)]
            width = out
        mods.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.net = nn.Sequential(*mods)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
