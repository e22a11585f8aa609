"""Inference for DDPM / Improved DDPM image models (unconditional or class-conditional): sample, interpolate,
vary, and bits/dim -- from a shipped model name, a pakhsh run or checkpoint, a diffusers pipeline folder or an
improved-diffusion checkpoint (see `pipelines.base` for how `-m` is resolved)."""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from PIL import Image

from ..data import DataConfig
from ..diffusion import BpdReport, GaussianDiffusion, dataset_bpd
from ..samplers import SAMPLERS, ClassifierFreeGuidance, default_spacing, interpolate, resolve_spacing, vary
from ..samplers.common import ImageGenerators, StepProgress, steps_for
from ..training.checkpoint import LoadedModel
from ..training.experiment import ExperimentConfig
from .base import ResolvedModel, Source, pick_device, resolve_model, resolve_model_path, sampling_autocast, \
    shipped_models

__all__ = ["ImagePipeline", "PipelineOutput", "SampleSettings", "resolve_model_path", "shipped_models"]


def unclip_part(cfg: ExperimentConfig) -> str:
    """What part of unCLIP a config trains, for messages: "unCLIP's CLIP", "... prior", "... decoder"."""
    return "unCLIP's " + {"clip": "CLIP", "prior": "diffusion prior"}.get(cfg.objective, "decoder")


@dataclass
class SampleSettings:
    """How to sample: which sampler, how many steps, guidance."""

    # ancestral sampling is the default: on small, briefly trained models (the shipped ones) deterministic
    # samplers (DDIM eta=0, DPM-Solver++) leave residual noise in some samples that ancestral steps wash out
    sampler: str = "ddpm"  # "ddpm" | "ddim" | "dpm++2m" | "sde-dpm++2m"
    steps: int | None = 100  # None = all training steps
    eta: float = 0.0  # DDIM only
    guidance: float = 1.0  # classifier-free guidance scale (class-conditional models)
    clip_denoised: bool | None = None  # clamp x_0 to [-1, 1]; None: the model's own setting (True for pakhsh
    # and improved-diffusion models, a diffusers scheduler's clip_sample)
    threshold: float | None = None  # dynamic thresholding percentile instead of clipping
    spacing: str = "auto"  # which training steps `steps` visits: "uniform", "noise-dense" (see
    # pakhsh.samplers.default_spacing) or "auto", the pipeline's choice for the sampler (AUTO_SPACING)


@dataclass
class PipelineOutput:
    """What calling a pipeline returns (as diffusers pipelines do): PIL images, and the same as a tensor."""

    images: list[Image.Image]
    tensors: torch.Tensor  # (N, C, H, W) in [-1, 1]
    labels: torch.Tensor | None = None  # (N,) class labels of class-conditional models


def to_pil(x: torch.Tensor) -> list[Image.Image]:
    """(N, C, H, W) in [-1, 1] -> N PIL images (mode L for one channel, RGB for three)."""
    from ..imageio import to_uint8

    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in to_uint8(x)]


def _resolved(loaded: ResolvedModel | LoadedModel) -> ResolvedModel:
    """Older callers hand the pipeline a training LoadedModel: describe it as a ResolvedModel."""
    if isinstance(loaded, ResolvedModel):
        return loaded
    m = loaded.config.model
    return ResolvedModel(loaded.model, loaded.config.diffusion, (m.out_channels, m.image_size, m.image_size),
                         loaded.path, "pakhsh", weights=loaded.weights, num_classes=m.num_classes,
                         null_class=m.num_classes, config=loaded.config)


