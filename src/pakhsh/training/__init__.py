"""Training: the experiment config, the loop, EMA and checkpoints."""

from .checkpoint import CheckpointError, LoadedModel, export_model, latest_checkpoint, load_model, resolve_checkpoint
from .ema import EMA
from .experiment import ExperimentConfig, TrainConfig, load_experiment
from .trainer import Trainer, TrainingError, TrainResult

__all__ = [
    "EMA", "CheckpointError", "ExperimentConfig", "LoadedModel", "TrainConfig", "TrainResult", "Trainer",
    "TrainingError", "export_model", "latest_checkpoint", "load_experiment", "load_model", "resolve_checkpoint",
]
