"""Strict state-dict checks shared by the metric networks (FID InceptionV3, FeatureNet).

A metric is only comparable across runs if the feature network is exactly the one named, so every loader here
refuses a file whose keys or shapes differ from the module, and says which keys and shapes differ.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn


class WeightsNotFoundError(FileNotFoundError):
    """A weights file that is not where it was looked for (the message says where to put it)."""


class WeightsMismatchError(ValueError):
    """A weights file whose keys or tensor shapes do not match the module it is loaded into."""


def expected_layout(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """The module's state-dict layout: key -> shape."""
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def layout_mismatch(expected: Mapping[str, tuple[int, ...]], state: Mapping[str, torch.Tensor]) -> list[str]:
    """Human-readable differences between an expected layout and a loaded state dict ([] when they match)."""
    problems: list[str] = []
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
    for k, shape in expected.items():
        if k in state and tuple(state[k].shape) != shape:
            problems.append(f"shape mismatch for {k}: expected {shape}, got {tuple(state[k].shape)}")
    return problems


def load_strict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str | Path) -> None:
    """Load `state` into `model` after checking keys and shapes; raise WeightsMismatchError naming the keys."""
    problems = layout_mismatch(expected_layout(model), state)
    if problems:
        raise WeightsMismatchError(
            f"{source} does not fit {type(model).__name__}:\n  " + "\n  ".join(problems)
        )
    model.load_state_dict(dict(state), strict=True)


def save_net_folder(model: nn.Module, directory: str | Path, metrics: dict | None = None) -> Path:
    """A small metric net's folder: model.safetensors, config.json (its `cfg` dataclass) and, when given,
    train_metrics.json. The layout load_feature_net and load_attribute_net read back."""
    import json

    from safetensors.torch import save_file

    from pakhsh.config import save_json

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    save_json(model.cfg, out / "config.json")
    if metrics is not None:
        (out / "train_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return out


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a plain tensor state dict from .safetensors or a torch file (tensors only: no code is unpickled)."""
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, random bytes, pickled code: one line naming the file, not a raw trace
        raise WeightsMismatchError(
            f"{path}: cannot read it as a tensor state dict ({_first_line(e)}); it may be truncated or corrupt "
            "(copy it again), or hold pickled objects other than tensors (only weights_only=True files load)"
        ) from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsMismatchError(f"{path}: expected a mapping of name -> tensor, got {type(state).__name__}")
    return dict(state)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file; a truncated or corrupt file raises WeightsMismatchError naming it."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # SafetensorError is no OSError/ValueError: it would escape as a traceback
        raise WeightsMismatchError(
            f"{path}: not a readable .safetensors file ({_first_line(e)}); it is probably truncated or corrupt: "
            "copy it again"
        ) from None


def _first_line(error: Exception) -> str:
    """The first line of an error message (torch's are paragraphs)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _listing(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... (+{len(keys) - limit} more)" if len(keys) > limit else "")
