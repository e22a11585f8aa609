"""Inference for DDPM / Improved DDPM image models (unconditional or class-conditional): sample, interpolate,
vary, and bits/dim -- all from one checkpoint folder or a shipped model name."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from ..diffusion import BpdReport, GaussianDiffusion, dataset_bpd
from ..samplers import SAMPLERS, ClassifierFreeGuidance, default_spacing, interpolate, vary
from ..training.checkpoint import LoadedModel, load_model
from ..training.experiment import ExperimentConfig

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "models"


def shipped_models() -> list[str]:
    """Names of the pretrained models inside the package (e.g. "shapes", "fashion_mnist")."""
    return sorted(p.name for p in ASSETS.iterdir() if (p / "model.safetensors").is_file()) if ASSETS.is_dir() else []


def resolve_model_path(name_or_path: str | Path) -> Path:
    """A shipped model name or a filesystem path (run dir, checkpoint folder or exported model)."""
    p = Path(name_or_path)
    if p.exists():
        return p
    if (ASSETS / str(name_or_path)).is_dir():
        return ASSETS / str(name_or_path)
    raise FileNotFoundError(
        f"no model at {name_or_path!r}: give a checkpoint folder or one of the shipped models {shipped_models()}"
    )


def pick_device(device: str | torch.device = "auto", name: str = "device") -> torch.device:
    """The one place device strings are resolved: "auto" (cuda when available, else cpu), "cpu", "cuda", "cuda:N",
    "mps", ... A device this PyTorch build or machine lacks raises ValueError with advice here, instead of an
    AssertionError deep inside `.to()`. `name` is how messages refer to the setting (the CLI passes "--device")."""
    spec = str(device).strip()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ValueError(f"{name} {spec}: not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        _check_cuda(dev, name)
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{name} {spec}: MPS is not available here; use {name} cpu or auto")
    return dev


def _check_cuda(dev: torch.device, name: str) -> None:
    if not torch.cuda.is_available():
        why = "this PyTorch build has no CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise ValueError(f"{name} {dev}: {why} (torch.cuda.is_available() is False); use {name} cpu or auto")
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise ValueError(f"{name} {dev}: there are {count} CUDA device(s) here: use cuda:0 .. cuda:{count - 1}")


@dataclass
class SampleSettings:
    """How to sample: which sampler, how many steps, guidance."""

    # ancestral sampling is the default: on small, briefly trained models (the shipped ones) deterministic
    # samplers (DDIM eta=0, DPM-Solver++) leave residual noise in some samples that ancestral steps wash out
    sampler: str = "ddpm"  # "ddpm" | "ddim" | "dpm++2m"
    steps: int | None = 100  # None = all training steps
    eta: float = 0.0  # DDIM only
    guidance: float = 1.0  # classifier-free guidance scale (class-conditional models)
    clip_denoised: bool = True
    threshold: float | None = None  # dynamic thresholding percentile instead of clipping


class ImagePipeline:
    """A trained image diffusion model ready to use. `ImagePipeline.from_pretrained("shapes").generate(16)`."""

    def __init__(self, loaded: LoadedModel, device: str | torch.device = "auto", bf16: bool = False) -> None:
        self.loaded = loaded
        self.device = pick_device(str(device))
        self.model = loaded.model.to(self.device).eval()
        self.config: ExperimentConfig = loaded.config
        self.diffusion = GaussianDiffusion.from_config(self.config.diffusion)
        self.bf16 = bf16

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path = "shapes", *, ema: bool = True, device: str = "auto",
                        bf16: bool = False) -> "ImagePipeline":
        return cls(load_model(resolve_model_path(name_or_path), ema=ema), device, bf16)

    @property
    def num_steps(self) -> int:
        """T, the number of training steps of the diffusion chain."""
        return self.diffusion.num_steps

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

    @property
    def image_shape(self) -> tuple[int, int, int]:
        m = self.config.model
        return (m.out_channels, m.image_size, m.image_size)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _model_fn(self, guidance: float) -> Any:
        m = self.config.model
        if m.num_classes is None or guidance == 1.0:
            return self.model
        return ClassifierFreeGuidance(self.model, guidance, {"y": m.num_classes},
                                      guided_channels=m.out_channels if m.learn_sigma else None)

    def _labels(self, labels: Sequence[int] | int | None, n: int) -> torch.Tensor | None:
        m = self.config.model
        if m.num_classes is None:
            if labels is not None:
                raise ValueError("this model is unconditional: it takes no class labels")
            return None
        if labels is None:
            return torch.arange(n) % m.num_classes
        y = torch.tensor([labels] * n if isinstance(labels, int) else list(labels), dtype=torch.long)
        if y.shape[0] != n or y.min() < 0 or y.max() > m.num_classes:
            raise ValueError(f"labels must be {n} values in [0, {m.num_classes}] ({m.num_classes} = unconditional)")
        return y

    @torch.no_grad()
    def generate(self, n: int, settings: SampleSettings | None = None, *, labels: Sequence[int] | int | None = None,
                 seed: int = 0, batch_size: int = 64, progress: bool = True) -> torch.Tensor:
        """n images (n, C, H, W) in [-1, 1]. The same (seed, batch_size, settings) gives the same images."""
        s = settings or SampleSettings()
        if s.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {s.sampler!r}; known: {', '.join(SAMPLERS)}")
        _check_count(n, "n")
        _check_count(batch_size, "batch_size")
        self.check_steps(s.steps)
        spacing = default_spacing(s.sampler, s.steps, self.diffusion.num_steps)
        d = self.diffusion.respace(spacing) if spacing else self.diffusion
        y_all = self._labels(labels, n)
        model = self._model_fn(s.guidance)
        g = torch.Generator().manual_seed(seed)
        out = []
        bar = tqdm(total=n, disable=not progress, desc=f"sampling ({s.sampler}, {d.num_steps} steps)", unit="img")
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            x_T = torch.randn(b, *self.image_shape, generator=g).to(self.device)
            cond = {} if y_all is None else {"y": y_all[start : start + b].to(self.device)}
            kwargs: dict[str, Any] = {"eta": s.eta} if s.sampler == "ddim" else {}
            with self._autocast():
                x = SAMPLERS[s.sampler](d, model, x_T, cond=cond, generator=g, clip_denoised=s.clip_denoised,
                                        threshold=s.threshold, **kwargs)
            out.append(x.float().clamp(-1, 1).cpu())
            bar.update(b)
        bar.close()
        return torch.cat(out)

    def _chain(self, steps: int | None) -> GaussianDiffusion:
        spacing = default_spacing("ddpm", steps, self.diffusion.num_steps)
        return self.diffusion.respace(spacing) if spacing else self.diffusion

    @torch.no_grad()
    def interpolate(self, a: torch.Tensor, b: torch.Tensor, lambdas: Sequence[float], t: int, *,
                    steps: int | None = None, mixing: str = "linear", seed: int = 0,
                    label: int | None = None) -> torch.Tensor:
        """DDPM sec. 4.3 interpolation of two images (1, C, H, W) through x_t; returns (len(lambdas), C, H, W)."""
        if not lambdas:
            raise ValueError("interpolate needs at least one mixing weight (lambdas)")
        self.check_steps(steps)
        self.check_t(t)
        cond = self._single_cond(label, len(lambdas))
        with self._autocast():
            x = interpolate(self._chain(steps), self._model_fn(1.0), a.to(self.device), b.to(self.device),
                            lambdas, t, mixing=mixing, cond=_first(cond), generator=torch.Generator().manual_seed(seed))  # type: ignore[arg-type]
        return x.float().clamp(-1, 1).cpu()

    @torch.no_grad()
    def vary(self, image: torch.Tensor, t: int, count: int, *, steps: int | None = None, seed: int = 0,
             label: int | None = None) -> torch.Tensor:
        """Variations of one image (1, C, H, W) from step t (e.g. 750 of 1000); returns (count, C, H, W)."""
        _check_count(count, "count")
        self.check_steps(steps)
        self.check_t(t)
        cond = self._single_cond(label, count)
        with self._autocast():
            x = vary(self._chain(steps), self._model_fn(1.0), image.to(self.device), t, count, cond=cond,
                     generator=torch.Generator().manual_seed(seed))
        return x.float().clamp(-1, 1).cpu()

    def _single_cond(self, label: int | None, n: int) -> dict[str, torch.Tensor]:
        m = self.config.model
        if m.num_classes is None:
            return {}
        y = m.num_classes if label is None else label  # no label given: the null (unconditional) class
        return {"y": torch.full((n,), y, dtype=torch.long, device=self.device)}

    @torch.no_grad()
    def nll(self, batches: Iterator[Any], *, max_images: int | None = None, seed: int = 0,
            progress: bool = True) -> BpdReport:
        """Bits/dim of the full variational bound (all T steps) over batches of 8-bit images in [-1, 1].

        Class-conditional models are evaluated given each image's label (batches must be dicts with "label")."""
        if max_images is not None:
            _check_count(max_images, "max_images")
        cond_fn = None if self.config.model.num_classes is None else (lambda b: {"y": b["label"]})
        return dataset_bpd(self.diffusion, self.model, batches, max_images=max_images, device=self.device,
                           generator=torch.Generator().manual_seed(seed), progress=progress, cond_fn=cond_fn)


def _check_count(value: int, name: str) -> None:
    """Counts of images must be positive: 0 would fail later as an empty torch.cat or a zero range step."""
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def _first(cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """interpolate decodes one row at a time: each row gets a batch-of-one condition."""
    return {k: v[:1] for k, v in cond.items()}
