"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022): Stable Diffusion's `AutoencoderKL`.

Images (B, C, H, W) map to a diagonal Gaussian over latents (B, latent_channels, H/f, W/f), f =
2**(len(channel_mult)-1), and latents map back to images. Latent diffusion trains its UNet on
`encode_latents(x)` (a posterior sample times `scaling_factor`, chosen so the latents have about unit variance;
0.18215 for SD 1.x) and turns its samples into images with `decode_latents`.

Structure (latent-diffusion's Encoder / Decoder, laid out as diffusers' `AutoencoderKL`):
  encoder:  conv_in -> per level `num_res_blocks` ResnetBlocks + a stride-2 downsample (all levels but the last)
            -> mid (ResnetBlock, single-head self-attention, ResnetBlock) -> GroupNorm, SiLU, conv_out to
            2 * latent_channels (mean, logvar) -> quant_conv 1x1
  decoder:  post_quant_conv 1x1 -> conv_in -> mid -> per level, deepest first, `num_res_blocks + 1` ResnetBlocks
            + nearest upsample and conv (all levels but the first) -> GroupNorm, SiLU, conv_out
Unlike the UNet there is no timestep, nothing starts at zero, and GroupNorm's eps is 1e-6 (latent-diffusion's
`Normalize`), so released weights reproduce exactly. Module names follow diffusers, so `from_diffusers_state`
only renames the attention, whose q/k/v projections are fused into one GEMM here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pakhsh.nets.layers import GroupNorm, Resample, Upsample, num_groups_for

_NORM_EPS = 1e-6  # latent-diffusion's Normalize (the UNet's norm uses 1e-5)
_LOGVAR_RANGE = (-30.0, 20.0)  # latent-diffusion's clamp: keeps exp(logvar) finite in fp32


@dataclass
class AutoencoderConfig:
    """Hyper-parameters of the KL autoencoder (defaults: Stable Diffusion's f=8 VAE, kl-f8)."""

    in_channels: int = 3  # image channels in
    out_channels: int = 3  # image channels out
    latent_channels: int = 4  # channels of the latent the diffusion model sees
    base_channels: int = 128  # width of the first (full-resolution) level
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)  # width multiplier per level; len-1 downsamplings
    num_res_blocks: int = 2  # ResnetBlocks per encoder level (the decoder has one more)
    mid_attention: bool = True  # single-head self-attention between the two middle ResnetBlocks
    dropout: float = 0.0  # inside every ResnetBlock (latent-diffusion trains its VAEs with 0)
    num_groups: int = 32  # GroupNorm groups (fewer where a width is smaller than this)
    double_z: bool = True  # encoder predicts mean and logvar; False: mean only, a deterministic posterior
    scaling_factor: float = 1.0  # latents for diffusion = posterior sample * this (SD 1.x: 0.18215)

    def __post_init__(self) -> None:
        self.channel_mult = tuple(self.channel_mult)
        validate_config(self)

    @property
    def downsample_factor(self) -> int:
        """f: latents are H/f x W/f; H and W of inputs must be multiples of it."""
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def widths(self) -> tuple[int, ...]:
        """Channels of each level, full resolution first."""
        return tuple(self.base_channels * m for m in self.channel_mult)

    @property
    def moment_channels(self) -> int:
        """Channels the encoder emits: mean and logvar stacked, or the mean alone without double_z."""
        return self.latent_channels * (2 if self.double_z else 1)


