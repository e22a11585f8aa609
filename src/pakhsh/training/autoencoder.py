"""The first stage of latent diffusion: training the KL autoencoder, and reading a trained one back.

An autoencoder run (`objective: autoencoder`) trains `AutoencoderTrainee`: the autoencoder plus, when
`autoencoder_loss.disc_weight > 0`, a patch discriminator. Both sit in one module so the trainer's single
optimizer, EMA, checkpoints and exact resume serve them unchanged. The adversarial game still has two sides:
the generator term is computed through a copy of the discriminator's weights that is cut from the graph, and the
discriminator term on detached reconstructions, so one backward pass gives each side only its own gradient.

`load_autoencoder(spec)` takes a shipped name, an autoencoder run, checkpoint or exported folder and returns the
AutoencoderKL (EMA weights when present) without the discriminator.
"""

from __future__ import annotations

from pathlib import Path

import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ..diffusion.losses import LossTerms, mean_flat
from ..nets.autoencoder import AutoencoderConfig, AutoencoderKL
from ..nets.discriminator import PatchDiscriminator
from .experiment import AutoencoderLossConfig, ExperimentConfig

AE_PREFIX = "autoencoder."


class AutoencoderTrainee(nn.Module):
    """What an autoencoder run trains: `autoencoder` (AutoencoderKL) and an optional `discriminator`."""

    def __init__(self, cfg: AutoencoderConfig, loss: AutoencoderLossConfig) -> None:
        super().__init__()
        self.autoencoder = AutoencoderKL(cfg)
        self.discriminator = (PatchDiscriminator(cfg.out_channels, loss.disc_channels, loss.disc_layers)
                              if loss.disc_weight > 0 else None)

    def forward(self, x: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
        """x, eps (B, latent, h, w) standard normal -> (reconstruction of mean + std * eps, KL to N(0, I) (B,))."""
        posterior = self.autoencoder.encode(x)
        z = posterior.mean + posterior.std * eps.to(posterior.mean)
        return self.autoencoder.decode(z), posterior.kl()


def autoencoder_losses(cfg: ExperimentConfig, trainee: nn.Module, x0: Tensor, eps: Tensor, step: int) -> LossTerms:
    """Per-image loss (B,): l1 * |x - x'| + l2 * (x - x')^2 (pixel means) + kl_weight * KL / pixels, plus the
    hinge GAN terms after `disc_start` steps. LossTerms.mse is the pixel MSE, .vb the KL (for the log)."""
    lc = cfg.autoencoder_loss
    inner = trainee.module if hasattr(trainee, "module") else trainee  # DDP wraps it
    recon, kl = trainee(x0, eps)
    recon, x = recon.float(), x0.float()
    mse = mean_flat((recon - x) ** 2)
    pixels = x[0].numel()
    loss = lc.l1_weight * mean_flat((recon - x).abs()) + lc.l2_weight * mse + lc.kl_weight * kl.float() / pixels
    disc = inner.discriminator
    if disc is not None and step >= lc.disc_start:
        frozen = {k: v.detach() for k, v in disc.named_parameters()}
        fake_logits = functional_call(disc, frozen, (recon,))  # generator side: gradients reach the autoencoder only
        loss = loss - lc.disc_weight * fake_logits.float().mean(dim=(1, 2, 3))
        real, fake = disc(x), disc(recon.detach())
        d_loss = 0.5 * (F.relu(1.0 - real.float()).mean(dim=(1, 2, 3)) + F.relu(1.0 + fake.float()).mean(dim=(1, 2, 3)))
        loss = loss + d_loss
    return LossTerms(loss, mse, kl.float().detach())


def autoencoder_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A trainee state dict -> the autoencoder's own (keys without the prefix, no discriminator)."""
    return {k[len(AE_PREFIX):]: v for k, v in state.items() if k.startswith(AE_PREFIX)}


def load_autoencoder(spec: str | Path, *, ema: bool = True) -> tuple[AutoencoderKL, Path]:
    """A shipped autoencoder name, or an autoencoder run / checkpoint / exported folder -> (AutoencoderKL in eval
    mode on the CPU, the folder read); "identity": pixel space (nets.autoencoder.IdentityAutoencoder).
    ValueError / CheckpointError name the path when it is not one."""
    from ..nets.autoencoder import IDENTITY, IdentityAutoencoder
    from ..pipelines.base import resolve_model_path
    from .checkpoint import CheckpointError, check_fits, read_config, read_tensors, resolve_checkpoint
    from .ema import rate_name

    if str(spec) == IDENTITY:  # pixel space (f = 1)
        return IdentityAutoencoder.for_channels(3), Path(IDENTITY)  # type: ignore[return-value]
    try:
        path = resolve_model_path(spec)
    except FileNotFoundError:
        raise FileNotFoundError(f"autoencoder {spec!r}: no such folder or shipped autoencoder; name a shipped one "
                                "(autoencoder_f4, autoencoder_f8) or the run folder of `pakhsh train autoencoder_f4` "
                                "(e.g. runs/autoencoder_f4)") from None
    folder = resolve_checkpoint(path)
    cfg = read_config(folder)
    if not cfg.is_autoencoder or cfg.autoencoder is None:
        raise CheckpointError(f"{folder} is not an autoencoder (its config has objective={cfg.objective}); give "
                              "an autoencoder run or model (shipped: autoencoder_f4, autoencoder_f8)")
    net = AutoencoderKL(cfg.autoencoder)
    ema_file = folder / f"{rate_name(cfg.train.preview_ema)}.safetensors"
    source = ema_file if ema and ema_file.is_file() else folder / "model.safetensors"
    state = autoencoder_state(read_tensors(source))
    check_fits(net, state, source)
    net.load_state_dict(state)
    return net.eval(), folder
