"""Model resolution, in one place: `-m SPEC` -> a model callable, its diffusion, and what it was trained on.

SPEC is one of
  - a shipped model name ("shapes", "fashion_mnist"),
  - a pakhsh run folder (its newest complete checkpoint), checkpoint folder or exported model folder,
  - a diffusers pipeline folder (model_index.json, unet/ with a UNet2DModel, scheduler/): the scheduler config
    gives the diffusion (betas, prediction type, variance, clipping),
  - an openai/improved-diffusion or guided-diffusion `.pt` state dict, with the flags it was trained with.
Every pipeline, `pakhsh info` and `pakhsh eval` go through `resolve_model`, so each accepts all of them.
The pipelines' device and precision choice live here too: `pick_device` ("auto", "cuda:1", ... with one-line
errors) and `sampling_autocast` (their `bf16=True`).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..data import DataConfig
from ..diffusion import DiffusionConfig, VarianceType
from ..training.experiment import ExperimentConfig

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "models"
SOURCES = ("auto", "pakhsh", "diffusers", "openai")
Source = Literal["auto", "pakhsh", "diffusers", "openai"]


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


def sampling_autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """The pipelines' `bf16=True`: bf16 autocast on `device` (CPU or GPU) around the network calls; the samplers'
    own arithmetic on their fp32 tensors stays fp32. A no-op context when bf16 is off."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


class ModelSourceError(ValueError):
    """A model spec that cannot be resolved; the message names the path and what to give instead."""


@dataclass
class ResolvedModel:
    """A model ready for a pipeline, whatever format it came in."""

    model: nn.Module  # model(x_t, t, **cond) -> Tensor, t in training steps 0..T-1
    diffusion: DiffusionConfig
    image_shape: tuple[int, int, int]  # (C, H, W) of the images it makes
    path: Path  # the folder or file the weights came from
    kind: Literal["pakhsh", "diffusers", "openai"]
    weights: str = "model"  # which weights: "model", "ema_<rate>", ...
    num_classes: int | None = None  # class-conditional: labels 0 .. num_classes - 1 are classes
    null_class: int | None = None  # the label meaning "no class" (classifier-free guidance), if the model has one
    clip_denoised: bool = True  # clamp predicted x_0 to [-1, 1] while sampling
    config: ExperimentConfig | None = None  # pakhsh models: the full experiment config
    class_names: list[str] | None = None  # names of labels 0 .. num_classes - 1, where stored
    details: dict[str, Any] = field(default_factory=dict)  # format-specific facts for `pakhsh info`

    @property
    def data(self) -> DataConfig | None:
        """The training data config, where the model records it (pakhsh models)."""
        return self.config.data if self.config is not None else None

    @property
    def learn_sigma(self) -> bool:
        return VarianceType(self.diffusion.variance) == VarianceType.LEARNED_RANGE


def shipped_models() -> list[str]:
    """Names of the pretrained models inside the package (e.g. "shapes", "fashion_mnist")."""
    return sorted(p.name for p in ASSETS.iterdir() if (p / "model.safetensors").is_file()) if ASSETS.is_dir() else []


def model_kind(name_or_path: str | Path) -> Literal["image", "palette", "latent", "autoencoder", "unclip", "other"]:
    """What a pakhsh model does, from its config alone (no weights read): image diffusion (`pakhsh sample`),
    Palette (`restore`), latent diffusion (`generate`), an autoencoder (`reconstruct`) or a part of unCLIP
    (`unclip`); "other" for foreign formats."""
    from ..training.checkpoint import read_config, resolve_checkpoint

    path = resolve_model_path(name_or_path)
    if detect_source(path) != "pakhsh":
        return "other"
    cfg = read_config(resolve_checkpoint(path))
    if cfg.is_autoencoder:
        return "autoencoder"
    if cfg.is_unclip:
        return "unclip"
    if cfg.is_latent:
        return "latent"
    return "palette" if cfg.task is not None else "image"


def resolve_model_path(name_or_path: str | Path) -> Path:
    """A shipped model name or a filesystem path (run dir, checkpoint folder, exported model, diffusers folder,
    .pt file)."""
    p = Path(name_or_path).expanduser()
    if p.exists():
        return p
    if str(name_or_path) and (ASSETS / str(name_or_path)).is_dir():
        return ASSETS / str(name_or_path)
    raise FileNotFoundError(
        f"no model at {name_or_path!r}: give a run or checkpoint folder, a diffusers pipeline folder, an "
        f"improved-diffusion .pt file, or one of the shipped models {shipped_models()}"
    )


def detect_source(path: Path) -> Literal["pakhsh", "diffusers", "openai"]:
    """Which format a resolved path holds; folders and files that are none of them raise ModelSourceError."""
    if path.is_file():
        if path.suffix in (".pt", ".pth", ".ckpt", ".bin"):
            return "openai"
        raise ModelSourceError(f"{path}: a model file must be an improved/guided-diffusion .pt state dict; "
                               "pakhsh models are folders (config.json + model.safetensors)")
    if (path / "model_index.json").is_file():
        return "diffusers"
    if _is_diffusers_component(path / "config.json"):
        raise ModelSourceError(f"{path} is a diffusers component folder without a scheduler: give the pipeline "
                               "folder above it (model_index.json, unet/, scheduler/)")
    return "pakhsh"