def _check(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ValueError(f"AutoencoderConfig.{field}: {message}")


def validate_config(cfg: AutoencoderConfig) -> None:
    """Raise ValueError naming the offending field when `cfg` cannot build an autoencoder."""
    for name in ("in_channels", "out_channels", "latent_channels", "base_channels", "num_res_blocks", "num_groups"):
        value = getattr(cfg, name)
        _check(isinstance(value, int) and value >= 1, name, f"must be an integer >= 1, got {value!r}")
    _check(len(cfg.channel_mult) >= 1 and all(isinstance(m, int) and m >= 1 for m in cfg.channel_mult),
           "channel_mult", f"needs one or more positive integer multipliers, got {cfg.channel_mult}")
    for name in ("mid_attention", "double_z"):
        _check(isinstance(getattr(cfg, name), bool), name, f"must be true or false, got {getattr(cfg, name)!r}")
    _check(0.0 <= cfg.dropout < 1.0, "dropout", f"must be in [0, 1), got {cfg.dropout}")
    _check(math.isfinite(cfg.scaling_factor) and cfg.scaling_factor > 0, "scaling_factor",
           f"must be a finite number > 0, got {cfg.scaling_factor}")
    for w in cfg.widths:
        _check(w % min(cfg.num_groups, w) == 0, "num_groups",
               f"{cfg.num_groups} does not divide level width {w} (base_channels * channel_mult)")


# --- the posterior --------------------------------------------------------------------------------------------
class DiagonalGaussian:
    """N(mean, exp(logvar)) independently per latent element; mean and logvar are (B, C, h, w).

    logvar is clamped to [-30, 20] as in latent-diffusion. `deterministic` makes it a point mass at the mean
    (an encoder without double_z): samples are the mean and kl / nll are zero.
    """

    def __init__(self, mean: Tensor, logvar: Tensor, deterministic: bool = False) -> None:
        if mean.shape != logvar.shape:
            raise ValueError(f"mean and logvar must have one shape, got {tuple(mean.shape)} and {tuple(logvar.shape)}")
        self.mean = mean
        self.logvar = logvar.clamp(*_LOGVAR_RANGE)
        self.deterministic = deterministic

    @classmethod
    def from_moments(cls, moments: Tensor, deterministic: bool = False) -> DiagonalGaussian:
        """(B, 2C, h, w) encoder output (mean channels first) -> the Gaussian; (B, C, h, w) when deterministic."""
        if deterministic:
            return cls(moments, torch.zeros_like(moments), deterministic=True)
        mean, logvar = moments.chunk(2, dim=1)
        return cls(mean, logvar)

    @property
    def std(self) -> Tensor:
        return torch.zeros_like(self.mean) if self.deterministic else torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> Tensor:
        return torch.zeros_like(self.mean) if self.deterministic else torch.exp(self.logvar)

    def _sum(self, x: Tensor) -> Tensor:  # (B, ...) -> (B,): latent-diffusion sums, never averages
        return x.sum(dim=tuple(range(1, x.ndim)))

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """mean + std * eps; eps is drawn on the generator's device in fp32, so a seed gives the same latents
        on CPU and GPU. (B, C, h, w) in the mean's dtype."""
        if generator is None:
            eps = torch.randn(self.mean.shape, device=self.mean.device, dtype=torch.float32)
        else:
            eps = torch.randn(self.mean.shape, generator=generator, device=generator.device, dtype=torch.float32)
        return self.mean + self.std * eps.to(device=self.mean.device, dtype=self.mean.dtype)

    def mode(self) -> Tensor:
        return self.mean

    def kl(self, other: DiagonalGaussian | None = None) -> Tensor:
        """KL(self || other) summed over all but the batch dim, (B,); `other` None means N(0, I)."""
        if self.deterministic:
            return self.mean.new_zeros(self.mean.shape[0])
        if other is None:
            return 0.5 * self._sum(self.mean.pow(2) + self.var - 1.0 - self.logvar)
        return 0.5 * self._sum((self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0
                               - self.logvar + other.logvar)

    def nll(self, sample: Tensor) -> Tensor:
        """-log N(sample; mean, var) summed over all but the batch dim, (B,)."""
        if self.deterministic:
            return self.mean.new_zeros(self.mean.shape[0])
        return 0.5 * self._sum(math.log(2.0 * math.pi) + self.logvar + (sample - self.mean).pow(2) / self.var)


# --- blocks ---------------------------------------------------------------------------------------------------
def _norm(channels: int, max_groups: int) -> GroupNorm:
    """GroupNorm in fp32 under autocast (nets/layers.py), with latent-diffusion's eps."""
    return GroupNorm(num_groups_for(channels, max_groups), channels, eps=_NORM_EPS)


class ResnetBlock(nn.Module):
    """GroupNorm, SiLU, conv, GroupNorm, SiLU, dropout, conv, plus a skip (1x1 conv where the width changes)."""

    def __init__(self, cin: int, cout: int, dropout: float, max_groups: int) -> None:
        super().__init__()
        self.norm1 = _norm(cin, max_groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(cout, max_groups)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: Tensor) -> Tensor:  # (B, C_in, H, W) -> (B, C_out, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class Attention(nn.Module):
    """Residual single-head self-attention over the H*W positions (latent-diffusion's AttnBlock), with biases."""

    def __init__(self, channels: int, max_groups: int) -> None:
        super().__init__()
        self.group_norm = _norm(channels, max_groups)
        self.qkv = nn.Linear(channels, 3 * channels)  # q, k, v stacked: one GEMM instead of three
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, C, H, W)
        b, c, h, w = x.shape
        # (B, C, H, W) -> (B, HW, C). For a channels_last input this permute+reshape is a free view.
        tokens = self.group_norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c)
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)  # 3 x (B, HW, C); one head, so scale = C**-0.5
        out = self.proj_out(F.scaled_dot_product_attention(q, k, v))  # (B, HW, C)
        return x + out.view(b, h, w, c).permute(0, 3, 1, 2)  # a channels_last view: no copy


