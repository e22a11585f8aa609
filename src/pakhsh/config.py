"""Typed component configs: one dataclass per component, saved as JSON, filled from YAML and `--set` overrides.

Every config in pakhsh is a (possibly nested) dataclass. This module turns dicts into those dataclasses strictly:
an unknown key is an error naming the key and its dotted path, and values are coerced to the annotated type
(so `--set train.lr=1e-4` from the command line becomes a float).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config dict that does not fit its dataclass (unknown key, wrong type, unparsable value)."""


def to_dict(cfg: Any) -> dict[str, Any]:
    """Dataclass -> plain JSON-able dict (enums become their values, tuples become lists)."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, enum.Enum):
            return v.value
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(cfg)


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Coerce `value` to the annotated type `tp`, raising ConfigError naming `path` on failure."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{path}: {value!r} fits none of {tp}: {'; '.join(errors)}")
    if origin is typing.Literal:
        if isinstance(value, bool) and ("no" in args or "yes" in args):
            value = "yes" if value else "no"  # YAML 1.1 reads a bare `no` / `yes` as a boolean
        if value not in args:
            raise ConfigError(f"{path}: {value!r} is not one of {list(args)}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()] if value.strip() else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{path}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        inner = args[0] if args else Any
        out = [_coerce(v, inner, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, _path=path)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            raise ConfigError(f"{path}: {value!r} is not one of {[m.value for m in tp]}") from None
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{path}: expected {tp.__name__}, got {value!r}")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{path}: expected {tp.__name__}, got {value!r}") from None
        if tp is int:
            if f != int(f):
                raise ConfigError(f"{path}: expected an integer, got {value!r}")
            return int(f)
        return f
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type[T], data: dict[str, Any], *, _path: str = "") -> T:
    """Build dataclass `cls` from `data`; unknown keys and ill-typed values raise ConfigError naming the key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{_path or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        where = f" in {_path}" if _path else ""
        raise ConfigError(
            f"unknown config key(s){where}: {', '.join(sorted(map(str, unknown)))} "
            f"(known for {cls.__name__}: {', '.join(sorted(fields))})"
        )
    kwargs = {k: _coerce(v, hints[k], f"{_path}.{k}" if _path else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{_path or cls.__name__}: {e}") from None


def parse_value(text: str) -> Any:
    """A `--set` value: YAML scalars/lists (`1e-4`, `true`, `[1,2]`), falling back to the raw string."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.sub=value` overrides to a nested dict (returns a new dict). Malformed items raise ConfigError."""
    out = json.loads(json.dumps(data))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. train.lr=1e-4)")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = out
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {key!r}: {p!r} is not a section")
            node = nxt
        node[parts[-1]] = parse_value(text)
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a dict, with errors that name the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping, got {type(data).__name__}")
    return data


def save_json(cfg: Any, path: str | Path) -> None:
    """Write a dataclass config as indented JSON."""
    Path(path).write_text(json.dumps(to_dict(cfg), indent=2, sort_keys=True) + "\n")


def load_json(cls: type[T], path: str | Path) -> T:
    """Read a JSON config file into dataclass `cls` (strict)."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {p}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}: not valid JSON: {e}") from None
    return from_dict(cls, data)


def cache_root() -> Path:
    """Where pakhsh keeps what it can recompute (reference statistics, encoded captions): $PAKHSH_CACHE when set,
    else ~/.cache/pakhsh (XDG_CACHE_HOME respected)."""
    import os

    root = os.environ.get("PAKHSH_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "pakhsh"
    return Path(root).expanduser()
