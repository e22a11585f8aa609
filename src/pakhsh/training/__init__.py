"""Training: the experiment config, the loop, EMA and checkpoints."""

from .checkpoint import (
    CheckpointError,
    LoadedModel,
    export_model,
    latest_checkpoint,
    load_model,
    load_run_config,
    resolve_checkpoint,
)
from .ema import EMA
from .experiment import ExperimentConfig, TrainConfig, config_summary, load_experiment, resolve_config, shipped_configs
from .trainer import Trainer, TrainingError, TrainResult

__all__ = [
    "EMA", "CheckpointError", "ExperimentConfig", "LoadedModel", "TrainConfig", "TrainResult", "Trainer",
    "TrainingError", "config_summary", "export_model", "latest_checkpoint", "load_experiment", "load_model",
    "load_run_config", "resolve_checkpoint", "resolve_config", "shipped_configs",
]