class Downsample(nn.Module):
    """Halve H and W: pad one zero row and column at the bottom and right, then a 3x3 stride-2 conv, unpadded.

    latent-diffusion's asymmetric padding, not layers.Downsample's symmetric one: the two put the kernel on
    grids half a pixel apart, and released weights were trained with this one.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, C, H/2, W/2)
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class LevelBlock(nn.Module):
    """One resolution level: ResnetBlocks, then an optional resampler (diffusers' Down/UpDecoderBlock2D).

    The resampler sits in a list of zero or one named like diffusers' (`downsamplers.0.conv`) so its keys load as
    they are; the unused list stays empty and has no keys.
    """

    def __init__(
        self, cin: int, cout: int, num_blocks: int, resample: Resample, dropout: float, max_groups: int
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(cin if i == 0 else cout, cout, dropout, max_groups)
                                     for i in range(num_blocks))
        self.downsamplers = nn.ModuleList([Downsample(cout)] if resample == "down" else [])
        self.upsamplers = nn.ModuleList([Upsample(cout)] if resample == "up" else [])

    def forward(self, x: Tensor) -> Tensor:  # (B, C_in, H, W) -> (B, C_out, H', W')
        for block in self.resnets:
            x = block(x)
        for resample in (*self.downsamplers, *self.upsamplers):
            x = resample(x)
        return x


class MidBlock(nn.Module):
    """ResnetBlock, self-attention (optional), ResnetBlock at the deepest level's width."""

    def __init__(self, channels: int, attention: bool, dropout: float, max_groups: int) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(channels, channels, dropout, max_groups) for _ in range(2))
        self.attentions = nn.ModuleList([Attention(channels, max_groups)] if attention else [])

    def forward(self, x: Tensor) -> Tensor:  # (B, C, h, w) -> (B, C, h, w)
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    """(B, in_channels, H, W) -> (B, moment_channels, H/f, W/f), before quant_conv."""

    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        widths, last = cfg.widths, len(cfg.widths) - 1
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        cins = (widths[0], *widths[:-1])
        self.down_blocks = nn.ModuleList(
            LevelBlock(cin, w, cfg.num_res_blocks, "down" if i < last else "none", cfg.dropout, cfg.num_groups)
            for i, (cin, w) in enumerate(zip(cins, widths)))
        self.mid_block = MidBlock(widths[-1], cfg.mid_attention, cfg.dropout, cfg.num_groups)
        self.conv_norm_out = _norm(widths[-1], cfg.num_groups)
        self.conv_out = nn.Conv2d(widths[-1], cfg.moment_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for block in self.down_blocks:
            h = block(h)
        h = self.mid_block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class Decoder(nn.Module):
    """(B, latent_channels, h, w) after post_quant_conv -> (B, out_channels, h*f, w*f)."""

    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        widths, last = tuple(reversed(cfg.widths)), len(cfg.widths) - 1  # deepest level first, as diffusers
        self.conv_in = nn.Conv2d(cfg.latent_channels, widths[0], 3, padding=1)
        self.mid_block = MidBlock(widths[0], cfg.mid_attention, cfg.dropout, cfg.num_groups)
        cins = (widths[0], *widths[:-1])
        self.up_blocks = nn.ModuleList(
            LevelBlock(cin, w, cfg.num_res_blocks + 1, "up" if i < last else "none", cfg.dropout, cfg.num_groups)
            for i, (cin, w) in enumerate(zip(cins, widths)))
        self.conv_norm_out = _norm(widths[-1], cfg.num_groups)
        self.conv_out = nn.Conv2d(widths[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


# --- the model ------------------------------------------------------------------------------------------------
class AutoencoderKL(nn.Module):
    """KL autoencoder: encode (B, C_in, H, W) -> DiagonalGaussian over (B, latent, H/f, W/f); decode back."""

    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        validate_config(cfg)  # again: the dataclass may have been mutated after construction
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(cfg.moment_channels, cfg.moment_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    def _check(self, x: Tensor, channels: int, name: str, what: str, factor: int) -> None:
        if x.ndim != 4 or x.shape[1] != channels:
            raise ValueError(f"{name} must be (B, {channels}, H, W) ({what}), got {tuple(x.shape)}")
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"{name}: H and W must be divisible by {factor} (2**(len(channel_mult)-1)), "
                             f"got {x.shape[2]}x{x.shape[3]}")

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """x: (B, in_channels, H, W) images in [-1, 1] -> posterior over (B, latent_channels, H/f, W/f),
        its tensors in x's dtype whatever autocast computed in."""
        self._check(x, self.cfg.in_channels, "x", "images", self.cfg.downsample_factor)
        # Activations run channels_last, as in the UNet: convs skip layout reorders, attention views are free.
        h = self.encoder(x.contiguous(memory_format=torch.channels_last))
        moments = self.quant_conv(h).to(x.dtype).contiguous()  # exp(logvar) is taken in the caller's dtype
        return DiagonalGaussian.from_moments(moments, deterministic=not self.cfg.double_z)

    def decode(self, z: Tensor) -> Tensor:
        """z: (B, latent_channels, h, w) unscaled latents -> (B, out_channels, h*f, w*f) in z's dtype."""
        self._check(z, self.cfg.latent_channels, "z", "latents", 1)
        h = self.post_quant_conv(z.contiguous(memory_format=torch.channels_last))
        # Autocast leaves bf16/fp16; hand back the caller's dtype so losses and pixels stay in fp32.
        return self.decoder(h).to(z.dtype).contiguous()

    def forward(
        self, x: Tensor, sample: bool = True, generator: torch.Generator | None = None
    ) -> tuple[Tensor, DiagonalGaussian]:
        """x: (B, C_in, H, W) -> (reconstruction (B, C_out, H, W), posterior); decodes a sample or the mean."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self.decode(z), posterior

    def encode_latents(self, x: Tensor, generator: torch.Generator | None = None, sample: bool = True) -> Tensor:
        """Images -> the latents diffusion works on: a posterior sample (or its mean) times scaling_factor."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return z * self.cfg.scaling_factor

    def decode_latents(self, z: Tensor) -> Tensor:
        """Diffusion latents (scaled) -> images: decode(z / scaling_factor)."""
        return self.decode(z / self.cfg.scaling_factor)


class IdentityAutoencoder(nn.Module):
    """f = 1, no weights: latents are the pixels (times scaling_factor). It puts pixel-space diffusion (the LDM
    paper's "LDM-1") through the same latent training, pipeline and conditions, for the f-comparison."""

    def __init__(self, cfg: AutoencoderConfig) -> None:
        super().__init__()
        if cfg.downsample_factor != 1 or cfg.latent_channels != cfg.in_channels or cfg.double_z:
            raise ValueError("IdentityAutoencoder needs channel_mult=(1,), latent_channels == in_channels and "
                             "double_z=false")
        self.cfg = cfg

    @classmethod
    def for_channels(cls, channels: int = 3) -> "IdentityAutoencoder":
        return cls(AutoencoderConfig(in_channels=channels, out_channels=channels, latent_channels=channels,
                                     base_channels=1, channel_mult=(1,), num_groups=1, double_z=False,
                                     mid_attention=False))

    def encode(self, x: Tensor) -> DiagonalGaussian:
        return DiagonalGaussian.from_moments(x, deterministic=True)

    def decode(self, z: Tensor) -> Tensor:
        return z

    def forward(self, x: Tensor, sample: bool = True, generator: torch.Generator | None = None
                ) -> tuple[Tensor, DiagonalGaussian]:
        return x, self.encode(x)

    def encode_latents(self, x: Tensor, generator: torch.Generator | None = None, sample: bool = True) -> Tensor:
        return x * self.cfg.scaling_factor

    def decode_latents(self, z: Tensor) -> Tensor:
        return z / self.cfg.scaling_factor


IDENTITY = "identity"  # latent.autoencoder value for pixel-space latent models (IdentityAutoencoder)


def build_autoencoder(cfg: AutoencoderConfig, spec: str | None = None) -> nn.Module:
    """The autoencoder a latent model's config describes: the identity for latent.autoencoder=identity."""
    return IdentityAutoencoder(cfg) if spec == IDENTITY else AutoencoderKL(cfg)


# --- diffusers interop ----------------------------------------------------------------------------------------
_RESNET = r"resnets\.\d+\.(?:norm1|conv1|norm2|conv2|conv_shortcut)"
_SAME_KEY = re.compile(
    r"(?:(?:encoder|decoder)\.(?:conv_in|conv_norm_out|conv_out)|quant_conv|post_quant_conv"
    rf"|encoder\.down_blocks\.\d+\.(?:{_RESNET}|downsamplers\.0\.conv)"
    rf"|decoder\.up_blocks\.\d+\.(?:{_RESNET}|upsamplers\.0\.conv)"
    rf"|(?:encoder|decoder)\.mid_block\.(?:{_RESNET}|attentions\.0\.group_norm))\.(?:weight|bias)"
)
# diffusers' names for the attention projections; checkpoints from before diffusers 0.14 use the second set.
_ATTN_PARTS = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "out",
               "query": "q", "key": "k", "value": "v", "proj_attn": "out"}
_ATTN_KEY = re.compile(r"((?:encoder|decoder)\.mid_block\.attentions\.0)\.(to_q|to_k|to_v|to_out\.0|query|key|value"
                       r"|proj_attn)\.(weight|bias)")
_OUR_ATTN_KEY = re.compile(r"((?:encoder|decoder)\.mid_block\.attentions\.0)\.(qkv|proj_out)\.(weight|bias)")


def _linear(value: Tensor) -> Tensor:
    """latent-diffusion's attention projections are 1x1 convs, (C, C, 1, 1); ours are Linear, (C, C)."""
    return value[:, :, 0, 0] if value.ndim == 4 else value


def from_diffusers_state(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """A diffusers `AutoencoderKL` state dict -> ours (load it with `load_state_dict(..., strict=True)`).

    Everything but the middle attentions keeps its name; their to_q/to_k/to_v (or the older query/key/value)
    are stacked into `qkv` and to_out.0 (proj_attn) becomes `proj_out`. Unknown keys and incomplete q/k/v sets
    raise ValueError naming the key.
    """
    out: dict[str, Tensor] = {}
    pending: dict[tuple[str, str], dict[str, Tensor]] = {}  # (attention, weight|bias) -> q/k/v pieces
    for key, value in sd.items():
        if _SAME_KEY.fullmatch(key):
            ours = key
        elif m := _ATTN_KEY.fullmatch(key):
            prefix, part, kind = m.group(1), _ATTN_PARTS[m.group(2)], m.group(3)
            value = _linear(value) if kind == "weight" else value
            if part != "out":
                pieces = pending.setdefault((prefix, kind), {})
                if part in pieces:
                    raise ValueError(f"duplicate key {key!r} in a diffusers AutoencoderKL state dict")
                pieces[part] = value
                continue
            ours = f"{prefix}.proj_out.{kind}"
        else:
            raise ValueError(f"unexpected key {key!r} in a diffusers AutoencoderKL state dict")
        if ours in out:
            raise ValueError(f"duplicate key {key!r} in a diffusers AutoencoderKL state dict")
        out[ours] = value
    for (prefix, kind), pieces in pending.items():
        for part, name in (("q", "to_q"), ("k", "to_k"), ("v", "to_v")):
            if part not in pieces:
                raise ValueError(f"missing key '{prefix}.{name}.{kind}' in a diffusers AutoencoderKL state dict")
        out[f"{prefix}.qkv.{kind}"] = torch.cat([pieces["q"], pieces["k"], pieces["v"]], dim=0)
    return out


def to_diffusers_state(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of `from_diffusers_state`: our AutoencoderKL state dict -> diffusers keys (current names)."""
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if _SAME_KEY.fullmatch(key):
            out[key] = value
        elif m := _OUR_ATTN_KEY.fullmatch(key):
            prefix, module, kind = m.groups()
            if module == "proj_out":
                out[f"{prefix}.to_out.0.{kind}"] = value
                continue
            for name, chunk in zip(("to_q", "to_k", "to_v"), value.chunk(3, dim=0)):
                out[f"{prefix}.{name}.{kind}"] = chunk.clone()  # own storage: safetensors-safe
        else:
            raise ValueError(f"unexpected key {key!r} in an AutoencoderKL state dict")
    return out


# diffusers' AutoencoderKL defaults: a config.json leaves out what equals them (old SD 1.x ones lack scaling_factor).
_DIFFUSERS_DEFAULTS = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"], "block_out_channels": [64], "layers_per_block": 1, "act_fn": "silu",
    "latent_channels": 4, "norm_num_groups": 32, "scaling_factor": 0.18215, "shift_factor": None,
    "latents_mean": None, "latents_std": None, "use_quant_conv": True, "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}
# Keys that do not change the network: bookkeeping, the training resolution and a half-precision hint (we keep
# GroupNorm in fp32 and run bf16, which does not overflow where SDXL's VAE does in fp16).
_DIFFUSERS_IGNORED = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values", "sample_size",
                      "force_upcast"}


def config_from_diffusers(config: dict) -> AutoencoderConfig:
    """A diffusers `AutoencoderKL` config (its config.json as a dict) -> AutoencoderConfig.

    Keys diffusers would default are defaulted the same way. Anything we cannot build (other block types or
    activations, a latent shift or per-channel statistics, no quant convs, widths that are not multiples of the
    first) or do not know raises ValueError naming the key.
    """
    unknown = sorted(k for k in config if k not in _DIFFUSERS_DEFAULTS and k not in _DIFFUSERS_IGNORED)
    if unknown:
        raise ValueError(f"unknown key(s) in a diffusers AutoencoderKL config: {', '.join(unknown)}")
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise ValueError(f"_class_name={config['_class_name']!r} is not AutoencoderKL")
    c = {**_DIFFUSERS_DEFAULTS, **config}
    widths = [int(w) for w in c["block_out_channels"]]
    for key, want in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        if list(c[key]) != [want] * len(widths):
            raise ValueError(f"{key}={c[key]!r} is not supported; need {want!r} once per block_out_channels entry")
    refusals = (("act_fn", "silu"), ("shift_factor", None), ("latents_mean", None), ("latents_std", None),
                ("use_quant_conv", True), ("use_post_quant_conv", True))
    for key, ok in refusals:
        if c[key] != ok:
            raise ValueError(f"{key}={c[key]!r} is not supported (only {ok!r})")
    if not widths or any(w % widths[0] for w in widths):
        raise ValueError(f"block_out_channels={widths} must be multiples of its first entry")
    return AutoencoderConfig(
        in_channels=int(c["in_channels"]), out_channels=int(c["out_channels"]),
        latent_channels=int(c["latent_channels"]), base_channels=widths[0],
        channel_mult=tuple(w // widths[0] for w in widths), num_res_blocks=int(c["layers_per_block"]),
        mid_attention=bool(c["mid_block_add_attention"]), num_groups=int(c["norm_num_groups"]),
        scaling_factor=float(c["scaling_factor"]),
    )


def config_to_diffusers(cfg: AutoencoderConfig) -> dict:
    """AutoencoderConfig -> diffusers `AutoencoderKL` keyword arguments (and config.json contents)."""
    if not cfg.double_z:
        raise ValueError("AutoencoderConfig.double_z: diffusers' AutoencoderKL always predicts mean and logvar")
    n = len(cfg.channel_mult)
    return {
        "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": list(cfg.widths), "layers_per_block": cfg.num_res_blocks, "act_fn": "silu",
        "latent_channels": cfg.latent_channels, "norm_num_groups": cfg.num_groups,
        "scaling_factor": cfg.scaling_factor, "mid_block_add_attention": cfg.mid_attention,
    }


def autoencoder_from_diffusers(config: dict, sd: dict[str, Tensor]) -> AutoencoderKL:
    """Build our AutoencoderKL from a diffusers config dict and state dict (strict: every weight must fit)."""
    model = AutoencoderKL(config_from_diffusers(config))
    model.load_state_dict(from_diffusers_state(sd), strict=True)
    return model
