"""The frozen half of unCLIP's training runs (Ramesh et al. 2022): what the CLIP, the prior and the decoder read.

- objective=clip: the trained net is the CLIP (nets/clip.py); its text tower reads the frozen text encoder's
  caption tokens, which are encoded once and cached here (and on disk, like latent runs' captions).
- objective=prior: the diffusion runs on the frozen CLIP's image embedding of each training image (scaled to
  norm sqrt(D), nets.clip.scale_embedding), conditioned on the CLIP text embedding and the caption tokens; with
  probability unclip.text_dropout both become the empty caption's (classifier-free guidance).
- the decoder (objective=diffusion with an `unclip` section): a pixel UNet on the images, conditioned on their
  CLIP image embedding (dropped to zeros with probability unclip.embed_dropout) and, with unclip.caption, on the
  caption tokens (dropped to "" independently).

The training set (images, caption tokens, embeddings) is encoded once in fixed chunks in index order before the
first step, so a value never depends on which batch asked for it and resume is exact (as in training/latent.py).
The frozen CLIP's weights go into every checkpoint (clip.safetensors) and its fingerprint into the config, so a
checkpoint is whole and the pipeline can refuse a prior and a decoder trained on different CLIPs.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..nets.clip import CLIP, scale_embedding
from .experiment import ExperimentConfig, UnclipConfig

CHUNK = 64  # images / captions per encoder call while filling the caches (fixed: the values depend on it)
CACHE_LIMIT = 100_000  # images kept in memory; unCLIP's runs use finite, unaugmented data
CLIP_FILE = "clip.safetensors"


def clip_fingerprint(clip: CLIP) -> str:
    """A short hash of the CLIP's weights: equal fingerprints = the same embedding space."""
    h = hashlib.sha256()
    for name, t in sorted(clip.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def load_clip(spec: str | Path, *, ema: bool = True) -> tuple[CLIP, ExperimentConfig, Path]:
    """A shipped CLIP name, or a CLIP run / checkpoint / exported folder -> (CLIP in eval mode on the CPU, its run
    config (condition.text names its text encoder), the folder read). Errors name the path."""
    from ..pipelines.base import resolve_model_path
    from .checkpoint import CheckpointError, load_model, resolve_checkpoint, read_config

    try:
        path = resolve_model_path(spec)
    except FileNotFoundError:
        raise FileNotFoundError(f"CLIP {spec!r}: no such folder or shipped CLIP; name the shipped unclip_clip or the "
                                "run folder of `pakhsh train unclip_clip` (e.g. runs/unclip_clip)") from None
    folder = resolve_checkpoint(path)
    cfg = read_config(folder)
    if cfg.objective != "clip":
        raise CheckpointError(f"{folder} is not a CLIP (its config has objective={cfg.objective}); give a CLIP run "
                              "or model (shipped: unclip_clip)")
    loaded = load_model(folder, ema=ema)
    return loaded.model.eval(), cfg, folder  # type: ignore[return-value]


def frozen_clip(folder: Path, unclip: UnclipConfig) -> CLIP:
    """The CLIP a prior / decoder checkpoint (or export) holds, in eval mode on the CPU; a damaged file, one of
    another shape, or weights whose fingerprint is not the recorded one are refused, naming the file."""
    from .checkpoint import check_fits, read_tensors

    path = Path(folder) / CLIP_FILE
    if unclip.clip_config is None or not path.is_file():
        raise FileNotFoundError(f"{folder}: no {CLIP_FILE} beside the weights (an unCLIP prior or decoder carries its "
                                "CLIP); give the run folder or the exported model")
    clip = CLIP(unclip.clip_config)
    state = read_tensors(path)  # a damaged file: CheckpointError naming it
    check_fits(clip, state, path)  # weights of another CLIP shape: CheckpointError naming the keys
    clip.load_state_dict(state)
    if unclip.clip_fingerprint is not None and clip_fingerprint(clip) != unclip.clip_fingerprint:
        raise ValueError(f"{path}: its weights are not the CLIP this model was trained on (fingerprint "
                         f"{clip_fingerprint(clip)} != {unclip.clip_fingerprint})")
    return clip.eval()


class UnclipSystem:
    """Frozen parts and caches of a CLIP, prior or decoder run (see the module docstring)."""

    def __init__(self, cfg: ExperimentConfig, clip: CLIP | None, text_encoder: Any, device: torch.device) -> None:
        self.cfg = cfg
        self.clip = clip.to(device).eval().requires_grad_(False) if clip is not None else None
        self.text_encoder = text_encoder
        self.device = device
        self._images: Tensor | None = None  # (N, C, H, W) float32, by dataset index
        self._tokens: Tensor | None = None  # (N, L, D) float16
        self._masks: Tensor | None = None  # (N, L) bool
        self._image_emb: Tensor | None = None  # (N, E) float32, scaled to norm sqrt(E)
        self._text_emb: Tensor | None = None  # (N, E) float32, scaled
        self._null: dict[str, Tensor] = {}

    @property
    def objective(self) -> str:
        return "decoder" if self.cfg.objective == "diffusion" else self.cfg.objective

    @property
    def needs_text(self) -> bool:
        u = self.cfg.unclip
        return self.objective in ("clip", "prior") or (u is not None and u.caption)

    # ------------------------------------------------------------------ building
    def prepare(self, dataset: Any, progress: bool = True) -> None:
        """Encode the training set once: images, caption tokens, CLIP embeddings (what this objective reads)."""
        n = len(dataset)
        if n == 0:
            raise ValueError(f"dataset '{self.cfg.data.name}' is empty")
        if n > CACHE_LIMIT:
            raise ValueError(f"data.length={n}: unCLIP runs keep their training set in memory, at most "
                             f"{CACHE_LIMIT:,} images; use a smaller data.length")
        if self.cfg.data.random_flip or self.cfg.data.crop == "random":
            raise ValueError("unCLIP runs encode their training set once: set data.random_flip=false and "
                             "data.crop=center (a flip would also swap the captions' left and right)")
        if self.needs_text and "caption" not in dataset[0]:
            raise ValueError(f"dataset '{self.cfg.data.name}' has no captions (a .txt beside each image or "
                             "captions.jsonl; the built-in shapes data has them)")
        images, captions = [], []
        for start in tqdm(range(0, n, CHUNK), desc="reading the training set once", unit="chunk",
                          disable=not progress, dynamic_ncols=True, file=sys.stderr):
            items = [dataset[i] for i in range(start, min(start + CHUNK, n))]
            images.append(torch.stack([it["image"] for it in items]).float())
            if self.needs_text:
                captions += [str(it["caption"]) for it in items]
        self._images = torch.cat(images)
        if self.needs_text:
            from ..conditioning.text import cached_caption_tokens

            self._tokens, self._masks = cached_caption_tokens(self.text_encoder, captions, CHUNK, progress)
        if self.clip is not None:
            self._image_emb = self._embed(lambda s: self.clip.encode_image(
                self._images[s].to(self.device).float()))
            if self.objective == "prior":
                self._text_emb = self._embed(lambda s: self.clip.encode_text(
                    self._tokens[s].to(self.device).float(), self._masks[s].to(self.device)))

    def _embed(self, fn: Any) -> Tensor:
        assert self._images is not None
        out = []
        with torch.no_grad():
            for start in range(0, len(self._images), CHUNK):
                out.append(scale_embedding(fn(slice(start, start + CHUNK))).cpu())
        return torch.cat(out)

    def training_view(self, dataset: Any) -> Any:
        """The cached images by index instead of rendering / decoding every image again (the same batches)."""
        assert self._images is not None
        return _CachedView(self._images)

    def latent_shape(self, image_shape: tuple[int, ...]) -> tuple[int, ...]:
        """What the diffusion noises: the prior a (E,) embedding, the decoder the image itself."""
        if self.objective == "prior":
            assert self.cfg.prior is not None
            return (self.cfg.prior.embed_dim,)
        return tuple(image_shape)

    # ------------------------------------------------------------------ per step
    def _idx(self, batch: dict[str, Any]) -> Tensor:
        return torch.as_tensor(batch["index"], dtype=torch.long)

    def text(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """(tokens (B, L, D) float32, mask (B, L)) of the batch's captions, from the cache."""
        assert self._tokens is not None and self._masks is not None
        i = self._idx(batch)
        return self._tokens[i].to(self.device).float(), self._masks[i].to(self.device)

    def null(self) -> dict[str, Tensor]:
        """The empty caption: its tokens (1, L, D), mask (1, L) and (prior runs) CLIP text embedding (1, E)."""
        if not self._null:
            emb = self.text_encoder.encode([""])
            self._null = {"context": emb.tokens.float().to(self.device), "context_mask": emb.mask.to(self.device)}
            if self.clip is not None and self.objective == "prior":
                with torch.no_grad():
                    self._null["text_embed"] = scale_embedding(self.clip.encode_text(
                        self._null["context"], self._null["context_mask"]))
        return self._null

    def clip_inputs(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        """objective=clip: (images, caption tokens, masks) of the batch."""
        tokens, mask = self.text(batch)
        return batch["image"].to(self.device).float(), tokens, mask

    def image_embeddings(self, index: Tensor) -> Tensor:
        """The cached, scaled CLIP image embeddings (B, E) of the training images at `index`."""
        assert self._image_emb is not None
        return self._image_emb[torch.as_tensor(index, dtype=torch.long)].to(self.device)

    def latents(self, batch: dict[str, Any]) -> Tensor:
        """x_0 of the diffusion: the prior's scaled CLIP image embeddings, or the decoder's images."""
        if self.objective == "prior":
            return self.image_embeddings(batch["index"])
        return batch["image"].to(self.device).float()

    def conditions(self, batch: dict[str, Any], u: Tensor) -> dict[str, Tensor]:
        """The net's keywords; u (B, 3) uniform draws decide the dropouts (column 0: caption, 1: embedding)."""
        uc = self.cfg.unclip
        assert uc is not None
        u = u.to(self.device)
        cond: dict[str, Tensor] = {}
        if self.needs_text:
            tokens, mask = self.text(batch)
            null = self.null()
            drop = u[:, 0] < uc.text_dropout
            cond["context"] = torch.where(drop[:, None, None], null["context"].to(tokens), tokens)
            cond["context_mask"] = torch.where(drop[:, None], null["context_mask"], mask)
            if self.objective == "prior":
                assert self._text_emb is not None
                te = self._text_emb[self._idx(batch)].to(self.device)
                cond["text_embed"] = torch.where(drop[:, None], null["text_embed"].to(te), te)
        if self.objective == "decoder":
            emb = self.image_embeddings(batch["index"])
            keep = (u[:, 1] >= uc.embed_dropout).to(emb.dtype)
            cond["image_embed"] = emb * keep[:, None]
        return cond

    def checkpoint_files(self) -> dict[str, dict[str, Tensor]]:
        """The frozen CLIP beside the trained net in every prior / decoder checkpoint (a checkpoint is whole)."""
        if self.clip is None:
            return {}
        return {CLIP_FILE: {k: v.detach().cpu().contiguous() for k, v in self.clip.state_dict().items()}}


def start_unclip_system(cfg: ExperimentConfig, dataset: Any, device: torch.device, checkpoint: Path | None,
                        progress: bool = True) -> tuple[UnclipSystem, ExperimentConfig]:
    """Build a CLIP / prior / decoder run's frozen parts and encode its training set -> (system, cfg with
    unclip.clip_config, .text and .clip_fingerprint filled in). Resuming from `checkpoint`, a prior or decoder
    keeps the CLIP that checkpoint holds."""
    from ..conditioning.text import TextEncoder
    from .checkpoint import read_config

    if cfg.objective == "clip":
        assert cfg.condition is not None and cfg.condition.text is not None
        text = TextEncoder(cfg.condition.text)
        assert cfg.clip is not None
        if cfg.clip.text_dim != text.dim:
            raise ValueError(f"clip.text_dim={cfg.clip.text_dim} but the text encoder "
                             f"{cfg.condition.text.name_or_path} gives {text.dim}-d tokens; set clip.text_dim={text.dim}")
        system = UnclipSystem(cfg, None, text.to(device), device)
        system.prepare(dataset, progress)
        return system, cfg
    uc = cfg.unclip
    assert uc is not None
    if checkpoint is not None and (checkpoint / CLIP_FILE).is_file():
        saved = read_config(checkpoint).unclip
        if saved is None or saved.clip_config is None or saved.text is None:
            raise ValueError(f"{checkpoint}: its config has no unclip.clip_config; cannot resume this run")
        clip = frozen_clip(checkpoint, saved)
        text_cfg = saved.text
    else:
        clip, clip_run, _ = load_clip(uc.clip)
        assert clip_run.condition is not None and clip_run.condition.text is not None
        text_cfg = clip_run.condition.text
    _check_fits(cfg, clip)
    text = TextEncoder(text_cfg).to(device)
    if cfg.objective == "prior":
        assert cfg.prior is not None
        if cfg.prior.text_dim is not None and cfg.prior.text_dim != text.dim:
            raise ValueError(f"prior.text_dim={cfg.prior.text_dim} but the CLIP's text encoder gives {text.dim}-d "
                             f"tokens; set prior.text_dim={text.dim}")
        if cfg.prior.text_dim is not None and cfg.prior.max_text_tokens < text.max_length:
            raise ValueError(f"prior.max_text_tokens={cfg.prior.max_text_tokens} but the CLIP's text encoder gives "
                             f"{text.max_length} tokens per caption; set prior.max_text_tokens={text.max_length}")
    elif uc.caption and cfg.model.context_dim != text.dim:
        raise ValueError(f"model.context_dim={cfg.model.context_dim} but the CLIP's text encoder gives {text.dim}-d "
                         f"tokens; set model.context_dim={text.dim}")
    elif not uc.caption and cfg.model.context_dim is not None and not cfg.model.embed_tokens:
        raise ValueError(f"model.context_dim={cfg.model.context_dim} but nothing is cross-attended to "
                         "(unclip.caption=false and model.embed_tokens=0): set unclip.caption=true, "
                         "model.embed_tokens >= 1 or model.context_dim=null")
    filled: UnclipConfig = replace(uc, clip_config=clip.cfg, text=text_cfg, clip_fingerprint=clip_fingerprint(clip))
    cfg = replace(cfg, unclip=filled)
    system = UnclipSystem(cfg, clip, text, device)
    system.prepare(dataset, progress)
    return system, cfg


def _check_fits(cfg: ExperimentConfig, clip: CLIP) -> None:
    """The trained net and the data must match the CLIP."""
    c = clip.cfg
    if cfg.data.image_size != c.image_size:
        raise ValueError(f"data.image_size={cfg.data.image_size} but the CLIP {cfg.unclip.clip} reads "  # type: ignore[union-attr]
                         f"{c.image_size}x{c.image_size} images; set data.image_size={c.image_size}")
    width = cfg.prior.embed_dim if cfg.objective == "prior" else cfg.model.embed_dim  # type: ignore[union-attr]
    key = "prior.embed_dim" if cfg.objective == "prior" else "model.embed_dim"
    if width != c.embed_dim:
        raise ValueError(f"{key}={width} but the CLIP {cfg.unclip.clip} makes {c.embed_dim}-d embeddings; set "  # type: ignore[union-attr]
                         f"{key}={c.embed_dim}")


class _CachedView(torch.utils.data.Dataset):
    """Sample i of a cached training set: its image (float32) and its index (the caches are read by index)."""

    def __init__(self, images: Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.images[index], "index": int(index)}
