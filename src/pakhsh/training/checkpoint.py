"""Checkpoints: safetensors weights + JSON configs, written atomically; loading never unpickles code.

A run directory holds `config.json` and `checkpoints/step_XXXXXXX/` folders, each complete on its own:
    config.json            the ExperimentConfig
    model.safetensors      raw weights
    ema_<rate>.safetensors one per EMA rate
    optimizer.pt           AdamW state (tensors and numbers only; read with torch.load(weights_only=True))
    state.pt               RNG states, step, data position (weights_only=True as well)
`checkpoints/LATEST` names the newest complete folder. A folder is written as `*.tmp` and renamed into place,
so a crash at any moment leaves the previous checkpoint intact and readable.
An exported model (what `pakhsh sample` reads, and what ships in pakhsh/assets) is just config.json plus
model.safetensors.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..interop.config import ConfigError, from_dict, to_dict
from .ema import rate_name
from .experiment import ExperimentConfig


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing files, or weights that do not fit the config."""


@dataclass
class LoadedModel:
    """A network ready for inference and the config it was trained with."""

    model: nn.Module
    config: ExperimentConfig
    path: Path  # the folder the weights came from
    weights: str  # which file: "model" or "ema_<rate>"


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_checkpoint(run_dir: Path, step: int, files: dict[str, Any], config: ExperimentConfig, keep_last: int) -> Path:
    """Write one checkpoint folder atomically, point LATEST at it, and prune to the newest `keep_last`.

    files: name -> state dict; names ending in .safetensors hold tensors only, .pt hold plain containers.
    """
    ckpt_root = run_dir / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / step_dir_name(step)
    tmp = ckpt_root / (final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    (tmp / "config.json").write_text(json.dumps(to_dict(config), indent=2, sort_keys=True) + "\n")
    for name, state in files.items():
        if name.endswith(".safetensors"):
            save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp / name))
        else:
            torch.save(state, tmp / name)
    _fsync_dir(tmp)
    if final.exists():  # re-saving the same step (e.g. Ctrl-C right after a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(ckpt_root / "LATEST", final.name + "\n")
    for old in sorted(p for p in ckpt_root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder of a run (None when it has none)."""
    ckpt_root = Path(run_dir) / "checkpoints"
    marker = ckpt_root / "LATEST"
    if marker.is_file():
        cand = ckpt_root / marker.read_text().strip()
        if (cand / "model.safetensors").is_file():
            return cand
    done = sorted(p for p in ckpt_root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    return done[-1] if done else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A run dir, a step folder or an exported model folder -> the folder holding config.json + weights."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if (p / "model.safetensors").is_file():
        return p
    latest = latest_checkpoint(p)
    if latest is None:
        raise CheckpointError(f"{p} holds no checkpoint (expected model.safetensors or checkpoints/step_*/)")
    return latest


def read_config(folder: Path) -> ExperimentConfig:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{folder} has no config.json")
    try:
        return from_dict(ExperimentConfig, json.loads(cfg_path.read_text()))
    except (ConfigError, ValueError) as e:
        raise CheckpointError(f"{cfg_path}: {e}") from None


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file as a dict of tensors, with an error naming the file when it is missing."""
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    return load_file(str(path))


def load_weights(model: nn.Module, path: Path, *, partial_params_only: bool = False) -> None:
    """Load a safetensors file into `model`, naming every missing, unexpected or mis-shaped key on mismatch.

    partial_params_only: the file holds parameters only (EMA files); buffers keep the model's values.
    """
    state = read_tensors(path)
    own = dict(model.named_parameters()) if partial_params_only else model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if tuple(state[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys: {', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}")
        if unexpected:
            parts.append(f"unexpected keys: {', '.join(unexpected[:10])}{' ...' if len(unexpected) > 10 else ''}")
        if shapes:
            parts.append(f"shape mismatches: {'; '.join(shapes[:10])}")
        raise CheckpointError(f"{path} does not fit the model built from its config: " + " | ".join(parts))
    model.load_state_dict(state, strict=not partial_params_only)


def config_diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two configs (as dicts): 'model.model_channels: 64 != 128'."""
    da, db = (to_dict(x) if not isinstance(x, dict) else x for x in (a, b))
    out = []
    for k in sorted(set(da) | set(db)):
        va, vb = da.get(k), db.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out.extend(config_diff(va, vb, f"{prefix}{k}."))
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} != {vb!r}")
    return out


def load_model(path: str | Path, *, ema: bool = True, device: str | torch.device = "cpu") -> LoadedModel:
    """Build the network from a checkpoint's config and load its weights (EMA when present and asked for)."""
    from ..nets.unet import UNet

    folder = resolve_checkpoint(path)
    cfg = read_config(folder)
    model = UNet(cfg.model)
    ema_file = folder / f"{rate_name(cfg.train.preview_ema)}.safetensors"
    if ema and ema_file.is_file():
        load_weights(model, folder / "model.safetensors")  # buffers (and a full key check) first
        load_weights(model, ema_file, partial_params_only=True)
        which = ema_file.stem
    else:
        load_weights(model, folder / "model.safetensors")
        which = "model"
    return LoadedModel(model.to(device).eval(), cfg, folder, which)


def export_model(path: str | Path, out_dir: str | Path, *, ema: bool = True) -> Path:
    """Write an inference-only copy (config.json + model.safetensors holding the EMA weights)."""
    loaded = load_model(path, ema=ema)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in loaded.model.state_dict().items()}, str(out / "model.safetensors"))
    atomic_write_text(out / "config.json", json.dumps(to_dict(loaded.config), indent=2, sort_keys=True) + "\n")
    return out


def load_state(folder: Path, name: str) -> Any:
    """A .pt state (optimizer, RNG) with weights_only=True: plain tensors and containers, never code."""
    path = folder / name
    if not path.is_file():
        raise CheckpointError(f"{folder} is missing {name}; cannot resume exactly from it")
    return torch.load(path, map_location="cpu", weights_only=True)
