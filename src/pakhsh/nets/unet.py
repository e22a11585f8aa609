"""The ADM UNet of Improved DDPM (Nichol & Dhariwal 2021), as a plain `model(x, t, y=None)` network.

Structure (improved-diffusion's `UNetModel`): conv_in -> per level `num_res_blocks` ResBlocks (+ attention at the
chosen resolutions) and a downsample -> middle (ResBlock, attention, ResBlock) -> mirrored decoder with
`num_res_blocks + 1` ResBlocks per level fed by skip connections -> GroupNorm, SiLU, zero-initialised conv_out.

The network knows nothing about diffusion: `t` is just a number embedded sinusoidally, `y` an optional label,
`concat` optional condition channels stacked onto the input (Palette's degraded image and mask), `context`
optional condition tokens (text) read by cross-attention: with `context_dim` set, every attention block is a
latent-diffusion `SpatialTransformer` instead (Stable Diffusion's UNet). With `layout_classes` set too, `boxes` and
`box_labels` become layout tokens (`pakhsh.nets.layout.LayoutEncoder`) appended after the text tokens, so the same
cross-attention reads both (latent diffusion's layout-to-image); a layout-only model takes no `context` at all.
Label `num_classes` is the *null class* (unconditional), the slot classifier-free guidance drops labels to.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pakhsh.nets.attention import AttentionBlock, resolve_heads
from pakhsh.nets.layout import LayoutEncoder
from pakhsh.nets.layers import Downsample, ResBlock, Resample, Upsample, norm, timestep_embedding, zero_module
from pakhsh.nets.transformer import SpatialTransformer


@dataclass
class UNetConfig:
    """Hyper-parameters of the ADM UNet (defaults: the Improved DDPM CIFAR-10 model)."""

    image_size: int = 32  # training resolution; any H, W divisible by the total downsampling also work
    in_channels: int = 3  # x_t channels
    cond_channels: int = 0  # condition channels concatenated to x_t (Palette: degraded image + mask = 4)
    model_channels: int = 128  # width of the first level
    out_channels: int = 3  # predicted channels; doubled when learn_sigma
    num_res_blocks: int = 3  # ResBlocks per encoder level (decoder has one more)
    attention_resolutions: tuple[int, ...] = (16, 8)  # spatial sizes (at image_size) that get self-attention
    channel_mult: tuple[int, ...] = (1, 2, 2, 2)  # width multiplier per level; len-1 downsamplings
    dropout: float = 0.1
    num_classes: int | None = None  # class-conditional if set; label == num_classes means "no label"
    learn_sigma: bool = False  # also output the variance interpolation v (Improved DDPM eq. 15)
    num_heads: int = 4  # heads per attention block, used when num_head_channels == -1
    num_head_channels: int = -1  # fixed width per head instead of a fixed head count (-1 = use num_heads)
    use_scale_shift_norm: bool = True  # inject the embedding as (1+scale)*norm(h)+shift (ADM) vs add (DDPM)
    resblock_updown: bool = False  # resample with ResBlocks (BigGAN style) instead of plain convs
    use_checkpoint: bool = False  # gradient checkpointing: recompute blocks in backward to save memory
    num_groups: int = 32  # GroupNorm groups (fewer where a width is smaller than this)
    context_dim: int | None = None  # width of cross-attention condition tokens; None = self-attention only (ADM)
    transformer_depth: int = 1  # transformer blocks per SpatialTransformer (only with context_dim)
    use_linear_projection: bool = False  # SpatialTransformer proj_in/out as Linear (SD 2.x) vs 1x1 conv (SD 1.x)
    layout_classes: int | None = None  # object classes of layout (box) tokens; needs context_dim; None = no layout
    layout_max_objects: int = 8  # most boxes per image the layout input may hold (only with layout_classes)
    # unCLIP's decoder: width of a CLIP image embedding added to the timestep embedding and (embed_tokens > 0)
    # turned into that many extra cross-attention tokens (needs context_dim); None = no embedding input
    embed_dim: int | None = None
    embed_tokens: int = 4

    def __post_init__(self) -> None:
        self.attention_resolutions = tuple(self.attention_resolutions)
        self.channel_mult = tuple(self.channel_mult)
        validate_config(self)

    @property
    def out_dim(self) -> int:
        """Channels the network outputs: out_channels, doubled for the learned variance."""
        return self.out_channels * (2 if self.learn_sigma else 1)

    @property
    def downsample_factor(self) -> int:
        """H and W of inputs must be multiples of this."""
        return 2 ** (len(self.channel_mult) - 1)


def _check(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ValueError(f"UNetConfig.{field}: {message}")


def validate_config(cfg: UNetConfig) -> None:
    """Raise ValueError naming the offending field when `cfg` cannot build a UNet."""
    for name in ("image_size", "in_channels", "model_channels", "out_channels", "num_res_blocks", "num_groups"):
        _check(getattr(cfg, name) >= 1, name, f"must be >= 1, got {getattr(cfg, name)}")
    _check(cfg.cond_channels >= 0, "cond_channels", f"must be >= 0, got {cfg.cond_channels}")
    _check(len(cfg.channel_mult) >= 1 and all(m >= 1 for m in cfg.channel_mult), "channel_mult",
           f"needs one or more positive multipliers, got {cfg.channel_mult}")
    _check(cfg.image_size % cfg.downsample_factor == 0, "image_size",
           f"{cfg.image_size} is not divisible by 2**(len(channel_mult)-1) = {cfg.downsample_factor}")
    _check(0.0 <= cfg.dropout < 1.0, "dropout", f"must be in [0, 1), got {cfg.dropout}")
    _check(cfg.num_classes is None or cfg.num_classes >= 1, "num_classes",
           f"must be None or >= 1, got {cfg.num_classes}")
    _check(cfg.context_dim is None or cfg.context_dim >= 1, "context_dim",
           f"must be None or >= 1, got {cfg.context_dim}")
    _check(cfg.transformer_depth >= 1, "transformer_depth", f"must be >= 1, got {cfg.transformer_depth}")
    _check(cfg.layout_classes is None or cfg.layout_classes >= 1, "layout_classes",
           f"must be None or >= 1, got {cfg.layout_classes}")
    _check(cfg.layout_classes is None or cfg.context_dim is not None, "layout_classes",
           "needs context_dim (layout tokens are read by cross-attention); set context_dim, e.g. 256")
    _check(cfg.layout_max_objects >= 1, "layout_max_objects", f"must be >= 1, got {cfg.layout_max_objects}")
    _check(cfg.embed_dim is None or cfg.embed_dim >= 1, "embed_dim", f"must be None or >= 1, got {cfg.embed_dim}")
    _check(cfg.embed_tokens >= 0, "embed_tokens", f"must be >= 0, got {cfg.embed_tokens}")
    _check(cfg.embed_dim is None or cfg.embed_tokens == 0 or cfg.context_dim is not None, "embed_tokens",
           "needs context_dim (embedding tokens are read by cross-attention); set context_dim or embed_tokens=0")
    reachable = [cfg.image_size // 2**i for i in range(len(cfg.channel_mult))]
    for r in cfg.attention_resolutions:
        _check(r in reachable, "attention_resolutions", f"{r} is not a level resolution; levels are {reachable}")
    widths = [cfg.model_channels * m for m in cfg.channel_mult]
    for w in widths:
        g = min(cfg.num_groups, w)
        _check(w % g == 0, "model_channels",
               f"level width {w} (model_channels * channel_mult) is not divisible by num_groups={cfg.num_groups}")
    _check(cfg.num_head_channels == -1 or cfg.num_head_channels >= 1, "num_head_channels",
           f"must be -1 (use num_heads) or >= 1, got {cfg.num_head_channels}")
    _check(cfg.num_head_channels != -1 or cfg.num_heads >= 1, "num_heads", f"must be >= 1, got {cfg.num_heads}")
    attn_widths = {widths[-1]} | {w for w, r in zip(widths, reachable) if r in cfg.attention_resolutions}
    field = "num_head_channels" if cfg.num_head_channels > 0 else "num_heads"
    for w in sorted(attn_widths):
        try:
            resolve_heads(w, cfg.num_heads, cfg.num_head_channels)
        except ValueError as e:
            raise ValueError(f"UNetConfig.{field}: {e}") from None


class EmbedSequential(nn.ModuleList):
    """A sequence of layers where ResBlocks also receive the embedding and SpatialTransformers the context."""

    def forward(
        self, x: Tensor, emb_act: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None
    ) -> Tensor:  # (B, C, H, W) -> (B, C', H', W')
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb_act)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, context_mask)
            else:
                x = layer(x)
        return x


class UNet(nn.Module):
    """ADM UNet: (x (B, C_in, H, W), t (B,), y (B,) | None, context (B, L, D) | None, boxes (B, N, 4) | None,
    box_labels (B, N) | None) -> (B, out_dim, H, W)."""

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        validate_config(cfg)  # again: the dataclass may have been mutated after construction
        self.cfg = cfg
        mc, emb_dim = cfg.model_channels, 4 * cfg.model_channels
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        # One extra row: index num_classes is the learned "null" label for classifier-free guidance.
        self.label_emb = nn.Embedding(cfg.num_classes + 1, emb_dim) if cfg.num_classes is not None else None
        self.conv_in = nn.Conv2d(cfg.in_channels + cfg.cond_channels, mc, 3, padding=1)
        self.down, skip_widths, ch = self._build_encoder()
        self.middle = EmbedSequential([self._res(ch, ch), self._attn(ch), self._res(ch, ch)])
        self.up, ch = self._build_decoder(skip_widths, ch)
        self.norm_out = norm(ch, cfg.num_groups)
        self.conv_out = zero_module(nn.Conv2d(ch, cfg.out_dim, 3, padding=1))
        # Built last, and only when asked for: models without layout keep their state-dict keys and initial weights.
        if cfg.layout_classes is not None:
            self.layout = LayoutEncoder(cfg.layout_classes, cfg.context_dim, cfg.layout_max_objects)
        else:
            self.layout = None
        if cfg.embed_dim is not None:  # unCLIP decoder: the CLIP image embedding as time-embedding shift + tokens
            self.image_embed_proj = nn.Linear(cfg.embed_dim, emb_dim)
            self.image_embed_tokens = (nn.Linear(cfg.embed_dim, cfg.embed_tokens * cfg.context_dim)
                                       if cfg.embed_tokens else None)

    # --- construction -------------------------------------------------------------------------------------
    def _res(self, cin: int, cout: int, resample: Resample = "none") -> ResBlock:
        c = self.cfg
        return ResBlock(cin, 4 * c.model_channels, cout, c.dropout, c.use_scale_shift_norm, resample,
                        c.use_checkpoint, c.num_groups)

    def _attn(self, ch: int) -> AttentionBlock | SpatialTransformer:
        c = self.cfg
        heads = resolve_heads(ch, c.num_heads, c.num_head_channels)
        if c.context_dim is None:
            return AttentionBlock(ch, heads, c.use_checkpoint, c.num_groups)
        return SpatialTransformer(ch, heads, c.context_dim, c.transformer_depth, c.use_linear_projection,
                                  c.use_checkpoint, c.num_groups)

    def _build_encoder(self) -> tuple[nn.ModuleList, list[int], int]:
        """Encoder blocks, the width of every skip they emit (conv_in's first), and the final width."""
        c = self.cfg
        blocks, ch, res = nn.ModuleList(), c.model_channels, c.image_size
        skips = [ch]
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                layers: list[nn.Module] = [self._res(ch, mult * c.model_channels)]
                ch = mult * c.model_channels
                if res in c.attention_resolutions:
                    layers.append(self._attn(ch))
                blocks.append(EmbedSequential(layers))
                skips.append(ch)
            if level != len(c.channel_mult) - 1:
                down = self._res(ch, ch, "down") if c.resblock_updown else Downsample(ch)
                blocks.append(EmbedSequential([down]))
                skips.append(ch)
                res //= 2
        return blocks, skips, ch

    def _build_decoder(self, skips: list[int], ch: int) -> tuple[nn.ModuleList, int]:
        """Decoder blocks; each consumes one skip (popped in reverse); returns them and the final width."""
        c = self.cfg
        blocks, skips = nn.ModuleList(), list(skips)
        res = c.image_size // c.downsample_factor
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for i in range(c.num_res_blocks + 1):
                layers: list[nn.Module] = [self._res(ch + skips.pop(), mult * c.model_channels)]
                ch = mult * c.model_channels
                if res in c.attention_resolutions:
                    layers.append(self._attn(ch))
                if level and i == c.num_res_blocks:
                    layers.append(self._res(ch, ch, "up") if c.resblock_updown else Upsample(ch))
                    res *= 2
                blocks.append(EmbedSequential(layers))
        return blocks, ch

    # --- forward ------------------------------------------------------------------------------------------
    def _check_concat(self, x: Tensor, concat: Tensor) -> Tensor:
        c = self.cfg
        if c.cond_channels == 0:
            raise ValueError("concat (condition channels) given but UNetConfig.cond_channels is 0")
        want = (x.shape[0], c.cond_channels, *x.shape[2:])
        if tuple(concat.shape) != want:
            raise ValueError(f"concat must be {want} (B, cond_channels, H, W), got {tuple(concat.shape)}")
        return concat.to(x.dtype)

    def _check_context(
        self, x: Tensor, context: Tensor | None, context_mask: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None]:
        """Validate the cross-attention inputs; returns context in x's dtype and the mask (or None)."""
        c, b = self.cfg, x.shape[0]
        if c.context_dim is None:
            if context is not None or context_mask is not None:
                raise ValueError("context given but UNetConfig.context_dim is None (this UNet has no cross-attention)")
            return None, None
        want = f"({b}, L, {c.context_dim}) (B, L, context_dim)"
        if context is None:
            raise ValueError(f"this UNet cross-attends to context {want} (context=...); none given")
        if context.ndim != 3 or context.shape[0] != b or context.shape[2] != c.context_dim or context.shape[1] < 1:
            raise ValueError(f"context must be {want}, got {tuple(context.shape)}")
        if context_mask is not None:
            shape = (b, context.shape[1])
            if context_mask.shape != shape or context_mask.dtype != torch.bool:
                raise ValueError(f"context_mask must be bool {shape} (B, L), got {context_mask.dtype} "
                                 f"{tuple(context_mask.shape)}")
            # A row with no real token would make the cross-attention softmax 0/0 (NaN).
            if not bool(context_mask.any(dim=1).all()):
                raise ValueError("context_mask must keep at least one token (True) per sample")
        return context.to(x.dtype), context_mask

    def _layout_context(
        self, x: Tensor, context: Tensor | None, context_mask: Tensor | None, boxes: Tensor | None,
        box_labels: Tensor | None,
    ) -> tuple[Tensor | None, Tensor | None]:
        """Text context (checked as `_check_context` does) followed by the layout tokens, and their joint mask.

        Without layout_classes, boxes are refused and the text context passes through unchanged. With it, the text
        part is optional (a layout-only model) and missing boxes mean "no objects": the null token alone.
        """
        if self.layout is None:
            if boxes is not None or box_labels is not None:
                raise ValueError("boxes/box_labels given but UNetConfig.layout_classes is None (this UNet has no "
                                 "layout input)")
            return self._check_context(x, context, context_mask)
        b = x.shape[0]
        if (boxes is None) != (box_labels is None):
            given, missing = ("boxes", "box_labels") if boxes is not None else ("box_labels", "boxes")
            raise ValueError(f"{given} given without {missing}; pass both (B, N, 4) boxes and (B, N) box_labels")
        if boxes is None:  # no layout: every image gets only the null token (the classifier-free-guidance null)
            boxes = x.new_zeros(b, 0, 4)
            box_labels = torch.zeros(b, 0, dtype=torch.long, device=x.device)
        if not isinstance(boxes, Tensor) or boxes.ndim != 3 or boxes.shape[0] != b:
            got = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
            raise ValueError(f"boxes must be ({b}, N, 4) (B, N, 4), got {got}")
        if isinstance(box_labels, Tensor):
            box_labels = box_labels.to(x.device)
        tokens, mask = self.layout(boxes.to(x.device), box_labels)  # (B, N+1, D), (B, N+1); checks the rest
        if context is None:
            if context_mask is not None:
                raise ValueError("context_mask given without context")
            return tokens.to(x.dtype), mask
        context, context_mask = self._check_context(x, context, context_mask)
        if context_mask is None:  # text without a mask: every text token is real
            context_mask = torch.ones(context.shape[:2], dtype=torch.bool, device=context.device)
        return torch.cat([context, tokens.to(context.dtype)], dim=1), torch.cat([context_mask, mask], dim=1)

    def _check_image_embed(self, x: Tensor, image_embed: Tensor | None) -> Tensor | None:
        """(B, embed_dim) in x's dtype (zeros when None) for an embedding-conditioned UNet; None for others."""
        c, b = self.cfg, x.shape[0]
        if c.embed_dim is None:
            if image_embed is not None:
                raise ValueError("image_embed given but UNetConfig.embed_dim is None (this UNet takes no embedding)")
            return None
        if image_embed is None:
            return x.new_zeros(b, c.embed_dim)
        if image_embed.shape != (b, c.embed_dim):
            raise ValueError(f"image_embed must be ({b}, {c.embed_dim}) (B, embed_dim), got {tuple(image_embed.shape)}")
        return image_embed.to(x.device, x.dtype)

    def _embed_context(
        self, x: Tensor, context: Tensor | None, context_mask: Tensor | None, boxes: Tensor | None,
        box_labels: Tensor | None, image_embed: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """Text (and layout) context followed by the image embedding's `embed_tokens` tokens; the text part is
        optional (a decoder conditioned on the embedding alone)."""
        c, b = self.cfg, x.shape[0]
        assert self.image_embed_tokens is not None and c.context_dim is not None
        tokens = self.image_embed_tokens(image_embed).reshape(b, c.embed_tokens, c.context_dim).to(x.dtype)
        mask = torch.ones(b, c.embed_tokens, dtype=torch.bool, device=x.device)
        if context is None and boxes is None and box_labels is None and self.layout is None:
            if context_mask is not None:
                raise ValueError("context_mask given without context")
            return tokens, mask
        context, context_mask = self._layout_context(x, context, context_mask, boxes, box_labels)
        assert context is not None
        if context_mask is None:
            context_mask = torch.ones(context.shape[:2], dtype=torch.bool, device=x.device)
        return torch.cat([context, tokens], dim=1), torch.cat([context_mask, mask], dim=1)

    def _check_inputs(self, x: Tensor, t: Tensor | float, y: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Validate shapes at the boundary; returns t as (B,) and y as (B,) labels (null class if None)."""
        c = self.cfg
        if x.ndim != 4 or x.shape[1] != c.in_channels:
            raise ValueError(f"x must be (B, {c.in_channels}, H, W), got {tuple(x.shape)}")
        b, _, h, w = x.shape
        f = c.downsample_factor
        if h % f or w % f:
            raise ValueError(f"H and W must be divisible by {f} (2**(len(channel_mult)-1)), got {h}x{w}")
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(b)
        if t.shape != (b,):
            raise ValueError(f"t must be (B,) = ({b},) or a scalar, got {tuple(t.shape)}")
        if c.num_classes is None:
            if y is not None:
                raise ValueError("y (class labels) given but UNetConfig.num_classes is None")
            return t, None
        if y is None:  # no labels: everyone gets the null class (unconditional)
            return t, torch.full((b,), c.num_classes, dtype=torch.long, device=x.device)
        if y.shape != (b,) or y.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"y must be integer labels of shape ({b},), got {y.dtype} {tuple(y.shape)}")
        if bool((y < 0).any() | (y > c.num_classes).any()):
            raise ValueError(f"y must be in [0, {c.num_classes}] ({c.num_classes} = null class)")
        return t, y

    def embed(self, t: Tensor, y: Tensor | None) -> Tensor:
        """Timestep (+ label) embedding: (B,), (B,) -> (B, 4 * model_channels)."""
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels))
        if self.label_emb is not None and y is not None:
            emb = emb + self.label_emb(y).to(emb.dtype)
        return emb

    def forward(
        self,
        x: Tensor,
        t: Tensor | float,
        y: Tensor | None = None,
        concat: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        boxes: Tensor | None = None,
        box_labels: Tensor | None = None,
        image_embed: Tensor | None = None,
    ) -> Tensor:
        """x: (B, C_in, H, W), t: (B,) timesteps, y: (B,) labels or None, concat: (B, cond_channels, H, W) or None,
        context: (B, L, context_dim) condition tokens (required iff context_dim is set, unless the model has
        layout_classes), context_mask: (B, L) bool, True = real token, False = padding left out of cross-attention,
        boxes: (B, N, 4) x0, y0, x1, y1 as fractions of the image in [0, 1] and box_labels: (B, N) class indices,
        -1 = no object (only with layout_classes; both None = no objects), image_embed: (B, embed_dim) CLIP image
        embeddings (only with embed_dim; None = all zeros, the null of classifier-free guidance)
        -> (B, out_dim, H, W) in x's dtype."""
        t, y = self._check_inputs(x, t, y)
        image_embed = self._check_image_embed(x, image_embed)
        if image_embed is not None and self.image_embed_tokens is not None:
            context, context_mask = self._embed_context(x, context, context_mask, boxes, box_labels, image_embed)
        else:
            context, context_mask = self._layout_context(x, context, context_mask, boxes, box_labels)
        if concat is None and self.cfg.cond_channels:
            raise ValueError(f"this UNet takes {self.cfg.cond_channels} condition channels (concat=...); none given")
        x_in = x if concat is None else torch.cat([x, self._check_concat(x, concat)], dim=1)
        # Every ResBlock's embedding projection starts with SiLU; apply it once here instead of per block.
        emb = self.embed(t, y)
        if image_embed is not None:
            emb = emb + self.image_embed_proj(image_embed.to(emb.dtype))
        emb_act = F.silu(emb)  # (B, E)
        # Activations run channels_last (NHWC): oneDNN/cuDNN convs skip layout reorders (~10% faster here than
        # NCHW) and attention's (B,C,H,W)<->(B,HW,C) reshapes become free views. Parameters stay contiguous
        # so state dicts save as-is (safetensors refuses non-contiguous tensors); that costs ~2% at most.
        h = self.conv_in(x_in.contiguous(memory_format=torch.channels_last))  # (B, mc, H, W)
        skips = [h]
        for block in self.down:
            h = block(h, emb_act, context, context_mask)
            skips.append(h)
        h = self.middle(h, emb_act, context, context_mask)
        for block in self.up:
            h = block(torch.cat([h, skips.pop()], dim=1), emb_act, context, context_mask)
        out = self.conv_out(F.silu(self.norm_out(h)))  # (B, out_dim, H, W)
        # Autocast leaves a bf16/fp16 output; hand back the caller's dtype so diffusion maths stays in fp32.
        return out.to(x.dtype).contiguous()
