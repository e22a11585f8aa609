"""Checkpoints: safetensors weights + JSON configs, written atomically; loading never unpickles code.

A run directory holds `config.json` and `checkpoints/step_XXXXXXX/` folders, each complete on its own:
    config.json            the ExperimentConfig
    model.safetensors      raw weights
    ema_<rate>.safetensors one per EMA rate
    optimizer.pt           AdamW state (tensors and numbers only; read with torch.load(weights_only=True))
    state.pt               RNG states, step, data position (weights_only=True as well)
    manifest.json          name -> size of every file above, written last: a folder is complete when it matches
`checkpoints/LATEST` names the newest complete folder (for people and older tools; readers pick the newest
complete folder themselves rather than trust it).

Crash safety: a folder is written as `step_X.tmp` and renamed into place. Nothing LATEST may name is ever deleted
in place: a folder leaves by being renamed to `*.trash` first (then deleted); re-saving an existing step swaps the
two folders in one atomic rename (Linux renameat2), so a crash at any moment leaves LATEST naming a complete
checkpoint. Readers ignore `*.tmp` / `*.trash` debris, and the next save clears it.
An exported model (what `pakhsh sample` reads, and what ships in pakhsh/assets) is just config.json plus
model.safetensors.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import pickle
import re
import shutil
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import ConfigError, apply_overrides, from_dict, to_dict
from .ema import rate_name
from .experiment import ExperimentConfig

MANIFEST = "manifest.json"
# what a step folder written before manifests existed must hold to count as complete
_LEGACY_REQUIRED = ("config.json", "model.safetensors", "optimizer.pt", "state.pt")
_STEP_RE = re.compile(r"step_(\d+)")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing files, or weights that do not fit the config."""


class DiskFullError(CheckpointError):
    """The disk filled up while a checkpoint was written; the previous checkpoint is untouched."""


@dataclass
class LoadedModel:
    """A network ready for inference and the config it was trained with."""

    model: nn.Module
    config: ExperimentConfig
    path: Path  # the folder the weights came from
    weights: str  # which file: "model" or "ema_<rate>"


@dataclass
class ResumeState:
    """Everything `--resume` needs from one checkpoint, read and checked before any of it is used."""

    folder: Path
    config: ExperimentConfig
    model: dict[str, torch.Tensor]
    ema: dict[float, dict[str, torch.Tensor]]
    optimizer: dict[str, Any]
    state: dict[str, Any]


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def folder_step(path: Path) -> int | None:
    """The step of a checkpoint folder name (`step_0000042` -> 42); None for debris such as `*.tmp`/`*.trash`."""
    m = _STEP_RE.fullmatch(path.name)
    return int(m.group(1)) if m else None


# ---------------------------------------------------------------------------------------------- writing
def atomic_write_text(path: Path, text: str) -> None:
    """Write `path` so readers see the old or the new text, never a mix (and it survives a power cut)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


# weights a checkpoint holds beside the trained net that are not trained (latent models: the autoencoder; unCLIP
# priors and decoders: the CLIP)
FROZEN_FILES = ("autoencoder.safetensors", "clip.safetensors")


def write_checkpoint(run_dir: Path, step: int, files: dict[str, Any], config: ExperimentConfig, keep_last: int) -> Path:
    """Write one checkpoint folder atomically, point LATEST at it, and prune to the newest `keep_last`.

    files: name -> state dict; names ending in .safetensors hold tensors only, .pt hold plain containers.
    A full disk raises DiskFullError (the partial folder is removed, earlier checkpoints are untouched).
    """
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    _clear_debris(ckpt_root)
    final = ckpt_root / step_dir_name(step)
    tmp = ckpt_root / (final.name + ".tmp")
    try:
        tmp.mkdir()
        _write_folder(tmp, files, config)
    except _DiskFull as e:
        shutil.rmtree(tmp, ignore_errors=True)
        prev = latest_checkpoint(run_dir)
        kept = f"the previous checkpoint {prev} is intact" if prev else "no earlier checkpoint exists"
        raise DiskFullError(f"disk full while writing {final / e.name}; {kept}; free space and --resume") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed write leaves no debris behind
        raise
    if final.exists():
        _replace_dir(tmp, final)
    else:
        os.replace(tmp, final)
    _fsync_dir(ckpt_root)
    atomic_write_text(ckpt_root / "LATEST", final.name + "\n")
    _prune(ckpt_root, final, keep_last)
    return final


def _write_folder(folder: Path, files: dict[str, Any], config: ExperimentConfig) -> None:
    """All files of one checkpoint, each fsynced, then the manifest that marks the folder complete."""
    named = {"config.json": json.dumps(to_dict(config), indent=2, sort_keys=True) + "\n", **files}
    for name, state in named.items():
        _save_checked(folder / name, state)
    sizes = {p.name: p.stat().st_size for p in sorted(folder.iterdir())}
    _save_checked(folder / MANIFEST, json.dumps(sizes, indent=2, sort_keys=True) + "\n")
    _fsync_dir(folder)


class _DiskFull(Exception):
    """Internal: which file the disk filled up on (write_checkpoint turns it into DiskFullError)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def _save_checked(path: Path, state: Any) -> None:
    try:
        _save_one(path, state)
    except Exception as e:
        if _is_disk_full(e):
            raise _DiskFull(path.name) from e
        raise


