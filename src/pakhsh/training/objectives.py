"""What a training step minimises, per system; the trainer draws the randomness and runs the optimiser.

- image diffusion (DDPM / Improved DDPM, optionally class-conditional): `training_losses` on the batch's images;
- Palette (a `task` in the config): the batch is degraded on the fly (tasks.degrade), the net sees the degraded
  image and mask as extra channels (conditioning.concat) and the loss covers the generated pixels only;
- regression (Palette's baseline): the same net maps the degraded image to x_0 in one pass, L2 on x_0;
- autoencoder (latent diffusion's first stage): reconstruction + KL (+ GAN), see training/autoencoder.py;
- latent diffusion (a `latent` section): `training_losses` on the frozen autoencoder's scaled latents, with the
  text / map / layout conditions of training/latent.py;
- unCLIP (training/unclip.py): the CLIP's symmetric contrastive loss (objective=clip); the prior's diffusion on
  CLIP image embeddings, predicting the clean embedding (objective=prior); the decoder's pixel diffusion
  conditioned on the image embedding (an `unclip` section);
- DreamBooth (a `dreambooth` section, training/dreambooth.py): the latent loss on subject images plus lambda
  times the loss on the frozen base's class images, one item = one of each.

Each returns LossTerms with per-sample (B,) terms; the trainer weights, averages and back-propagates them.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from ..conditioning.concat import ConcatConditioned, regression_x0
from ..diffusion import GaussianDiffusion, training_losses
from ..diffusion.losses import LossTerms, mean_flat
from ..tasks import degrade
from .experiment import ExperimentConfig


class Draws(NamedTuple):
    """This process's slice of the micro-batch's random draws (made by the trainer from (seed, position))."""

    t: torch.Tensor  # (B,) training steps
    noise: torch.Tensor  # (B, C, H, W)
    drop: torch.Tensor  # (B,) bool: label replaced by the null class (classifier-free guidance)
    generator: torch.Generator  # CPU generator for anything else the objective draws (degradations)
    step: int = 0  # the optimizer step this micro-batch belongs to (the autoencoder's discriminator warm-up)
    latent_eps: torch.Tensor | None = None  # (B, C, h, w) posterior noise of latent runs
    u: torch.Tensor | None = None  # (B, 3) uniform draws: dropout of text, map and layout conditions


def build_net(cfg: ExperimentConfig) -> nn.Module:
    """The module a run trains: the UNet, or for objective=autoencoder the autoencoder (+ discriminator), for
    objective=clip the CLIP, for objective=prior the prior transformer."""
    if cfg.is_autoencoder:
        from .autoencoder import AutoencoderTrainee

        assert cfg.autoencoder is not None
        return AutoencoderTrainee(cfg.autoencoder, cfg.autoencoder_loss)
    if cfg.objective == "clip":
        from ..nets.clip import CLIP

        return CLIP(cfg.clip)
    if cfg.objective == "prior":
        from ..nets.prior import DiffusionPrior

        return DiffusionPrior(cfg.prior)
    if cfg.dreambooth is not None:  # the base's UNet, with LoRA adapters when dreambooth.lora_rank is set
        from .dreambooth_base import build_dreambooth_net

        return build_dreambooth_net(cfg)
    from ..nets.unet import UNet

    return UNet(cfg.model)


def compute_losses(cfg: ExperimentConfig, model: Any, diffusion: GaussianDiffusion, batch: dict[str, torch.Tensor],
                   draws: Draws, device: torch.device, system: Any = None) -> LossTerms:
    """The per-sample loss terms of one micro-batch for the system `cfg` describes (`system`: the LatentSystem
    of a latent run)."""
    if cfg.is_unclip:
        return _unclip_losses(cfg, model, diffusion, batch, draws, system)
    if cfg.dreambooth is not None:  # subject + lambda * class prior (training/dreambooth.py)
        from .dreambooth import dreambooth_losses

        return dreambooth_losses(cfg, model, diffusion, batch, draws, system)
    x0 = batch["image"].to(device, non_blocking=True)
    if cfg.is_autoencoder:
        from .autoencoder import autoencoder_losses

        assert draws.latent_eps is not None
        return autoencoder_losses(cfg, model, x0, draws.latent_eps, draws.step)
    if system is not None:
        assert draws.latent_eps is not None and draws.u is not None
        z0 = system.latents(batch, draws.latent_eps)
        cond = system.conditions(batch, draws.u)
        if cfg.model.num_classes is not None:  # class labels, dropped to the null class like pixel models
            y = batch["label"].to(device)
            cond["y"] = torch.where(draws.drop, torch.full_like(y, cfg.model.num_classes), y)
        return training_losses(diffusion, model, z0, draws.t, loss_type=cfg.diffusion.loss, noise=draws.noise,
                               cond=cond, vlb_weight=cfg.diffusion.vlb_weight)
    if cfg.task is not None:
        return _palette_losses(cfg, model, diffusion, x0, draws)
    cond: dict[str, torch.Tensor] = {}
    if cfg.model.num_classes is not None:
        y = batch["label"].to(device)
        cond["y"] = torch.where(draws.drop, torch.full_like(y, cfg.model.num_classes), y)
    return training_losses(diffusion, model, x0, draws.t, loss_type=cfg.diffusion.loss, noise=draws.noise,
                           cond=cond, vlb_weight=cfg.diffusion.vlb_weight)


def palette_condition(cfg: ExperimentConfig, x0: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Degrade x0 (B, C, H, W) and return the model's keyword conditions: cond_image, mask (and y = task id for a
    multi-task model)."""
    assert cfg.task is not None
    deg, task_ids = degrade(x0.detach().float().cpu(), cfg.task, generator)
    cond = {"cond_image": deg.cond.to(x0.device, x0.dtype), "mask": deg.mask.to(x0.device, x0.dtype)}
    if cfg.model.num_classes is not None:
        cond["y"] = task_ids.to(x0.device)
    return cond


