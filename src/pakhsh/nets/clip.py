"""A small CLIP (Radford et al. 2021) for unCLIP: an image encoder and a text head trained together with the
symmetric contrastive (InfoNCE) loss and a learned temperature.

- Image encoder: a conv net (GroupNorm, SiLU, stride-2 stages) whose last feature map is flattened, not pooled,
  before the projection: the shapes captions name positions ("at the top left"), which a global average pool
  would throw away.
- Text encoder: the frozen offline MiniLM's token states (conditioning/text.py, cached by the trainer) read by a
  small trained transformer and mean-pooled over the real tokens, then projected. Only the head is trained.

Both towers end in the joint `embed_dim` space; `encode_image` / `encode_text` return unit vectors. The network
never sees a diffusion model: unCLIP's prior and decoder use its embeddings, scaled to norm sqrt(embed_dim) so
each coordinate has about unit variance (`scale_embedding`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import norm


@dataclass
class CLIPConfig:
    """Hyper-parameters of the small CLIP (defaults: 32x32 shapes scenes, MiniLM text)."""

    image_size: int = 32
    in_channels: int = 3
    embed_dim: int = 64  # the joint embedding width (the prior and decoder work on this)
    widths: tuple[int, ...] = (32, 64, 128)  # conv stages; each after the first halves the resolution
    num_groups: int = 8
    text_dim: int = 384  # width of the frozen text encoder's tokens (MiniLM: 384)
    text_width: int = 128  # the trained text head
    text_layers: int = 2
    text_heads: int = 4
    max_text_tokens: int = 32
    init_temperature: float = 0.07  # CLIP's initial tau; the logit scale 1/tau is learned, capped at 100

    def __post_init__(self) -> None:
        self.widths = tuple(self.widths)
        for name in ("image_size", "in_channels", "embed_dim", "text_dim", "text_width", "text_layers",
                     "text_heads", "max_text_tokens", "num_groups"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"clip.{name}={v!r}: must be an integer >= 1")
        if not self.widths or any(w < 1 for w in self.widths):
            raise ValueError(f"clip.widths={self.widths!r}: needs one or more positive widths")
        if self.image_size % self.downsample_factor:
            raise ValueError(f"clip.image_size={self.image_size} is not divisible by 2**(len(widths)-1) = "
                             f"{self.downsample_factor}")
        if self.text_width % self.text_heads:
            raise ValueError(f"clip.text_width={self.text_width} is not divisible by clip.text_heads="
                             f"{self.text_heads}")
        if not 0 < self.init_temperature < 1:
            raise ValueError(f"clip.init_temperature={self.init_temperature!r}: must be in (0, 1)")
        for w in self.widths:
            if w % min(self.num_groups, w):
                raise ValueError(f"clip.widths: {w} is not divisible by clip.num_groups={self.num_groups}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.widths) - 1)


MAX_LOGIT_SCALE = 100.0  # CLIP clips the learned 1/tau at 100


class _ConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1)
        self.norm1 = norm(cout, groups)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.norm2 = norm(cout, groups)
        self.skip = nn.Conv2d(cin, cout, 1, stride=stride) if (cin != cout or stride != 1) else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = F.silu(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        return F.silu(h + self.skip(x))


class ImageEncoder(nn.Module):
    """(B, C, H, W) in [-1, 1] -> (B, embed_dim), not normalised."""

    def __init__(self, cfg: CLIPConfig) -> None:
        super().__init__()
        self.cfg = cfg
        blocks: list[nn.Module] = []
        cin = cfg.in_channels
        for i, w in enumerate(cfg.widths):
            blocks.append(_ConvBlock(cin, w, cfg.num_groups, 1 if i == 0 else 2))
            cin = w
        self.blocks = nn.Sequential(*blocks)
        side = cfg.image_size // cfg.downsample_factor
        self.proj = nn.Linear(cin * side * side, cfg.embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        c = self.cfg
        if x.ndim != 4 or x.shape[1] != c.in_channels or x.shape[-2:] != (c.image_size, c.image_size):
            raise ValueError(f"CLIP images must be (B, {c.in_channels}, {c.image_size}, {c.image_size}), got "
                             f"{tuple(x.shape)}")
        return self.proj(self.blocks(x).flatten(1))


class TextHead(nn.Module):
    """Frozen text-encoder tokens (B, L, text_dim) + mask (B, L) -> (B, embed_dim), not normalised."""

    def __init__(self, cfg: CLIPConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.proj_in = nn.Linear(cfg.text_dim, cfg.text_width)
        self.pos = nn.Parameter(torch.zeros(1, cfg.max_text_tokens, cfg.text_width))
        layer = nn.TransformerEncoderLayer(cfg.text_width, cfg.text_heads, 2 * cfg.text_width, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, cfg.text_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.text_width)
        self.proj_out = nn.Linear(cfg.text_width, cfg.embed_dim)

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        c = self.cfg
        if tokens.ndim != 3 or tokens.shape[-1] != c.text_dim or tokens.shape[1] > c.max_text_tokens:
            raise ValueError(f"CLIP text tokens must be (B, L <= {c.max_text_tokens}, {c.text_dim}), got "
                             f"{tuple(tokens.shape)}")
        if mask.dtype != torch.bool or mask.shape != tokens.shape[:2] or not bool(mask.any(1).all()):
            raise ValueError("CLIP text mask must be (B, L) bool with at least one real token per caption")
        h = self.proj_in(tokens) + self.pos[:, : tokens.shape[1]]
        h = self.layers(h, src_key_padding_mask=~mask)
        h = self.norm(h)
        m = mask.to(h.dtype).unsqueeze(-1)
        pooled = (h * m).sum(1) / m.sum(1)
        return self.proj_out(pooled)


class CLIP(nn.Module):
    """Both towers and the learned logit scale; `forward(images, tokens, mask)` -> (image, text) unit embeddings
    and the logit scale (returned, so that a wrapped module (DDP) still hands it to the loss)."""

    def __init__(self, cfg: CLIPConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or CLIPConfig()
        self.image = ImageEncoder(self.cfg)
        self.text = TextHead(self.cfg)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / self.cfg.init_temperature)))

    @property
    def logit_scale(self) -> Tensor:
        return self.log_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    def encode_image(self, x: Tensor) -> Tensor:
        return F.normalize(self.image(x).float(), dim=-1)

    def encode_text(self, tokens: Tensor, mask: Tensor) -> Tensor:
        return F.normalize(self.text(tokens, mask).float(), dim=-1)

    def forward(self, images: Tensor, tokens: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.encode_image(images), self.encode_text(tokens, mask), self.logit_scale


def contrastive_loss(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor | float) -> Tensor:
    """CLIP's symmetric InfoNCE, per pair: (B,) = (CE(image i -> its text) + CE(text i -> its image)) / 2 over the
    scaled cosine similarities of the batch (inputs: unit vectors (B, D)); the batch mean is CLIP's loss."""
    if image_emb.shape != text_emb.shape or image_emb.ndim != 2:
        raise ValueError(f"contrastive_loss needs two (B, D) embeddings, got {tuple(image_emb.shape)} and "
                         f"{tuple(text_emb.shape)}")
    logits = logit_scale * image_emb.float() @ text_emb.float().t()  # (B, B): row i = image i against every text
    target = torch.arange(len(logits), device=logits.device)
    per_image = F.cross_entropy(logits, target, reduction="none")
    per_text = F.cross_entropy(logits.t(), target, reduction="none")
    return (per_image + per_text) / 2


def scale_embedding(emb: Tensor) -> Tensor:
    """Unit CLIP embeddings -> norm sqrt(D): about unit variance per coordinate, the scale a diffusion expects
    (DALL-E 2's prior works on embeddings scaled so)."""
    return F.normalize(emb.float(), dim=-1) * math.sqrt(emb.shape[-1])