class ImagePipeline:
    """A trained image diffusion model ready to use. `ImagePipeline.from_pretrained("shapes")(4).images`."""

    # what spacing "auto" means per sampler (uniform for those not named). Measured with the shipped models at
    # 20 steps, n = 1,000 (docs/results/samplers.md): SDE-DPM-Solver++(2M) FID[fashion-net] 0.89 -> 0.58 (mean of
    # 3 seeds) with noise-dense steps, where the global layout of an unconditional image is decided
    AUTO_SPACING: dict[str, str] = {"sde-dpm++2m": "noise-dense"}

    def __init__(self, loaded: ResolvedModel | LoadedModel, device: str | torch.device = "auto",
                 bf16: bool = False) -> None:
        self.loaded = _resolved(loaded)
        cfg = self.loaded.config
        if type(self) is ImagePipeline and cfg is not None and cfg.task is not None:
            raise ValueError(f"{self.loaded.path} is an image-to-image (Palette, {cfg.task.name}) model: it restores "
                             "images given to it; use `pakhsh restore INPUT --task ... -m MODEL`")
        if cfg is not None and cfg.is_latent:
            raise ValueError(f"{self.loaded.path} is a latent diffusion model: use `pakhsh generate \"prompt\" -m "
                             "MODEL` (or `pakhsh inpaint`)")
        if cfg is not None and cfg.is_autoencoder:
            raise ValueError(f"{self.loaded.path} is an autoencoder, not a diffusion model: use `pakhsh reconstruct "
                             "-m MODEL IMAGES`")
        if cfg is not None and cfg.is_unclip:
            raise ValueError(f"{self.loaded.path} is {unclip_part(cfg)}: use `pakhsh unclip \"caption\"` (or "
                             "--variations / --interpolate)")
        self.device = pick_device(str(device))
        self.model = self.loaded.model.to(self.device).eval()
        self.config: ExperimentConfig | None = self.loaded.config  # None for diffusers / openai models
        self.diffusion = GaussianDiffusion.from_config(self.loaded.diffusion)
        self.bf16 = bf16

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path = "shapes", *, ema: bool = True, device: str = "auto",
                        bf16: bool = False, source: Source = "auto",
                        openai_flags: str | dict[str, Any] | None = None) -> "ImagePipeline":
        """A shipped name, pakhsh run/checkpoint, diffusers pipeline folder or improved-diffusion .pt (with
        `openai_flags`), as resolved by `pipelines.base.resolve_model`."""
        return cls(resolve_model(name_or_path, ema=ema, source=source, openai_flags=openai_flags), device, bf16)

    # ------------------------------------------------------------------ facts about the model
    @property
    def num_steps(self) -> int:
        """T, the number of training steps of the diffusion chain."""
        return self.diffusion.num_steps

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images the model makes."""
        return self.loaded.image_shape

    @property
    def num_classes(self) -> int | None:
        return self.loaded.num_classes

    @property
    def class_names(self) -> list[str] | None:
        return self.loaded.class_names

    @property
    def data(self) -> DataConfig | None:
        """The model's training data config, where it records one (pakhsh models)."""
        return self.loaded.data

    def require_data(self, purpose: str) -> DataConfig:
        """The training data config, or a ValueError saying that this model (diffusers/openai) has none."""
        if self.data is None:
            raise ValueError(f"{purpose} needs the model's dataset, but {self.loaded.path} ({self.loaded.kind} "
                             "format) does not record one")
        return self.data

    def data_image(self, spec: str) -> torch.Tensor:
        """`data:INDEX` -> (1, C, H, W): image INDEX of the model's test split; a bad INDEX is named with the range."""
        from dataclasses import replace

        from ..data import build_dataset

        data = self.require_data(f"{spec} (an image of the model's test split; give an image file instead)")
        ds = build_dataset(replace(data, split="test", random_flip=False))
        n = len(ds)
        valid = f"the model's test split ({data.name}) has {n} images: use data:0 .. data:{n - 1}"
        try:
            index = int(spec[5:])
        except ValueError:
            raise ValueError(f"{spec}: INDEX must be a whole number; {valid}") from None
        if not 0 <= index < n:
            raise ValueError(f"{spec}: index out of range; {valid}")
        return ds[index]["image"].unsqueeze(0)

    @classmethod
    def spacing_rule(cls, s: SampleSettings) -> str:
        """The spacing `s` walks: "uniform" or "noise-dense" ("auto" resolved for its sampler)."""
        return resolve_spacing(s.spacing, s.sampler, cls.AUTO_SPACING)

    def check_steps(self, steps: int | None, name: str = "steps") -> None:
        """Sampling steps must be a subset of the T training steps (None: all); more would silently mean all."""
        if steps is not None and not 1 <= steps <= self.num_steps:
            raise ValueError(f"{name} {steps}: this model has T={self.num_steps} training steps; "
                             f"use 1..{self.num_steps} (0 = all)")

    def check_t(self, t: int, name: str = "t") -> None:
        """The training step to restart/mix at must be in 0..T-1 (a larger one would silently mean T-1)."""
        if not 0 <= t < self.num_steps:
            raise ValueError(f"{name} {t}: must be a training step in 0..{self.num_steps - 1} "
                             f"for this model (T={self.num_steps})")

    def label_index(self, label: int | str, name: str = "label") -> int:
        """A class label given as a number or as one of the model's class names (case-insensitive)."""
        n = self.num_classes
        if n is None:
            raise ValueError(f"{name} {label}: this model is unconditional: it takes no class labels")
        text = str(label).strip()
        if text.lstrip("-").isdigit():
            index = int(text)
        else:
            names = [c.lower() for c in self.class_names or []]
            if not names:
                raise ValueError(f"{name} {text}: this model stores no class names; give a number 0..{n - 1}")
            if text.lower() not in names:
                known = ", ".join(f"{i}={c}" for i, c in enumerate(self.class_names or []))
                raise ValueError(f"{name} {text}: not a class of this model; its classes are {known}")
            index = names.index(text.lower())
        last = n if self.loaded.null_class == n else n - 1
        if not 0 <= index <= last:
            raise ValueError(f"{name} {index}: must be in 0..{last}" + (f" ({n} = no class)" if last == n else ""))
        return index

    # ------------------------------------------------------------------ helpers
    def _autocast(self) -> contextlib.AbstractContextManager:
        return sampling_autocast(self.device, self.bf16)

    def _model_fn(self, guidance: float) -> Any:
        null = self.loaded.null_class
        if guidance == 1.0:
            return self.model
        if null is None:
            what = "unconditional" if self.num_classes is None else "class-conditional without a null class"
            warnings.warn(f"guidance {guidance:g} has no effect: this model is {what}; sampling without guidance",
                          stacklevel=3)
            return self.model
        return ClassifierFreeGuidance(self.model, guidance, {"y": null},
                                      guided_channels=self.image_shape[0] if self.loaded.learn_sigma else None)

    def labels_for(self, labels: Sequence[int | str] | int | str | None, n: int) -> torch.Tensor | None:
        """The (n,) labels `generate` uses: one label (number or class name) for all, n of them, or None for
        labels 0, 1, ... cycling through the classes; None for unconditional models."""
        if self.num_classes is None:
            if labels is not None:
                raise ValueError("this model is unconditional: it takes no class labels")
            return None
        if labels is None:
            return torch.arange(n) % self.num_classes
        given = [labels] * n if isinstance(labels, (int, str)) else list(labels)
        if len(given) != n:
            raise ValueError(f"labels: give one label or {n} of them, got {len(given)}")
        return torch.tensor([self.label_index(v) for v in given], dtype=torch.long)

    def _clip(self, s: SampleSettings) -> bool:
        return self.loaded.clip_denoised if s.clip_denoised is None else s.clip_denoised

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate(self, n: int, settings: SampleSettings | None = None, *,
                 labels: Sequence[int | str] | int | str | None = None, seed: int = 0, batch_size: int = 64,
                 progress: bool = True) -> torch.Tensor:
        """n images (n, C, H, W) in [-1, 1].

        Image i depends only on (seed, i) and the settings: its starting noise and every step's noise come from
        its own generator, so `n=2` gives the first two images of `n=4`, whatever `batch_size`. The progress bar
        moves once per denoising step (with an ETA)."""
        s = settings or SampleSettings()
        if s.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {s.sampler!r}; known: {', '.join(SAMPLERS)}")
        _check_count(n, "n")
        _check_count(batch_size, "batch_size")
        self.check_steps(s.steps)
        spacing = default_spacing(s.sampler, s.steps, self.diffusion.num_steps, self.spacing_rule(s))
        d = self.diffusion.respace(spacing) if spacing else self.diffusion
        y_all = self.labels_for(labels, n)
        model = self._model_fn(s.guidance)
        kwargs: dict[str, Any] = {"eta": s.eta} if s.sampler == "ddim" else {}
        out = []
        desc = f"sampling {n} image{'s' * (n != 1)} ({s.sampler}, {d.num_steps} steps)"
        with StepProgress(steps_for(n, batch_size, d.num_steps), desc, progress) as bar:
            counted = bar.counted(model)
            for start in range(0, n, batch_size):
                b = min(batch_size, n - start)
                gens = ImageGenerators.for_images(seed, range(start, start + b))
                x_T = gens.randn(*self.image_shape).to(self.device)
                cond = {} if y_all is None else {"y": y_all[start : start + b].to(self.device)}
                with self._autocast():
                    x = SAMPLERS[s.sampler](d, counted, x_T, cond=cond, generator=gens, clip_denoised=self._clip(s),
                                            threshold=s.threshold, **kwargs)
                out.append(x.float().clamp(-1, 1).cpu())
        return torch.cat(out)

    def __call__(self, num_images: int = 1, settings: SampleSettings | None = None, *,
                 labels: Sequence[int | str] | int | str | None = None, seed: int = 0, batch_size: int = 64,
                 progress: bool = True, **setting_overrides: Any) -> PipelineOutput:
        """Sample like a diffusers pipeline: `pipe(4, sampler="ddim", steps=20).images` is a list of PIL images.

        Keyword arguments named like SampleSettings fields override `settings`."""
        s = settings or SampleSettings()
        known = {f.name for f in fields(SampleSettings)}
        unknown = sorted(set(setting_overrides) - known)
        if unknown:
            raise TypeError(f"unknown sampling setting(s) {unknown}; known: {sorted(known)}")
        s = SampleSettings(**{**{k: getattr(s, k) for k in known}, **setting_overrides})
        x = self.generate(num_images, s, labels=labels, seed=seed, batch_size=batch_size, progress=progress)
        y = self.labels_for(labels, num_images)
        return PipelineOutput(to_pil(x), x, y)

    def _chain(self, steps: int | None) -> GaussianDiffusion:
        spacing = default_spacing("ddpm", steps, self.diffusion.num_steps)
        return self.diffusion.respace(spacing) if spacing else self.diffusion

    @torch.no_grad()
    def interpolate(self, a: torch.Tensor, b: torch.Tensor, lambdas: Sequence[float], t: int, *,
                    steps: int | None = None, mixing: str = "linear", seed: int = 0,
                    label: int | str | None = None, progress: bool = False) -> torch.Tensor:
        """DDPM sec. 4.3 interpolation of two images (1, C, H, W) through x_t; returns (len(lambdas), C, H, W)."""
        if not lambdas:
            raise ValueError("interpolate needs at least one mixing weight (lambdas)")
        self.check_steps(steps)
        self.check_t(t)
        cond = self._single_cond(label, len(lambdas))
        chain = self._chain(steps)
        total = len(lambdas) * (_start_step(chain, t) + 1)  # each row is decoded on its own
        with StepProgress(total, f"interpolating ({len(lambdas)} images from t={t})", progress) as bar:
            with self._autocast():
                x = interpolate(chain, bar.counted(self._model_fn(1.0)), a.to(self.device), b.to(self.device),
                                lambdas, t, mixing=mixing, cond=_first(cond),  # type: ignore[arg-type]
                                generator=torch.Generator().manual_seed(seed))
        return x.float().clamp(-1, 1).cpu()

    @torch.no_grad()
    def vary(self, image: torch.Tensor, t: int, count: int, *, steps: int | None = None, seed: int = 0,
             label: int | str | None = None, progress: bool = False) -> torch.Tensor:
        """Variations of one image (1, C, H, W) from step t (e.g. 750 of 1000); returns (count, C, H, W)."""
        _check_count(count, "count")
        self.check_steps(steps)
        self.check_t(t)
        cond = self._single_cond(label, count)
        chain = self._chain(steps)
        with StepProgress(_start_step(chain, t) + 1, f"varying ({count} images from t={t})", progress) as bar:
            with self._autocast():
                x = vary(chain, bar.counted(self._model_fn(1.0)), image.to(self.device), t, count, cond=cond,
                         generator=torch.Generator().manual_seed(seed))
        return x.float().clamp(-1, 1).cpu()

    def _single_cond(self, label: int | str | None, n: int) -> dict[str, torch.Tensor]:
        """One label for every row; no label means the null class (or, without one, label 0 is refused)."""
        if self.num_classes is None:
            if label is not None:
                raise ValueError("this model is unconditional: it takes no class labels")
            return {}
        if label is None:
            if self.loaded.null_class is None:
                raise ValueError("this class-conditional model has no null class: give a label")
            y = self.loaded.null_class
        else:
            y = self.label_index(label)
        return {"y": torch.full((n,), y, dtype=torch.long, device=self.device)}

    # ------------------------------------------------------------------ likelihood
    @torch.no_grad()
    def nll(self, batches: Iterator[Any], *, max_images: int | None = None, seed: int = 0,
            progress: bool = True) -> BpdReport:
        """Bits/dim of the full variational bound (all T steps) over batches of 8-bit images in [-1, 1].

        Class-conditional models are evaluated given each image's label (batches must be dicts with "label").
        The progress bar moves once per timestep of each batch (T per batch)."""
        if max_images is not None:
            _check_count(max_images, "max_images")
        cond_fn = None if self.num_classes is None else (lambda b: {"y": b["label"]})
        desc = f"bits/dim ({self.num_steps} timesteps per batch)"
        with StepProgress(None, desc, progress, unit="t") as bar:
            first = _peek(batches)
            if first is not None and max_images is not None:
                size = first[0]["image"].shape[0] if isinstance(first[0], dict) else first[0].shape[0]
                bar.set_total(math.ceil(max_images / size) * self.num_steps)
            stream = first[1] if first is not None else iter(())
            return dataset_bpd(self.diffusion, bar.counted(self.model), stream, max_images=max_images,
                               device=self.device, generator=torch.Generator().manual_seed(seed), progress=False,
                               cond_fn=cond_fn)


def _peek(batches: Iterator[Any]) -> tuple[Any, Iterator[Any]] | None:
    """(first batch, an iterator over all batches) or None when there are none."""
    it = iter(batches)
    try:
        first = next(it)
    except StopIteration:
        return None

    def chained() -> Iterator[Any]:
        yield first
        yield from it

    return first, chained()


def _start_step(chain: GaussianDiffusion, t: int) -> int:
    """The chain index editing restarts from for training step t (see samplers.editing.chain_step_for)."""
    from ..samplers.editing import chain_step_for

    return chain_step_for(chain, t)


def _check_count(value: int, name: str) -> None:
    """Counts of images must be positive: 0 would fail later as an empty torch.cat or a zero range step."""
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def _first(cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """interpolate decodes one row at a time: each row gets a batch-of-one condition."""
    return {k: v[:1] for k, v in cond.items()}