def _palette_losses(cfg: ExperimentConfig, model: Any, diffusion: GaussianDiffusion, x0: torch.Tensor,
                    draws: Draws) -> LossTerms:
    cond = palette_condition(cfg, x0, draws.generator)
    net = ConcatConditioned(model)
    if cfg.objective == "regression":
        return regression_losses(net, x0, cond)
    return training_losses(diffusion, net, x0, draws.t, loss_type=cfg.diffusion.loss, noise=draws.noise, cond=cond,
                           vlb_weight=cfg.diffusion.vlb_weight, mask=cond["mask"])


def regression_losses(net: ConcatConditioned, x0: torch.Tensor, cond: dict[str, torch.Tensor]) -> LossTerms:
    """L2 between the one-pass prediction and x_0 over the generated pixels (Palette's "Regression" row)."""
    mse = mean_flat((regression_x0(net, cond).float() - x0.float()) ** 2, cond["mask"])
    return LossTerms(mse, mse, torch.zeros_like(mse))


def _unclip_losses(cfg: ExperimentConfig, model: Any, diffusion: GaussianDiffusion, batch: dict[str, torch.Tensor],
                   draws: Draws, system: Any) -> LossTerms:
    """CLIP: the symmetric InfoNCE per pair; prior and decoder: diffusion losses on the system's x_0 and conditions."""
    assert system is not None and draws.u is not None
    if cfg.objective == "clip":
        from ..nets.clip import contrastive_loss

        images, tokens, mask = system.clip_inputs(batch)
        image_emb, text_emb, scale = model(images, tokens, mask)
        loss = contrastive_loss(image_emb, text_emb, scale)
        return LossTerms(loss, loss.detach(), torch.zeros_like(loss))
    x0 = system.latents(batch)
    cond = system.conditions(batch, draws.u)
    return training_losses(diffusion, model, x0, draws.t, loss_type=cfg.diffusion.loss, noise=draws.noise,
                           cond=cond, vlb_weight=cfg.diffusion.vlb_weight)
