"""Text-to-image with a latent diffusion model: prompts -> text context -> any pakhsh sampler over latents, with
classifier-free guidance against the empty (or negative) prompt -> VAE decode -> images in [-1, 1].

`TextToImagePipeline.from_pretrained(spec)` takes a latent model pakhsh trained (a shipped name such as "t2i", a
run, checkpoint or exported folder: `load_latent_model`) or a local diffusers Stable Diffusion folder
(`interop.stable_diffusion.load_sd_folder`); any `LatentDiffusionModel` bundle works. pakhsh models may also take
a segmentation map and a layout (boxes with labels) besides, or instead of, the prompt. With DDIM at eta = 0 and
the same starting latents this computes what diffusers' StableDiffusionPipeline computes with a DDIMScheduler of
"leading" spacing and set_alpha_to_one=True (tests/interop/test_stable_diffusion.py states the tolerance).

Which timesteps. A folder's scheduler config says how diffusers picks N of its T training steps
(`timestep_spacing`, `steps_offset`; SD ships "leading" + 1: 1, 21, ..., 981 for N = 50). The pipeline walks the
same steps (`spacing="scheduler"`, the default) with every sampler; `spacing="pakhsh"` uses pakhsh's own
respacing instead. Two diffusers DDIM details differ on purpose:
  - every pakhsh chain ends on the x_0 prediction (abar = 1), diffusers' set_alpha_to_one=True. SD folders ship
    False: diffusers' last step then stops at abar of training step 0 (0.99915 for SD), leaving
    sqrt(1 - 0.99915) ~ 3% of its last eps estimate in the latents;
  - diffusers' DDIM always steps back by T // N, which skips or overshoots the next listed timestep for
    "linspace", and for "trailing" when N does not divide T; pakhsh steps to the next listed one.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch

from ..conditioning.text import TextEmbedding, truncation_notice
from ..diffusion import GaussianDiffusion
from ..interop.stable_diffusion import LatentDiffusionModel, load_sd_folder
from ..samplers import SAMPLERS, ClassifierFreeGuidance, default_spacing, resolve_spacing
from ..samplers.common import ImageGenerators, StepProgress, steps_for
from .base import pick_device, sampling_autocast
from .unconditional import PipelineOutput, SampleSettings, to_pil

Spacing = Literal["scheduler", "pakhsh"]
DEFAULT_MODEL = "t2i"  # the shipped text-to-image model (shapes scenes, 64x64, MiniLM prompts)
# Stable Diffusion's usual settings: 50 deterministic DDIM steps at guidance 7.5.
DEFAULT_SETTINGS = SampleSettings(sampler="ddim", steps=50, guidance=7.5)

__all__ = ["DEFAULT_SETTINGS", "LatentDiffusionModel", "TextToImagePipeline", "scheduler_timesteps"]


def scheduler_timesteps(spacing: str, steps_offset: int, num_train_steps: int, steps: int) -> list[int]:
    """The training steps diffusers' DDIMScheduler.set_timesteps(steps) visits for this timestep_spacing and
    steps_offset, ascending (its other schedulers choose alike)."""
    T = num_train_steps
    if not 1 <= steps <= T:
        raise ValueError(f"steps {steps}: this model has T={T} training steps; use 1..{T}")
    if spacing == "leading":
        t = np.arange(steps) * (T // steps) + steps_offset
    elif spacing == "trailing":
        t = np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1
    elif spacing == "linspace":
        t = np.linspace(0, T - 1, steps).round().astype(np.int64)
    else:
        raise ValueError(f"timestep_spacing {spacing!r} is not supported (leading, trailing, linspace)")
    kept = sorted({int(v) for v in t})
    if kept[0] < 0 or kept[-1] >= T:
        raise ValueError(f"steps {steps} with steps_offset={steps_offset} reaches timestep {kept[-1]}, "
                         f"outside 0..{T - 1}")
    return kept


def _prompt_list(prompts: str | Sequence[str], name: str) -> list[str]:
    given = [prompts] if isinstance(prompts, str) else list(prompts)
    if not given or not all(isinstance(p, str) for p in given):
        raise ValueError(f"{name}: give a string or a non-empty list of strings")
    return given


class TextToImagePipeline:
    """A latent text-to-image model ready to use: `TextToImagePipeline.from_pretrained(path).generate(["a cat"])`."""

    # spacing "auto" is uniform for every sampler here: noise-dense steps were measured on unconditional pixel
    # models only (ImagePipeline.AUTO_SPACING)
    AUTO_SPACING: dict[str, str] = {}

    def __init__(self, model: LatentDiffusionModel, device: str | torch.device = "auto", bf16: bool = False,
                 spacing: Spacing = "scheduler") -> None:
        if spacing not in ("scheduler", "pakhsh"):
            raise ValueError(f"spacing {spacing!r}: use 'scheduler' (the model's own timesteps) or 'pakhsh'")
        self.device = pick_device(str(device))
        self.model = model.to(self.device)
        self.unet, self.vae, self.text_encoder = model.unet.eval(), model.vae.eval(), model.text_encoder
        self.diffusion = GaussianDiffusion.from_config(model.diffusion)
        self.bf16 = bf16
        self.spacing = spacing

    @classmethod
    def from_pretrained(cls, path: str | Path = DEFAULT_MODEL, *, device: str = "auto", bf16: bool = False,
                        spacing: Spacing = "scheduler", ema: bool = True) -> "TextToImagePipeline":
        """A latent model pakhsh trained (shipped name, run, checkpoint or exported folder) or a local diffusers
        Stable Diffusion folder (see `interop.stable_diffusion.load_sd_folder`)."""
        from .base import resolve_model_path

        folder = resolve_model_path(path)
        if (folder / "model_index.json").is_file():
            return cls(load_sd_folder(folder), device, bf16, spacing)
        from ..training.dreambooth_base import is_lora_folder, load_lora_model

        if is_lora_folder(folder):  # DreamBooth LoRA adapters (RUN/lora): the base they name + the adapters
            return cls(load_lora_model(folder), device, bf16, spacing)
        return cls(load_latent_model(folder, ema=ema), device, bf16, spacing)

    @property
    def condition(self) -> Any:
        """The ConditionConfig of a pakhsh model (None for Stable Diffusion folders: text only)."""
        cfg = self.model.config
        return cfg.condition if cfg is not None else None

    @property
    def takes_text(self) -> bool:
        return self.text_encoder is not None

    # ------------------------------------------------------------------ pieces
    def chain(self, settings: SampleSettings) -> GaussianDiffusion:
        """The respaced diffusion `settings` sample over (the scheduler's timesteps or pakhsh's spacing)."""
        T, steps = self.diffusion.num_steps, settings.steps
        if steps is not None and not 1 <= steps <= T:
            raise ValueError(f"steps {steps}: this model has T={T} training steps; use 1..{T}")
        m = self.model
        if self.spacing == "scheduler" and m.timestep_spacing is not None and steps is not None:
            return self.diffusion.respace(scheduler_timesteps(m.timestep_spacing, m.steps_offset, T, steps))
        spacing = default_spacing(settings.sampler, steps, T,
                                  resolve_spacing(settings.spacing, settings.sampler, self.AUTO_SPACING))
        return self.diffusion.respace(spacing) if spacing else self.diffusion

    def encode(self, prompts: list[str]) -> TextEmbedding:
        """Prompts -> context; warns once naming the prompts that were cut to the encoder's length."""
        emb = self.text_encoder.encode(prompts)
        notice = truncation_notice(prompts, emb)
        if notice:
            warnings.warn(notice, stacklevel=3)
        return emb

    def latent_shape(self, height: int | None, width: int | None) -> tuple[int, int, int]:
        """(C, h, w) of the latents for images of height x width (default: the UNet's training size)."""
        f = self.model.vae_factor
        h_lat, w_lat = self.model.latent_size
        height, width = height or h_lat * f, width or w_lat * f
        step = f * self.unet.cfg.downsample_factor
        for name, v in (("height", height), ("width", width)):
            if v < step or v % step:
                raise ValueError(f"{name} {v}: must be a positive multiple of {step} (VAE factor {f} x UNet "
                                 f"downsampling {self.unet.cfg.downsample_factor})")
        return self.model.latent_channels, height // f, width // f

    def _autocast(self) -> contextlib.AbstractContextManager:
        return sampling_autocast(self.device, self.bf16)

    def _model_fn(self, guidance: float, null: dict[str, torch.Tensor]) -> Any:
        # guidance 1 is the conditional model alone (one UNet pass, as diffusers does for scale <= 1)
        return self.unet if guidance == 1.0 else ClassifierFreeGuidance(self.unet, guidance, null)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate(self, prompts: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None,
                 settings: SampleSettings | None = None, *, seed: int = 0, height: int | None = None,
                 width: int | None = None, latents: torch.Tensor | None = None, batch_size: int = 8,
                 progress: bool = True, segmap: torch.Tensor | None = None,
                 layout: tuple[torch.Tensor, torch.Tensor] | None = None,
                 known: tuple[torch.Tensor, torch.Tensor] | None = None,
                 labels: torch.Tensor | None = None) -> torch.Tensor:
        """One image per prompt: (N, 3, H, W) in [-1, 1] on the CPU.

        Guidance (settings.guidance, 7.5 by default) pushes each prompt's prediction away from its negative prompt
        (one for all or one per prompt; default the empty prompt). `latents` (N, C, h, w) are the starting noise;
        without them image i draws its own from (seed, i), as do stochastic samplers' steps, so an image does not
        depend on `batch_size` or on the other prompts.

        pakhsh models conditioned on maps or layouts also take `segmap` (N, H, W) class labels and `layout`
        (boxes (N, K, 4) as [0, 1] fractions, labels (N, K), -1 = no object); left out, the model gets their null
        (as in training's condition dropout), and guidance pushes away from the all-null prediction. Class-
        conditional latent models take `labels` (N,) (left out: the null class). `known`
        (images (N, C, H, W), mask (N, 1, H, W), 1 = generate) inpaints: the known region is kept (see
        conditioning/inpaint.py)."""
        s = settings or DEFAULT_SETTINGS
        if s.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {s.sampler!r}; known: {', '.join(SAMPLERS)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        texts = _prompt_list(prompts, "prompts")
        n = len(texts)
        if self.model.config is not None and self.model.config.dreambooth is not None:
            from ..training.dreambooth_data import token_notice

            if notice := token_notice(self.model.config, texts):  # the identifier names the subject
                warnings.warn(notice, stacklevel=2)
        negatives = [""] * n if negative_prompt is None else _prompt_list(negative_prompt, "negative_prompt")
        if len(negatives) == 1:
            negatives *= n
        if len(negatives) != n:
            raise ValueError(f"negative_prompt: give one or {n} (one per prompt), got {len(negatives)}")
        shape = self.latent_shape(height, width)
        if latents is not None and tuple(latents.shape) != (n, *shape):
            raise ValueError(f"latents must be {(n, *shape)} (N, C, h, w), got {tuple(latents.shape)}")
        d = self.chain(s)
        extra, extra_null = self._extra_conditions(n, shape, segmap, layout, labels)
        if self.takes_text:
            cond = self.encode(texts)
            uncond = self.encode(negatives) if s.guidance != 1.0 else None
            # All-True masks (SD's CLIP context) are left out: the UNet then attends to every token, as SD does.
            masked = not cond.mask.all() or (uncond is not None and not uncond.mask.all())
        elif any(texts) or negative_prompt is not None:
            raise ValueError(f"{self.model.path}: this model takes no text (it is conditioned on "
                             f"{self._condition_names()}); leave the prompt empty")
        clip = self.model.clip_denoised if s.clip_denoised is None else s.clip_denoised
        kwargs: dict[str, Any] = {"eta": s.eta} if s.sampler == "ddim" else {}
        out = []
        desc = f"text-to-image: {n} image{'s' * (n != 1)} ({s.sampler}, {d.num_steps} steps)"
        with StepProgress(steps_for(n, batch_size, d.num_steps), desc, progress) as bar:
            for start in range(0, n, batch_size):
                rows = slice(start, min(start + batch_size, n))
                gens = ImageGenerators.for_images(seed, range(rows.start, rows.stop))
                x_T = latents[rows] if latents is not None else gens.randn(*shape)
                batch_cond: dict[str, Any] = {k: v[rows].to(self.device) for k, v in extra.items()}
                null: dict[str, Any] = dict(extra_null)
                if self.takes_text:
                    batch_cond.update(self._context(cond, rows, masked))
                    null.update(self._context(uncond, rows, masked) if uncond is not None else {})
                model = self._model_fn(s.guidance, null)
                if known is not None:
                    model, x_T = self._known(model, known, rows, x_T, gens)
                with self._autocast():
                    z = SAMPLERS[s.sampler](d, bar.counted(model), x_T.to(self.device, torch.float32),
                                            cond=batch_cond, generator=gens, clip_denoised=clip,
                                            threshold=s.threshold, **kwargs)
                    if known is not None:
                        z = model.finish(z)
                    images = self.vae.decode_latents(z.float())
                images = images.float().clamp(-1, 1).cpu()
                if known is not None:  # the known pixels exactly as given
                    img, mask = known[0][rows].float(), known[1][rows].float()
                    images = img * (1 - mask) + images * mask
                out.append(images)
        return torch.cat(out)

    def _condition_names(self) -> str:
        c = self.condition
        names = [n for n, on in (("text", self.takes_text), ("a segmentation map", c is not None and c.segmap),
                                 ("a layout", c is not None and c.layout),
                                 ("a class label", self.unet.cfg.num_classes is not None)) if on]
        return ", ".join(names) or "nothing (unconditional)"

    def _extra_conditions(self, n: int, shape: tuple[int, int, int], segmap: torch.Tensor | None,
                          layout: tuple[torch.Tensor, torch.Tensor] | None, labels: torch.Tensor | None = None
                          ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The map, layout and class-label keywords (N, ...) and their nulls for guidance."""
        c = self.condition
        extra: dict[str, torch.Tensor] = {}
        null: dict[str, Any] = {}
        classes = self.unet.cfg.num_classes
        if labels is not None and classes is None:
            raise ValueError(f"{self.model.path}: this model takes no class label (it is conditioned on "
                             f"{self._condition_names()})")
        if classes is not None:
            y = torch.full((n,), classes, dtype=torch.long) if labels is None else torch.as_tensor(labels).long()
            if y.shape != (n,) or int(y.min()) < 0 or int(y.max()) > classes:
                raise ValueError(f"labels must be (N,) = ({n},) class indices in 0..{classes - 1}, got "
                                 f"{tuple(y.shape)}")
            extra["y"], null["y"] = y, classes
        takes_map, takes_layout = c is not None and c.segmap, c is not None and c.layout
        if segmap is not None and not takes_map:
            raise ValueError(f"{self.model.path}: this model takes no segmentation map (it is conditioned on "
                             f"{self._condition_names()})")
        if layout is not None and not takes_layout:
            raise ValueError(f"{self.model.path}: this model takes no layout (it is conditioned on "
                             f"{self._condition_names()})")
        if takes_map:
            from ..conditioning.segmap import one_hot_map

            if segmap is None:
                extra["concat"] = torch.zeros(n, c.segmap_classes, shape[1], shape[2])
            else:
                if segmap.ndim != 3 or segmap.shape[0] not in (1, n):
                    raise ValueError(f"segmap must be (N, H, W) or (1, H, W) class labels, got {tuple(segmap.shape)}")
                extra["concat"] = one_hot_map(segmap.long(), c.segmap_classes, shape[1:]).expand(n, -1, -1, -1)
            null["concat"] = 0.0
        if takes_layout:
            if layout is None:
                extra["boxes"] = torch.zeros(n, 1, 4)
                extra["box_labels"] = torch.full((n, 1), -1, dtype=torch.long)
            else:
                boxes, labels = layout
                if boxes.ndim == 2:
                    boxes, labels = boxes[None], labels[None]
                extra["boxes"] = boxes.float().expand(n, -1, -1)
                extra["box_labels"] = labels.long().expand(n, -1)
            null["box_labels"] = -1
        return extra, null

    def _known(self, model: Any, known: tuple[torch.Tensor, torch.Tensor], rows: slice, x_T: torch.Tensor,
               gens: ImageGenerators) -> tuple[Any, torch.Tensor]:
        """Wrap the model so the known region's latents follow the forward process of the given image."""
        from ..conditioning.inpaint import KnownLatents

        img, mask = known[0][rows].to(self.device).float(), known[1][rows].to(self.device).float()
        with torch.no_grad(), self._autocast():
            z0 = self.vae.encode_latents(img, sample=False).float()
        wrapped = KnownLatents(model, self.diffusion, z0, mask, x_T.to(self.device, torch.float32))
        return wrapped, x_T

    def _context(self, emb: TextEmbedding, rows: slice, masked: bool) -> dict[str, torch.Tensor]:
        cond = {"context": emb.tokens[rows].to(self.device)}
        if masked:
            cond["context_mask"] = emb.mask[rows].to(self.device)
        return cond

    def __call__(self, prompts: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None, *,
                 seed: int = 0, progress: bool = True, **overrides: Any) -> PipelineOutput:
        """`pipe("a cat", steps=25, guidance=5).images`: keyword arguments named like SampleSettings fields
        override DEFAULT_SETTINGS, the rest (height, width, latents, batch_size) go to `generate`."""
        names = set(SampleSettings.__dataclass_fields__)
        s = replace(DEFAULT_SETTINGS, **{k: v for k, v in overrides.items() if k in names})
        rest = {k: v for k, v in overrides.items() if k not in names}
        x = self.generate(prompts, negative_prompt, s, seed=seed, progress=progress, **rest)
        return PipelineOutput(to_pil(x), x)


def load_latent_model(path: str | Path, *, ema: bool = True) -> LatentDiffusionModel:
    """A latent diffusion model pakhsh trained (run, checkpoint or exported folder, or a shipped name) -> the
    bundle the pipeline runs: its UNet (EMA weights), the autoencoder its checkpoint holds with the measured scale
    factor, and its text encoder (if it takes text)."""
    from ..nets.autoencoder import build_autoencoder
    from ..training.checkpoint import CheckpointError, check_fits, load_model, read_tensors
    from .base import resolve_model_path

    loaded = load_model(resolve_model_path(path), ema=ema)
    cfg = loaded.config
    if cfg.is_unclip:
        from .unconditional import unclip_part

        raise ValueError(f"{loaded.path} is {unclip_part(cfg)}, not a latent diffusion model; use `pakhsh unclip`")
    if not cfg.is_latent or cfg.latent is None:
        what = "an autoencoder" if cfg.is_autoencoder else "a pixel-space model"
        hint = "`pakhsh reconstruct`" if cfg.is_autoencoder else "`pakhsh sample` (or `pakhsh restore` for Palette)"
        raise ValueError(f"{loaded.path} is {what}, not a latent diffusion model; use {hint}")
    lat = cfg.latent
    if lat.autoencoder_config is None or lat.scale_factor is None:
        raise CheckpointError(f"{loaded.path / 'config.json'}: latent.autoencoder_config / scale_factor missing")
    vae = build_autoencoder(replace(lat.autoencoder_config, scaling_factor=lat.scale_factor), lat.autoencoder)
    ae_file = loaded.path / "autoencoder.safetensors"
    state = read_tensors(ae_file)
    check_fits(vae, state, ae_file)
    vae.load_state_dict(state)
    text = None
    if cfg.condition is not None and cfg.condition.text is not None:
        from ..conditioning.text import TextEncoder

        text = TextEncoder(cfg.condition.text)
        if cfg.dreambooth is not None:  # a DreamBooth model that learnt its identifier's input embedding
            from ..training.learnt_token import with_learnt_token

            text = with_learnt_token(text, cfg, loaded.model)
    m = cfg.model
    return LatentDiffusionModel(loaded.model, vae.eval(), text, cfg.diffusion, (m.image_size, m.image_size),
                                clip_denoised=False, path=loaded.path, config=cfg)