def _save_one(path: Path, state: Any) -> None:
    if isinstance(state, str):
        with open(path, "w") as f:
            f.write(state)
            f.flush()
            os.fsync(f.fileno())
        return
    if path.name.endswith(".safetensors"):
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    with open(path, "rb") as fh:  # the data must be on disk before the rename makes the folder visible
        os.fsync(fh.fileno())


def _is_disk_full(e: Exception) -> bool:
    """ENOSPC in any of its disguises: OSError, torch.save's zip writer, safetensors' Rust IoError."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    return any(s in text for s in ("No space left", "StorageFull", "unexpected pos", "file write failed",
                                   "Disk quota exceeded"))


def _replace_dir(new: Path, final: Path) -> None:
    """Put `new` at `final` (which exists): atomic swap where the OS offers one, then discard the old copy.

    Without a swap (not Linux, or a file system that lacks it) the old folder is renamed away first; for that
    moment readers fall back to the previous complete checkpoint.
    """
    if not _exchange(new, final):
        old = _trash_name(final)
        os.replace(final, old)
        os.replace(new, final)
        new = old
    _fsync_dir(final.parent)
    _discard(new)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (renameat2 RENAME_EXCHANGE); False where the platform cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # file system or kernel without the flag
        return False
    raise OSError(err, os.strerror(err), str(a))


def _renameat2() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # glibc < 2.28, musl
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _trash_name(path: Path) -> Path:
    return path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.trash")


def _discard(path: Path) -> None:
    """Delete a folder without ever leaving a half-deleted folder under a name readers consider."""
    trash = path if path.name.endswith(".trash") else _trash_name(path)
    if trash != path:
        os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _clear_debris(ckpt_root: Path) -> None:
    """Remove what crashed saves left behind (`*.tmp` folders, `*.trash` being deleted)."""
    for p in ckpt_root.iterdir():
        if p.name.endswith((".tmp", ".trash")):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def _prune(ckpt_root: Path, final: Path, keep_last: int) -> None:
    """Keep `final` and the newest keep_last-1 complete checkpoints before it.

    Folders past `final` belong to an abandoned history (a resume that fell back over damaged checkpoints) and go.
    """
    step = folder_step(final)
    older = [p for p in step_folders(ckpt_root.parent) if p != final]
    keep = [p for p in older if folder_step(p) < step and checkpoint_problem(p) is None][: keep_last - 1]
    for p in older:
        if p not in keep:
            _discard(p)


def _fsync_dir(path: Path) -> None:
    """Make renames and new entries in `path` durable (a no-op where directories cannot be fsynced)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------- finding
def step_folders(run_dir: Path) -> list[Path]:
    """The run's `checkpoints/step_*` folders (debris excluded), newest step first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if folder_step(p) is not None and p.is_dir()]
    return sorted(found, key=lambda p: folder_step(p), reverse=True)  # type: ignore[arg-type,return-value]


def checkpoint_problem(folder: Path) -> str | None:
    """Why `folder` is not a complete checkpoint (a missing or truncated file), or None when it is complete.

    Cheap: compares file sizes with the manifest; contents are checked when they are read.
    """
    manifest = folder / MANIFEST
    if not manifest.is_file():
        missing = [n for n in _LEGACY_REQUIRED if not (folder / n).is_file()]
        return f"{folder / missing[0]} is missing" if missing else None
    try:
        sizes = json.loads(manifest.read_text())
        if not isinstance(sizes, dict):
            raise ValueError("not an object")
    except (ValueError, OSError) as e:
        return f"{manifest} is unreadable ({e})"
    for name, size in sizes.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        actual = path.stat().st_size
        if actual != size:
            return f"{path} is {actual} bytes, expected {size} (truncated or overwritten)"
    return None


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder of a run (None when it has none)."""
    return next((p for p in step_folders(run_dir) if checkpoint_problem(p) is None), None)


def resolve_checkpoint(path: str | Path) -> Path:
    """A run dir, a step folder or an exported model folder -> the folder holding config.json + weights."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if (p / "model.safetensors").is_file():
        if (p / MANIFEST).is_file() and (problem := checkpoint_problem(p)):
            raise CheckpointError(f"{p} is an incomplete checkpoint: {problem}")
        return p
    latest = latest_checkpoint(p)
    if latest is not None:
        return latest
    broken = [checkpoint_problem(f) for f in step_folders(p)]
    if broken:
        raise CheckpointError(f"{p} holds no complete checkpoint: {'; '.join(str(b) for b in broken[:3])}")
    raise CheckpointError(f"{p} holds no checkpoint (expected model.safetensors or checkpoints/step_*/)")


# ---------------------------------------------------------------------------------------------- reading
def _reason(e: BaseException) -> str:
    """The first sentence of an exception message: library messages run to paragraphs of advice."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    text = text.split(". ")[0]
    return text if len(text) <= 120 else text[:117] + "..."