def resolve_model(spec: str | Path, *, ema: bool = True, source: Source = "auto",
                  openai_flags: str | dict[str, Any] | None = None) -> ResolvedModel:
    """`-m SPEC` -> a ResolvedModel (see the module docstring). `source` forces a format instead of detecting
    it; `openai_flags` (a string of flags, a flags/JSON file, or a dict) are needed for .pt files."""
    if source not in SOURCES:
        raise ModelSourceError(f"unknown model format {source!r}; use one of {', '.join(SOURCES)}")
    path = resolve_model_path(spec)
    kind = detect_source(path) if source == "auto" else source
    if openai_flags is not None and kind != "openai":
        raise ModelSourceError(f"--openai-flags given, but {spec} is a {kind} model (flags are for .pt files)")
    if kind == "openai":
        return _openai(path, openai_flags)
    if kind == "diffusers":
        return _diffusers(path)
    return _pakhsh(path, ema)


# ---------------------------------------------------------------------------------------------- formats
def _pakhsh(path: Path, ema: bool) -> ResolvedModel:
    from ..training.checkpoint import load_model

    loaded = load_model(path, ema=ema)
    cfg = loaded.config
    m = cfg.model
    return ResolvedModel(
        loaded.model, cfg.diffusion, (m.out_channels, m.image_size, m.image_size), loaded.path, "pakhsh",
        weights=loaded.weights, num_classes=m.num_classes, null_class=m.num_classes, config=cfg,
        class_names=_pakhsh_class_names(loaded.path, cfg),
    )  # fmt: skip


def _is_diffusers_component(config: Path) -> bool:
    """A diffusers model/scheduler config (it names its class under "_class_name"), not a pakhsh one. The JSON is
    parsed: a path or value that merely contains the text must not decide it."""
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text(errors="replace"))
    except ValueError:
        return False  # unreadable: the pakhsh loader reports it with its own message
    return isinstance(data, dict) and "_class_name" in data


CLASS_NAMES_FILE = "class_names.json"  # optional, beside config.json: a JSON list, name of label i at index i


def _pakhsh_class_names(folder: Path, cfg: ExperimentConfig) -> list[str] | None:
    """Class names of a class-conditional pakhsh model, the first of: `class_names` in its config.json (top level
    or under data, for runs that save them there), a class_names.json list beside it, the built-in dataset's own
    names. None when none is there or the count differs from num_classes (numbers still work)."""
    n = cfg.model.num_classes
    if n is None:
        return None
    for names in (_saved_class_names(folder / "config.json"), _saved_class_names(folder / CLASS_NAMES_FILE),
                  getattr(cfg, "class_names", None), getattr(cfg.data, "class_names", None),
                  _builtin_class_names(cfg.data.name)):
        if names and len(names) == n:
            return [str(x) for x in names]
    return None


def _saved_class_names(path: Path) -> list[str] | None:
    """A list of names: the JSON file itself, or its "class_names" (top level or under "data")."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if isinstance(raw, dict):
        raw = raw.get("class_names") or (raw.get("data") or {}).get("class_names")
    return raw if isinstance(raw, list) else None


def _builtin_class_names(dataset: str) -> list[str] | None:
    """Names the built-in datasets declare on their class (no data is read)."""
    try:
        if dataset == "shapes":
            from ..data.builtin.shapes import ShapesDataset as cls
        elif dataset == "fashion_mnist":
            from ..data.builtin.fashion_mnist import FashionMNIST as cls  # type: ignore[no-redef]
        elif dataset == "digits":
            from ..data.builtin.digits import Digits as cls  # type: ignore[no-redef]
        else:
            return None
    except ImportError:  # an optional dependency of that dataset is missing: names are a nicety
        return None
    names = getattr(cls, "class_names", None)
    return list(names) if names else None


def _diffusers(path: Path) -> ResolvedModel:
    from ..interop.diffusers import load_diffusers_pipeline

    p = load_diffusers_pipeline(path)
    return ResolvedModel(
        p.model, p.settings.diffusion, p.image_shape, path, "diffusers", num_classes=p.num_classes,
        null_class=p.null_class, clip_denoised=p.settings.clip_denoised, class_names=p.class_names,
        details={"unet": dict(p.model.config)},
    )  # fmt: skip


def _openai(path: Path, flags: str | dict[str, Any] | None) -> ResolvedModel:
    from ..interop.openai import load_openai_checkpoint

    if flags is None:
        raise ModelSourceError(f"{path}: an improved/guided-diffusion checkpoint needs the flags it was trained "
                               "with: --openai-flags \"--image_size 64 --num_channels 128 ...\" (or a file of them)")
    model, cfg = load_openai_checkpoint(path, flags)
    u = cfg.unet
    return ResolvedModel(
        model, cfg.diffusion, (u.out_channels, u.image_size, u.image_size), path, "openai",
        num_classes=u.num_classes, null_class=None,
        details={"unet": u, "rescale_timesteps": cfg.rescale_timesteps},
    )  # fmt: skip
