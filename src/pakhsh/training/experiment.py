"""The experiment config: one dataclass per component, gathered; read from YAML + `--set` overrides."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..data import DataConfig
from ..diffusion import DiffusionConfig
from ..config import ConfigError, apply_overrides, from_dict, load_yaml
from ..nets.unet import UNetConfig
from ..tasks import TASK_NAMES, TaskConfig


MAX_LR = 1.0
DEVICE_RE = re.compile(r"auto|cpu|cuda(:\d+)?")


@dataclass
class TrainConfig:
    """The optimisation loop: what minGPT's trainer and iDDPM's TrainLoop take, with pakhsh defaults."""

    steps: int = 10000  # optimizer steps
    batch_size: int = 64  # global batch (split over processes) per optimizer step, before accumulation
    grad_accum: int = 1  # micro-batches per optimizer step (effective batch = batch_size * grad_accum)
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 200  # linear learning-rate warm-up
    grad_clip: float = 1.0  # max global gradient norm (0 = off)
    ema_rates: tuple[float, ...] = (0.9999,)
    ema_warmup: bool = True  # cap the EMA rate at (1+step)/(10+step) early on (helps short runs)
    sample_ema: float | None = None  # which EMA previews and exports use (default: the first rate)
    # autocast dtype (fp16 on GPU only); auto: bf16 where the device runs it natively, else no (see precision.py)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    timestep_sampler: Literal["uniform", "loss-aware"] = "uniform"
    class_dropout: float = 0.1  # class-conditional models: labels replaced by the null class (for CFG)
    seed: int = 0
    log_every: int = 50
    save_every: int = 1000
    sample_every: int = 1000  # preview grid of EMA samples (0 = never)
    num_preview: int = 16
    preview_steps: int = 100  # ancestral sampling steps of the preview grids
    keep_last: int = 3  # checkpoints kept on disk
    out_dir: str | None = None  # None: runs/<name>
    device: str = "auto"  # "auto" lets accelerate choose (GPU when present)
    num_workers: int | None = None  # loader processes; None: auto (spare cores on a GPU, 0 on a CPU)

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        self.ema_rates = tuple(self.ema_rates)
        checks = {
            "steps": self.steps >= 1, "batch_size": self.batch_size >= 1, "grad_accum": self.grad_accum >= 1,
            "warmup_steps": self.warmup_steps >= 0, "save_every": self.save_every >= 1,
            "keep_last": self.keep_last >= 1, "class_dropout": 0 <= self.class_dropout < 1,
            "ema_rates": len(self.ema_rates) >= 1, "log_every": self.log_every >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"train.{name} has an invalid value: {getattr(self, name)!r}")
        if self.sample_ema is not None and self.sample_ema not in self.ema_rates:
            raise ValueError(f"train.sample_ema {self.sample_ema} is not one of train.ema_rates {self.ema_rates}")
        # AdamW steps are about lr in size whatever the gradient: lr > 1 blows the weights up within a step
        if not 0 < self.lr <= MAX_LR:
            raise ValueError(f"train.lr={self.lr!r} is out of range: use a learning rate in (0, {MAX_LR:g}] "
                             "(diffusion models train with about 1e-4)")
        if not DEVICE_RE.fullmatch(str(self.device)):
            raise ValueError(f"train.device={self.device!r} is not a device: use auto, cpu, cuda or cuda:N")

    @property
    def preview_ema(self) -> float:
        return self.sample_ema if self.sample_ema is not None else self.ema_rates[0]


@dataclass
class ExperimentConfig:
    """Everything one training run needs; saved as config.json beside every checkpoint."""

    name: str | None = None  # None: the image folder's name for data.name=folder, else "experiment"
    data: DataConfig = field(default_factory=DataConfig)
    model: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # names of labels 0..N-1: recorded from the dataset when training starts, so pipelines take `--label cat`
    class_names: list[str] | None = None
    # image-to-image (Palette): the degradation the model learns to undo; None for unconditional / class models
    task: TaskConfig | None = None
    # Palette only: "diffusion", or "regression" (the same net maps the degraded image to x_0 in one pass: the
    # paper's baseline)
    objective: Literal["diffusion", "regression"] = "diffusion"

    def __post_init__(self) -> None:
        if self.name is None:
            self.name = _folder_name(self.data) or DEFAULT_NAME
        if self.train.out_dir is None:
            self.train.out_dir = f"runs/{self.name}"
        if self.task is None:
            if self.objective != "diffusion":
                raise ValueError(f"objective={self.objective} needs an image-to-image task (task.name=...)")
        else:
            _check_task_model(self.task, self.model)


def _check_task_model(task: TaskConfig, model: UNetConfig) -> None:
    """A Palette net takes [x_t, degraded image, mask]; a multi-task one also the task as its label."""
    want = model.in_channels + 1
    if model.cond_channels != want:
        raise ValueError(f"task.name={task.name} needs model.cond_channels={want} (the degraded image's "
                         f"{model.in_channels} channels + the mask), got {model.cond_channels}")
    if model.in_channels != model.out_channels:
        raise ValueError(f"task.name={task.name}: model.in_channels={model.in_channels} must equal "
                         f"model.out_channels={model.out_channels}")
    if task.name == "multi" and model.num_classes != len(TASK_NAMES):
        raise ValueError(f"task.name=multi takes the task as a label: set model.num_classes={len(TASK_NAMES)} "
                         f"({', '.join(TASK_NAMES)}), got {model.num_classes}")
    if task.name != "multi" and model.num_classes is not None:
        raise ValueError(f"task.name={task.name} is one task: set model.num_classes=null (or task.name=multi)")


DEFAULT_NAME = "experiment"
# the configs shipped inside the package: `pakhsh train NAME` finds them from any directory
SHIPPED_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _folder_name(data: DataConfig) -> str | None:
    """The image folder's own name (`/data/pets/` -> "pets"), for runs on data.name=folder."""
    if data.name != "folder" or not data.path:
        return None
    return Path(data.path).expanduser().resolve().name or None


