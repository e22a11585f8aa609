"""Text-to-image with a latent diffusion model: prompts -> text context -> any pakhsh sampler over latents, with
classifier-free guidance against the empty (or negative) prompt -> VAE decode -> images in [-1, 1].

`TextToImagePipeline.from_pretrained(folder)` takes a local diffusers Stable Diffusion folder
(`interop.stable_diffusion.load_sd_folder`); any `LatentDiffusionModel` bundle works. With DDIM at eta = 0 and
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
from ..samplers import SAMPLERS, ClassifierFreeGuidance, default_spacing
from ..samplers.common import ImageGenerators, StepProgress, steps_for
from .unconditional import PipelineOutput, SampleSettings, pick_device, to_pil

Spacing = Literal["scheduler", "pakhsh"]
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
    def from_pretrained(cls, path: str | Path, *, device: str = "auto", bf16: bool = False,
                        spacing: Spacing = "scheduler") -> "TextToImagePipeline":
        """A local diffusers Stable Diffusion folder (see `interop.stable_diffusion.load_sd_folder`)."""
        return cls(load_sd_folder(path), device, bf16, spacing)

    # ------------------------------------------------------------------ pieces
    def chain(self, settings: SampleSettings) -> GaussianDiffusion:
        """The respaced diffusion `settings` sample over (the scheduler's timesteps or pakhsh's spacing)."""
        T, steps = self.diffusion.num_steps, settings.steps
        if steps is not None and not 1 <= steps <= T:
            raise ValueError(f"steps {steps}: this model has T={T} training steps; use 1..{T}")
        m = self.model
        if self.spacing == "scheduler" and m.timestep_spacing is not None and steps is not None:
            return self.diffusion.respace(scheduler_timesteps(m.timestep_spacing, m.steps_offset, T, steps))
        spacing = default_spacing(settings.sampler, steps, T)
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
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _model_fn(self, guidance: float, null: dict[str, torch.Tensor]) -> Any:
        # guidance 1 is the conditional model alone (one UNet pass, as diffusers does for scale <= 1)
        return self.unet if guidance == 1.0 else ClassifierFreeGuidance(self.unet, guidance, null)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate(self, prompts: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None,
                 settings: SampleSettings | None = None, *, seed: int = 0, height: int | None = None,
                 width: int | None = None, latents: torch.Tensor | None = None, batch_size: int = 8,
                 progress: bool = True) -> torch.Tensor:
        """One image per prompt: (N, 3, H, W) in [-1, 1] on the CPU.

        Guidance (settings.guidance, 7.5 by default) pushes each prompt's prediction away from its negative prompt
        (one for all or one per prompt; default the empty prompt). `latents` (N, C, h, w) are the starting noise;
        without them image i draws its own from (seed, i), as do stochastic samplers' steps, so an image does not
        depend on `batch_size` or on the other prompts."""
        s = settings or DEFAULT_SETTINGS
        if s.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {s.sampler!r}; known: {', '.join(SAMPLERS)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        texts = _prompt_list(prompts, "prompts")
        n = len(texts)
        negatives = [""] * n if negative_prompt is None else _prompt_list(negative_prompt, "negative_prompt")
        if len(negatives) == 1:
            negatives *= n
        if len(negatives) != n:
            raise ValueError(f"negative_prompt: give one or {n} (one per prompt), got {len(negatives)}")
        shape = self.latent_shape(height, width)
        if latents is not None and tuple(latents.shape) != (n, *shape):
            raise ValueError(f"latents must be {(n, *shape)} (N, C, h, w), got {tuple(latents.shape)}")
        d = self.chain(s)
        cond = self.encode(texts)
        uncond = self.encode(negatives) if s.guidance != 1.0 else None
        # All-True masks (SD's CLIP context) are left out: the UNet then attends to every token, as SD does.
        masked = not cond.mask.all() or (uncond is not None and not uncond.mask.all())
        clip = self.model.clip_denoised if s.clip_denoised is None else s.clip_denoised
        kwargs: dict[str, Any] = {"eta": s.eta} if s.sampler == "ddim" else {}
        out = []
        desc = f"text-to-image: {n} image{'s' * (n != 1)} ({s.sampler}, {d.num_steps} steps)"
        with StepProgress(steps_for(n, batch_size, d.num_steps), desc, progress) as bar:
            for start in range(0, n, batch_size):
                rows = slice(start, min(start + batch_size, n))
                gens = ImageGenerators.for_images(seed, range(rows.start, rows.stop))
                x_T = latents[rows] if latents is not None else gens.randn(*shape)
                batch_cond = self._context(cond, rows, masked)
                null = self._context(uncond, rows, masked) if uncond is not None else {}
                with self._autocast():
                    z = SAMPLERS[s.sampler](d, bar.counted(self._model_fn(s.guidance, null)),
                                            x_T.to(self.device, torch.float32), cond=batch_cond, generator=gens,
                                            clip_denoised=clip, threshold=s.threshold, **kwargs)
                    images = self.vae.decode_latents(z.float())
                out.append(images.float().clamp(-1, 1).cpu())
        return torch.cat(out)

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
