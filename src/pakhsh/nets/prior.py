"""unCLIP's diffusion prior (Ramesh et al. 2022, sec. 2.1): a transformer over a short token sequence that
denoises a CLIP image embedding, conditioned on the caption.

The sequence is [caption tokens (projected), CLIP text embedding, timestep, noised image embedding z_t, query];
the output at the query token is the prediction (the paper predicts the clean embedding, x_0, directly; the
diffusion config says what it is). Unlike the paper's decoder-only transformer with a causal mask, every token
sees every token here: the sequence is short and order carries nothing the positional embeddings do not.

Classifier-free guidance: a dropped caption is the empty caption's tokens and text embedding (what training
substitutes with probability `text_dropout`), so the unconditional branch is the same network on "".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .layers import timestep_embedding


@dataclass
class PriorConfig:
    """Hyper-parameters of the prior transformer."""

    embed_dim: int = 64  # the CLIP embedding width (image and text)
    text_dim: int | None = 384  # width of the caption tokens (the frozen text encoder); None: no caption tokens
    max_text_tokens: int = 32
    width: int = 256
    depth: int = 4
    heads: int = 4
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("embed_dim", "max_text_tokens", "width", "depth", "heads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"prior.{name}={v!r}: must be an integer >= 1")
        if self.text_dim is not None and self.text_dim < 1:
            raise ValueError(f"prior.text_dim={self.text_dim!r}: must be >= 1 or null")
        if self.width % self.heads:
            raise ValueError(f"prior.width={self.width} is not divisible by prior.heads={self.heads}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"prior.dropout={self.dropout!r}: must be in [0, 1)")


class DiffusionPrior(nn.Module):
    """(x_t (B, D), t (B,), text_embed (B, D), context (B, L, text_dim) | None, context_mask (B, L)) -> (B, D)."""

    def __init__(self, cfg: PriorConfig | None = None) -> None:
        super().__init__()
        self.cfg = c = cfg or PriorConfig()
        self.time_mlp = nn.Sequential(nn.Linear(c.width, c.width), nn.SiLU(), nn.Linear(c.width, c.width))
        self.text_embed_in = nn.Linear(c.embed_dim, c.width)
        self.x_in = nn.Linear(c.embed_dim, c.width)
        self.query = nn.Parameter(torch.randn(1, 1, c.width) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, 4, c.width) * 0.02)  # text embedding, time, x_t, query
        self.tokens_in = nn.Linear(c.text_dim, c.width) if c.text_dim is not None else None
        self.tokens_pos = (nn.Parameter(torch.randn(1, c.max_text_tokens, c.width) * 0.02)
                           if c.text_dim is not None else None)
        layer = nn.TransformerEncoderLayer(c.width, c.heads, 4 * c.width, dropout=c.dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, c.depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(c.width)
        self.out = nn.Linear(c.width, c.embed_dim)

    def forward(self, x: Tensor, t: Tensor | float, text_embed: Tensor, context: Tensor | None = None,
                context_mask: Tensor | None = None) -> Tensor:
        c = self.cfg
        if x.ndim != 2 or x.shape[1] != c.embed_dim:
            raise ValueError(f"the prior denoises (B, {c.embed_dim}) embeddings, got {tuple(x.shape)}")
        b = x.shape[0]
        if text_embed.shape != x.shape:
            raise ValueError(f"text_embed must be {tuple(x.shape)} like x, got {tuple(text_embed.shape)}")
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(b) if t.ndim == 0 else t
        if tuple(t.shape) != (b,):
            raise ValueError(f"t must be a scalar or ({b},) timesteps, got {tuple(t.shape)}")
        time = self.time_mlp(timestep_embedding(t, c.width).to(x.dtype))
        own = torch.stack([self.text_embed_in(text_embed.to(x.dtype)), time, self.x_in(x),
                           self.query.expand(b, -1, -1)[:, 0]], dim=1) + self.pos  # (B, 4, W)
        keep = torch.ones(b, 4, dtype=torch.bool, device=x.device)
        if self.tokens_in is not None:
            if context is None:
                raise ValueError(f"this prior reads caption tokens: context (B, L, {c.text_dim}) is needed")
            if context.ndim != 3 or context.shape[0] != b or context.shape[2] != c.text_dim \
                    or context.shape[1] > c.max_text_tokens:
                raise ValueError(f"context must be ({b}, L <= {c.max_text_tokens}, {c.text_dim}), got "
                                 f"{tuple(context.shape)}")
            if context_mask is not None and (context_mask.dtype != torch.bool
                                             or tuple(context_mask.shape) != tuple(context.shape[:2])):
                raise ValueError(f"context_mask must be {tuple(context.shape[:2])} bool like context's (B, L), got "
                                 f"{tuple(context_mask.shape)} {context_mask.dtype}")
            mask = context_mask if context_mask is not None else torch.ones(context.shape[:2], dtype=torch.bool,
                                                                            device=x.device)
            toks = self.tokens_in(context.to(x.dtype)) + self.tokens_pos[:, : context.shape[1]]
            own = torch.cat([toks, own], dim=1)
            keep = torch.cat([mask.to(x.device), keep], dim=1)
        elif context is not None or context_mask is not None:
            raise ValueError("context (or context_mask) given but this prior has no caption-token input "
                             "(prior.text_dim is null)")
        h = self.layers(own, src_key_padding_mask=~keep)
        return self.out(self.norm(h[:, -1])).to(x.dtype)
