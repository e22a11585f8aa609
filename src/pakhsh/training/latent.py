"""The frozen half of a latent diffusion run: the autoencoder, the text encoder, their caches and the conditions.

A latent run trains a UNet on z = scale * (a posterior sample of the frozen autoencoder), conditioned on what
`condition` names: caption tokens from a frozen text encoder (cross-attention), the segmentation map (one-hot,
area-downsampled to the latent size, concatenated to z_t) and the layout (boxes with class labels -> tokens, a
trainable part of the UNet). Each condition is replaced by its null with its own probability (classifier-free
guidance): "" for text, an all-zero map, no boxes.

Caches. Encoding images and captions again every step would cost more than the UNet step itself on a CPU, so
when the training set is finite and unaugmented its posterior moments and caption tokens are computed once, in
fixed chunks in index order, before the first step. A value therefore never depends on which batch first asked
for it, and a resumed run computes exactly what the uninterrupted run computed. Data with random augmentation
is encoded batch by batch instead (also exact: batch k is the same batch on a replay).

Exactness across processes: the posterior noise and the condition-dropout draws come from the trainer's global
stream (`Draws`), so N processes draw what one process draws for the combined batch.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..nets.autoencoder import AutoencoderKL, DiagonalGaussian
from .experiment import ExperimentConfig

CHUNK = 64  # images / captions per encoder call while filling the caches (fixed: the values depend on it)
CACHE_LIMIT = 200_000  # larger (or augmented) training sets are encoded batch by batch


class LatentSystem:
    """Frozen parts of a latent run (see the module docstring). `latents(batch, eps)` and `conditions(batch, u)`
    give one micro-batch's diffusion input and model keywords."""

    def __init__(self, cfg: ExperimentConfig, autoencoder: AutoencoderKL, text_encoder: Any, device: torch.device):
        assert cfg.latent is not None
        self.cfg = cfg
        self.autoencoder = autoencoder.to(device).eval().requires_grad_(False)
        self.text_encoder = text_encoder.to(device) if text_encoder is not None else None
        self.device = device
        self.scale = cfg.latent.scale_factor
        self._moments: Tensor | None = None  # (N, 2C, h, w) float32 on the CPU, by dataset index
        self._tokens: Tensor | None = None  # (N, L, D) float16
        self._masks: Tensor | None = None  # (N, L) bool
        self._null: tuple[Tensor, Tensor] | None = None  # the empty prompt's tokens (1, L, D) and mask (1, L)
        self._extras: dict[str, Tensor] = {}  # labels, maps, boxes by dataset index (what the conditions read)
        self._image_shape: tuple[int, ...] = ()

    # ------------------------------------------------------------------ building
    @classmethod
    def build(cls, cfg: ExperimentConfig, device: torch.device, autoencoder: AutoencoderKL | None = None
              ) -> tuple["LatentSystem", ExperimentConfig]:
        """Load the frozen nets; returns the system and cfg with latent.autoencoder_config filled in. A resumed
        run passes the autoencoder its checkpoint holds, so it continues with exactly the weights it started with."""
        from .autoencoder import load_autoencoder

        lat = cfg.latent
        assert lat is not None
        if autoencoder is None:
            autoencoder, _ = load_autoencoder(lat.autoencoder)
        ae_cfg = autoencoder.cfg
        _check_fits(cfg, ae_cfg)
        text = None
        if cfg.condition is not None and cfg.condition.text is not None:
            from ..conditioning.text import TextEncoder

            text = TextEncoder(cfg.condition.text)
            if cfg.model.context_dim != text.dim:
                raise ValueError(f"model.context_dim={cfg.model.context_dim} but the text encoder "
                                 f"{cfg.condition.text.name_or_path} gives {text.dim}-d tokens; set "
                                 f"model.context_dim={text.dim}")
        cfg = replace(cfg, latent=replace(lat, autoencoder_config=ae_cfg))
        return cls(cfg, autoencoder, text, device), cfg

    def prepare(self, dataset: Any, progress: bool = True) -> float:
        """Fill the caches (when the data allows) and measure the scale factor if the config has none; returns it."""
        self._check_data(dataset)
        n = len(dataset)
        data = self.cfg.data
        augmented = data.random_flip or data.crop == "random"
        if n <= CACHE_LIMIT and not augmented:
            self._fill(dataset, progress)
        if self.scale is None:
            self.scale = self._measure_scale(dataset)
        return self.scale

    def training_view(self, dataset: Any) -> Any:
        """What the trainer's loader should read: with the training set encoded, a view that hands out the cached
        conditions by index (and a placeholder image) instead of decoding or drawing every image again; the same
        batches, without the per-image work. Otherwise the dataset itself."""
        if self._moments is None or len(self._moments) != len(dataset):
            return dataset
        return _EncodedView(len(dataset), self._image_shape, self._extras)

    def _check_data(self, dataset: Any) -> None:
        """The data has what the conditions read (before minutes of encoding)."""
        c = self.cfg.condition
        if c is None or len(dataset) == 0:
            return
        first = dataset[0]
        needs = {"caption": c.text is not None, "segmentation": c.segmap, "boxes": c.layout, "objects": c.layout}
        hints = {"caption": "a .txt beside each image or captions.jsonl", "segmentation": "segmentation maps",
                 "boxes": "boxes with labels", "objects": "boxes with labels"}
        what = {"caption": "condition.text", "segmentation": "condition.segmap", "boxes": "condition.layout",
                "objects": "condition.layout"}
        for key, needed in needs.items():
            if needed and key not in first:
                raise ValueError(f"{what[key]}: dataset '{self.cfg.data.name}' has no '{key}' ({hints[key]}; the "
                                 f"built-in shapes data has them); set {what[key]}="
                                 f"{'null' if key == 'caption' else 'false'}")

    def _fill(self, dataset: Any, progress: bool) -> None:
        n = len(dataset)
        text = self.text_encoder is not None
        bar = tqdm(total=n, desc="encoding the training set once (latents)", unit="img", disable=not progress,
                   dynamic_ncols=True, file=sys.stderr)
        moments, captions = [], []
        extras: dict[str, list[Tensor]] = {}
        with torch.no_grad():
            for start in range(0, n, CHUNK):
                items = [dataset[i] for i in range(start, min(start + CHUNK, n))]
                x = torch.stack([it["image"] for it in items]).to(self.device)
                post = self.autoencoder.encode(x)
                moments.append(torch.cat([post.mean, post.logvar], 1).float().cpu())
                if text:
                    captions += [_caption(it, start + j) for j, it in enumerate(items)]
                for key, dtype in _KEPT.items():
                    if key in items[0]:
                        extras.setdefault(key, []).append(torch.stack([torch.as_tensor(it[key]) for it in items])
                                                          .to(dtype))
                bar.update(len(items))
        bar.close()
        self._moments = torch.cat(moments)
        self._extras = {k: torch.cat(v) for k, v in extras.items()}
        self._image_shape = tuple(x.shape[1:])
        if text:
            self._tokens, self._masks = self._encode_captions(captions, progress)

    def _encode_captions(self, captions: list[str], progress: bool) -> tuple[Tensor, Tensor]:
        from ..conditioning.text import cached_caption_tokens

        return cached_caption_tokens(self.text_encoder, captions, CHUNK, progress)

    def _measure_scale(self, dataset: Any) -> float:
        """1 / std of posterior samples of the first `scale_samples` images (fixed noise): unit-variance latents,
        as latent-diffusion's scale_by_std does with its first batch."""
        assert self.cfg.latent is not None
        k = min(self.cfg.latent.scale_samples, len(dataset))
        g = torch.Generator().manual_seed(0)
        zs = []
        with torch.no_grad():
            for start in range(0, k, CHUNK):
                idx = list(range(start, min(start + CHUNK, k)))
                post = self._posterior(idx, lambda: torch.stack([dataset[i]["image"] for i in idx]))
                zs.append(post.sample(g).float().cpu())
        std = float(torch.cat(zs).std())
        if not std > 0:
            raise ValueError(f"latent.scale_factor: the latents of the first {k} images have std {std}; is the "
                             "autoencoder trained?")
        return 1.0 / std

    # ------------------------------------------------------------------ per step
    def latent_shape(self, image_shape: tuple[int, ...]) -> tuple[int, int, int]:
        """(C, h, w) of the latents of images (C_img, H, W)."""
        ae = self.autoencoder.cfg
        f = ae.downsample_factor
        return ae.latent_channels, image_shape[-2] // f, image_shape[-1] // f

    def _posterior(self, index: list[int] | Tensor, images: Any) -> DiagonalGaussian:
        """The posterior of the images at dataset `index` (from the cache, else by encoding images())."""
        if self._moments is not None:
            m = self._moments[torch.as_tensor(index, dtype=torch.long)].to(self.device)
            mean, logvar = m.chunk(2, dim=1)
            return DiagonalGaussian(mean, logvar, deterministic=not self.autoencoder.cfg.double_z)
        with torch.no_grad():
            x = images() if callable(images) else images
            return self.autoencoder.encode(x.to(self.device).float())

    def latents(self, batch: dict[str, Any], eps: Tensor) -> Tensor:
        """z_0 for the diffusion: scale * (mean + std * eps), eps (B, C, h, w) drawn by the trainer."""
        post = self._posterior(batch["index"], batch["image"])
        z = post.mean.float() + post.std.float() * eps.to(self.device)
        return z * self.scale

    def null_text(self) -> tuple[Tensor, Tensor]:
        if self._null is None:
            emb = self.text_encoder.encode([""])
            self._null = (emb.tokens.float(), emb.mask)
        return self._null

    def text(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """(tokens (B, L, D) float32, mask (B, L)) of the batch's captions, from the cache or the encoder."""
        if self._tokens is not None:
            idx = torch.as_tensor(batch["index"], dtype=torch.long)
            return self._tokens[idx].to(self.device).float(), self._masks[idx].to(self.device)
        captions = batch.get("caption")
        if captions is None:
            raise ValueError(f"condition.text: dataset '{self.cfg.data.name}' has no captions (a .txt beside each "
                             "image or captions.jsonl)")
        emb = self.text_encoder.encode(list(captions))
        return emb.tokens.to(self.device), emb.mask.to(self.device)

    def conditions(self, batch: dict[str, Any], u: Tensor) -> dict[str, Tensor]:
        """The model keywords for the batch; u (B, 3) uniform draws decide the dropout of text, map and layout."""
        c = self.cfg.condition
        cond: dict[str, Tensor] = {}
        if c is None:
            return cond
        u = u.to(self.device)
        if c.text is not None:
            tokens, mask = self.text(batch)
            null_t, null_m = self.null_text()
            drop = u[:, 0] < c.text_dropout
            cond["context"] = torch.where(drop[:, None, None], null_t.to(tokens), tokens)
            cond["context_mask"] = torch.where(drop[:, None], null_m.to(mask), mask)
        if c.segmap:
            cond["concat"] = self.segmap(batch["segmentation"], u[:, 1] >= c.segmap_dropout)
        if c.layout:
            boxes, labels = self.layout(batch)
            keep = u[:, 2] >= c.layout_dropout
            cond["boxes"], cond["box_labels"] = boxes, torch.where(keep[:, None], labels, torch.full_like(labels, -1))
        return cond

    def segmap(self, seg: Tensor, keep: Tensor) -> Tensor:
        """(B, H, W) labels -> (B, classes, h, w) class fractions at the latent size; rows not kept are zero."""
        from ..conditioning.segmap import one_hot_map

        assert self.cfg.condition is not None
        _, h, w = self.latent_shape(tuple(seg.shape))
        maps = one_hot_map(seg.long(), self.cfg.condition.segmap_classes, (h, w)).to(self.device)
        return maps * keep.to(self.device, maps.dtype)[:, None, None, None]

    def layout(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        from ..conditioning.layout import batch_layout

        for key in ("boxes", "objects"):
            if key not in batch:
                raise ValueError(f"condition.layout: dataset '{self.cfg.data.name}' has no '{key}' (the built-in "
                                 "shapes data has boxes)")
        boxes, labels = batch_layout(batch["boxes"], batch["objects"], batch["image"].shape[-1])
        return boxes.to(self.device), labels.to(self.device)

    def checkpoint_files(self) -> dict[str, dict[str, Tensor]]:
        """What goes into every checkpoint beside the UNet: the frozen autoencoder (so a checkpoint is whole)."""
        return {"autoencoder.safetensors": {k: v.detach().cpu().contiguous()
                                            for k, v in self.autoencoder.state_dict().items()}}


def start_latent_system(cfg: ExperimentConfig, dataset: Any, device: torch.device, checkpoint: Path | None,
                        progress: bool = True) -> tuple[LatentSystem, ExperimentConfig, bool]:
    """Build a latent run's frozen parts and encode its training set -> (system, cfg with the autoencoder config
    and scale factor filled in, whether the scale was measured now). Resuming from `checkpoint`, the run keeps the
    autoencoder that checkpoint holds and the scale it measured."""
    from ..nets.autoencoder import build_autoencoder
    from .checkpoint import read_config, read_tensors

    assert cfg.latent is not None
    ae = None
    if checkpoint is not None and (checkpoint / "autoencoder.safetensors").is_file():
        saved = read_config(checkpoint)
        if saved.latent is not None and saved.latent.autoencoder_config is not None:
            ae = build_autoencoder(saved.latent.autoencoder_config, saved.latent.autoencoder)
            ae.load_state_dict(read_tensors(checkpoint / "autoencoder.safetensors"))
            if cfg.latent.scale_factor is None:
                cfg = replace(cfg, latent=replace(cfg.latent, scale_factor=saved.latent.scale_factor))
    system, cfg = LatentSystem.build(cfg, device, ae)
    assert cfg.latent is not None
    measured = cfg.latent.scale_factor is None
    scale = system.prepare(dataset, progress=progress)
    return system, replace(cfg, latent=replace(cfg.latent, scale_factor=scale)), measured


# per-sample keys kept beside the encodings (the conditions and labels read them), with their stored dtype
_KEPT = {"label": torch.long, "segmentation": torch.uint8, "boxes": torch.float32, "objects": torch.long}


class _EncodedView(torch.utils.data.Dataset):
    """Sample i of an encoded training set: its index, the kept per-sample tensors and a zero image of the right
    shape (latent runs read the cached posterior by index; the image only tells the trainer its shape)."""

    def __init__(self, n: int, image_shape: tuple[int, ...], extras: dict[str, Tensor]) -> None:
        self.n, self.extras = n, extras
        self.image = torch.zeros(image_shape)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, Any]:
        item: dict[str, Any] = {"image": self.image, "index": int(index)}
        for key, values in self.extras.items():
            item[key] = int(values[index]) if key == "label" else values[index]
        return item


def _caption(item: dict[str, Any], index: int) -> str:
    if "caption" not in item:
        raise ValueError(f"condition.text: sample {index} of the training data has no caption (a .txt beside each "
                         "image or captions.jsonl; the built-in shapes data has captions)")
    return str(item["caption"])


def _check_fits(cfg: ExperimentConfig, ae: Any) -> None:
    """The UNet and the data must match the autoencoder's latents."""
    m = cfg.model
    f = ae.downsample_factor
    if m.in_channels != ae.latent_channels or m.out_channels != ae.latent_channels:
        raise ValueError(f"latent.autoencoder {cfg.latent.autoencoder} makes {ae.latent_channels}-channel latents: "
                         f"set model.in_channels and model.out_channels to {ae.latent_channels} (got "
                         f"{m.in_channels} and {m.out_channels})")
    if cfg.data.image_size % f:
        raise ValueError(f"data.image_size={cfg.data.image_size} is not a multiple of the autoencoder's factor f={f}")
    if m.image_size != cfg.data.image_size // f:
        raise ValueError(f"model.image_size={m.image_size}: the UNet sees {cfg.data.image_size // f}x"
                         f"{cfg.data.image_size // f} latents (data.image_size {cfg.data.image_size} / f={f}); set "
                         f"model.image_size={cfg.data.image_size // f}")
    ch = cfg.data.channels
    if ch is not None and ch != ae.in_channels:
        raise ValueError(f"data.channels={ch} but the autoencoder takes {ae.in_channels}-channel images")