def read_config(folder: Path) -> ExperimentConfig:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{folder} has no config.json")
    try:
        return from_dict(ExperimentConfig, json.loads(cfg_path.read_text()))
    except (ConfigError, ValueError, TypeError) as e:
        raise CheckpointError(f"{cfg_path}: {_reason(e)}") from None
    except OSError as e:
        raise CheckpointError(f"{cfg_path} is unreadable: {_reason(e)}") from None


def load_run_config(run_dir: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """The config a run saved (its config.json, else its newest checkpoint's) + `key=value` overrides: what
    `pakhsh train --out RUN --resume` continues with when no YAML is given."""
    run = Path(run_dir)
    found = run / "config.json" if (run / "config.json").is_file() else None
    if found is None and (latest := latest_checkpoint(run)) is not None:
        found = latest / "config.json"
    if found is None:
        what = "does not exist" if not run.exists() else "holds no run (no config.json)"
        raise CheckpointError(f"--resume: {run} {what}; give the run's folder as --out, or its YAML config too")
    try:
        saved = json.loads(found.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{found} is unreadable: {_reason(e)}") from None
    if not isinstance(saved, dict):
        raise CheckpointError(f"{found} is not a config (a JSON object)")
    try:
        return from_dict(ExperimentConfig, apply_overrides(saved, overrides or []))
    except ConfigError as e:
        raise ConfigError(f"{found} + --set: {e}") from None


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file as a dict of tensors, with an error naming the file when it is missing or damaged."""
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a valid safetensors file: truncated or corrupt ({_reason(e)})") from None


def check_fits(model: nn.Module, state: dict[str, torch.Tensor], path: Path, *, partial_params_only: bool = False) -> None:
    """Raise CheckpointError naming every missing, unexpected or mis-shaped key of `state` for `model`."""
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


def load_weights(model: nn.Module, path: Path, *, partial_params_only: bool = False) -> None:
    """Load a safetensors file into `model`, naming every missing, unexpected or mis-shaped key on mismatch.

    partial_params_only: the file holds parameters only (EMA files); buffers keep the model's values.
    """
    state = read_tensors(path)
    check_fits(model, state, path, partial_params_only=partial_params_only)
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
    from .objectives import build_net

    folder = resolve_checkpoint(path)
    cfg = read_config(folder)
    model = build_net(cfg)
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
    for extra in FROZEN_FILES:  # a latent model's frozen autoencoder travels with it
        if (loaded.path / extra).is_file():
            shutil.copyfile(loaded.path / extra, out / extra)
    atomic_write_text(out / "config.json", json.dumps(to_dict(loaded.config), indent=2, sort_keys=True) + "\n")
    return out


def load_state(folder: Path, name: str) -> Any:
    """A .pt state (optimizer, RNG) with weights_only=True: plain tensors and containers, never code."""
    path = folder / name
    if not path.is_file():
        raise CheckpointError(f"{folder} is missing {name}; cannot resume exactly from it")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's own message advises retrying with weights_only=False, i.e. running the pickle: never repeat it
        raise CheckpointError(
            f"{path} is not a safe checkpoint file (it contains pickled code/objects pakhsh will not execute)"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable checkpoint file: truncated or corrupt ({_reason(e)})") from None


def read_resume_state(folder: Path, ema_rates: Iterable[float]) -> ResumeState:
    """Read and check every file `--resume` uses from `folder`; CheckpointError names the first damaged one."""
    if problem := checkpoint_problem(folder):
        raise CheckpointError(problem)
    cfg = read_config(folder)
    model = read_tensors(folder / "model.safetensors")
    ema = {r: read_tensors(folder / f"{rate_name(r)}.safetensors") for r in ema_rates}
    optimizer = load_state(folder, "optimizer.pt")
    state = load_state(folder, "state.pt")
    if not isinstance(optimizer, dict) or "state" not in optimizer or "param_groups" not in optimizer:
        raise CheckpointError(f"{folder / 'optimizer.pt'} is not an optimizer state")
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{folder / 'state.pt'} has no step")
    if folder_step(folder) not in (None, state["step"]):
        raise CheckpointError(f"{folder / 'state.pt'} says step {state['step']} but the folder is {folder.name}")
    return ResumeState(folder, cfg, model, ema, optimizer, state)


def tensors_problem(tensors: dict[str, torch.Tensor], limit: float) -> str | None:
    """Why weights are not sane (a non-finite value, or one beyond +-limit), or None: guards saving a blow-up."""
    for name, t in tensors.items():
        if not t.is_floating_point() or t.numel() == 0:
            continue
        peak = float(t.detach().abs().max())
        if not peak <= limit:  # also catches NaN
            return f"max |w| = {peak:.3g} in {name}"
    return None
