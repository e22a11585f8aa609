"""Inpainting with a latent diffusion model that was never trained for it (latent-diffusion's and SD's "legacy"
inpainting, RePaint without resampling): at every step the model sees the known region of the latents as the
forward process of the given image, z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps, and only the region to fill
comes from the sampler's chain; at the end the known latents are pasted back, and after decoding the known
pixels are pasted exactly.

Every pakhsh sampler updates latents elementwise, so what the chain holds at known positions never reaches the
generated ones except through the model, which only ever sees the known latents there. eps is the starting noise
x_T, so the known region starts where the chain starts.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..diffusion import GaussianDiffusion


def latent_mask(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """Pixel mask (N, 1, H, W), 1 = generate -> (N, 1, h, w): a latent cell is generated when any of its pixels is
    (so no generated pixel is decoded from known latents alone)."""
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask must be (N, 1, H, W), got {tuple(mask.shape)}")
    return F.adaptive_max_pool2d(mask.float(), size)


class KnownLatents:
    """model(x, t, **cond) with the known region of x replaced by the noised known latents (see the module)."""

    def __init__(self, model: Any, diffusion: GaussianDiffusion, z0: Tensor, mask: Tensor, noise: Tensor) -> None:
        self.model = model
        self.z0 = z0
        self.mask = latent_mask(mask, tuple(z0.shape[-2:])).to(z0)
        self.noise = noise.to(z0)
        self.abar = torch.as_tensor(diffusion.alphas_cumprod, dtype=torch.float64)

    def known_at(self, t: Tensor) -> Tensor:
        """The known latents noised to training step t (B,)."""
        a = self.abar[t.long().cpu()].to(self.z0.device, torch.float32).view(-1, 1, 1, 1)
        return a.sqrt() * self.z0 + (1 - a).sqrt() * self.noise

    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        x_in = self.mask * x + (1 - self.mask) * self.known_at(t).to(x.dtype)
        return self.model(x_in, t, **cond)

    def finish(self, z: Tensor) -> Tensor:
        """The sampled latents with the known ones pasted back."""
        return self.mask * z + (1 - self.mask) * self.z0.to(z.dtype)
