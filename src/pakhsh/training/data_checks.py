"""Checks that a training config fits its data before any model is built, and that each batch's labels fit the
model: a wrong class count or channel number fails with the key to change, not as a shape error mid-run."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch.utils.data import Dataset

from ..tasks import TASK_NAMES
from .experiment import ExperimentConfig


def check_model_fits(cfg: ExperimentConfig) -> None:
    """The net's channels and output fit the data and the diffusion's variance."""
    if cfg.objective in ("clip", "prior"):  # their nets are checked against the CLIP when it loads
        return
    if cfg.is_autoencoder:
        ae, ch = cfg.autoencoder, cfg.data.channels
        if ae is not None and ch is not None and ch != ae.in_channels:
            raise ValueError(f"autoencoder.in_channels={ae.in_channels} but data.channels={ch}")
        return
    m, d = cfg.model, cfg.diffusion
    want = m.out_channels * (2 if d.variance.value == "learned_range" else 1)
    if m.out_dim != want:
        raise ValueError(
            f"model.learn_sigma={m.learn_sigma} does not fit diffusion.variance={d.variance.value}: "
            "set model.learn_sigma=true exactly when the variance is learned_range"
        )
    if m.out_channels != cfg.data.channels and cfg.data.channels is not None and not cfg.is_latent:
        raise ValueError(f"model.out_channels={m.out_channels} but data.channels={cfg.data.channels}")


def check_labels_fit(cfg: ExperimentConfig, dataset: Dataset) -> None:
    """A class-conditional model needs a labelled dataset with exactly model.num_classes classes (label
    num_classes is the null class of classifier-free guidance, so a larger label would train silently wrong)."""
    want = cfg.model.num_classes
    if want is None or cfg.task is not None:  # Palette: the label is the task, not the data's class
        return
    have = getattr(dataset, "num_classes", None)
    name = cfg.data.name
    if have is None:
        raise ValueError(f"model.num_classes={want} but dataset '{name}' has no labels; "
                         "set model.num_classes=null for an unconditional model")
    if have != want:
        raise ValueError(f"model.num_classes={want} but dataset '{name}' has {have} classes; "
                         f"set model.num_classes={have}")


def with_class_names(cfg: ExperimentConfig, dataset: Dataset) -> ExperimentConfig:
    """The config with the dataset's class names (saved with the run: pipelines then take `--label cat`)."""
    found = getattr(dataset, "class_names", None)
    if cfg.task is not None:  # a multi-task Palette model's labels are its tasks
        found = list(TASK_NAMES) if cfg.task.name == "multi" else None
    if found is None:
        return cfg
    found = [str(c) for c in found]
    given = cfg.class_names
    if given is not None and list(given) != found:
        raise ValueError(f"class_names={short_list(given)} but dataset '{cfg.data.name}' has the classes "
                         f"{short_list(found)}: the data changed since the run started, or the config names "
                         "other classes (class_names is filled from the data; leave it out)")
    return replace(cfg, class_names=found)


def check_label_range(labels: torch.Tensor, num_classes: int, dataset: str) -> None:
    """Labels must be 0..num_classes-1: label num_classes is the null class, beyond it the embedding fails."""
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        bad = int(labels.max()) if int(labels.max()) >= num_classes else int(labels.min())
        raise ValueError(f"dataset '{dataset}' has label {bad}, outside 0..{num_classes - 1} for "
                         f"model.num_classes={num_classes}; set model.num_classes to the dataset's class count")


def short_list(names: list[str], limit: int = 8) -> str:
    """[a, b, c, ...]: class lists in one-line messages stay one line."""
    return "[" + ", ".join(names[:limit]) + (", ..." if len(names) > limit else "") + "]"