def load_experiment(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """YAML file or shipped config name (or defaults) + `key.sub=value` overrides -> a checked ExperimentConfig.

    A run switched onto an image folder by the overrides (`pakhsh train shapes --set data.name=folder ...`) is
    named after the folder: the YAML's name describes the dataset the YAML was written for."""
    data: dict[str, Any] = load_yaml(resolve_config(path)) if path else {}
    merged = apply_overrides(data, overrides or [])
    if _name_is_about_another_dataset(data, merged, overrides or []):
        merged.pop("name", None)
    return from_dict(ExperimentConfig, merged)


def _name_is_about_another_dataset(yaml: dict[str, Any], merged: dict[str, Any], overrides: list[str]) -> bool:
    """True when the run is on a folder but its name came from a YAML written for another dataset."""
    if _section(merged, "data").get("name") != "folder":
        return False
    named_here = any(o.split("=", 1)[0].strip() == "name" for o in overrides)
    return not named_here and _section(yaml, "data").get("name") != "folder"


def _section(cfg: dict[str, Any], key: str) -> dict[str, Any]:
    value = cfg.get(key)
    return value if isinstance(value, dict) else {}


def shipped_configs() -> dict[str, Path]:
    """Name -> path of every config shipped in the package (`shapes` -> .../pakhsh/configs/shapes.yaml)."""
    if not SHIPPED_CONFIGS.is_dir():
        return {}
    return {p.stem: p for p in sorted(SHIPPED_CONFIGS.glob("*.yaml"))}


def config_summary(path: Path) -> str:
    """The first comment line of a YAML config: what it trains."""
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
    return ""


def resolve_config(spec: str | Path) -> Path:
    """A YAML path, or the name of a shipped config (`shapes`, `shapes.yaml`); an existing file wins."""
    p = Path(spec).expanduser()
    if p.is_file():
        return p
    shipped = shipped_configs()
    name = p.name[: -len(p.suffix)] if p.suffix in (".yaml", ".yml") else p.name
    if name in shipped and p.parent in (Path("."), Path("configs")):  # `configs/shapes.yaml`, as older docs wrote it
        return shipped[name]
    what = "is a folder, not a YAML file" if p.is_dir() else "not found"
    raise ConfigError(f"config {spec}: {what}; give a YAML file or a shipped config name "
                      f"({', '.join(shipped) or 'none shipped'}; see `pakhsh configs`)")
