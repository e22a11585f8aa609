"""Layouts (boxes + class labels) as a condition: latent diffusion's layout-to-image (Rombach et al. 2022).

The UNet reads a layout as tokens (`pakhsh.nets.layout.LayoutEncoder`, UNetConfig.layout_classes): boxes (B, N, 4)
as x0, y0, x1, y1 fractions of the image side in [0, 1], and labels (B, N) class indices with -1 marking an absent
(padding) row. This module gets layouts into that form: from a user's JSON file (`read_layout`), from the
shapes dataset's pixel boxes (`layout_from_sample`, `batch_layout`), and back to JSON (`write_layout`).

The JSON form is a list of objects, e.g.
    [{"label": "circle", "box": [0.1, 0.1, 0.4, 0.4]}, {"label": 3, "box": [0.5, 0.2, 0.9, 0.7]}]
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor


def _label_index(p: Path, i: int, label: Any, class_names: Sequence[str]) -> int:
    known = ", ".join(class_names)
    if isinstance(label, str):
        if label in class_names:
            return list(class_names).index(label)
        raise ValueError(f"layout {p}: entry {i}: unknown label {label!r}; known labels: {known}")
    if isinstance(label, int) and not isinstance(label, bool):
        if 0 <= label < len(class_names):
            return label
        raise ValueError(f"layout {p}: entry {i}: label index {label} outside [0, {len(class_names) - 1}] "
                         f"({known})")
    raise ValueError(f"layout {p}: entry {i}: label must be a class name or an integer index, got {label!r}")


def _box(p: Path, i: int, box: Any) -> list[float]:
    ok = (isinstance(box, list) and len(box) == 4
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box))
    if not ok:
        raise ValueError(f"layout {p}: entry {i}: box must be 4 finite numbers [x0, y0, x1, y1], got "
                         f"{json.dumps(box)[:80]}")
    return [float(v) for v in box]


def read_layout(
    path: str | Path, class_names: Sequence[str], image_size: int, max_objects: int = 8
) -> tuple[Tensor, Tensor]:
    """Read a JSON layout -> (boxes (N, 4) float32 in [0, 1] as x0, y0, x1, y1, labels (N,) int64).

    The file is a list of {"label": ..., "box": [x0, y0, x1, y1]}; a label is a name from `class_names` or an
    integer index into it; other keys are ignored. Coordinates are fractions of the image side in [0, 1] --
    unless any coordinate in the file is greater than 1: then every coordinate is read as pixels of an
    image_size x image_size image (in [0, image_size]) and divided by image_size. Each box needs x1 > x0 and
    y1 > y0. An empty list is a layout with no objects (the null layout). Any problem raises a one-line
    ValueError naming the file and the entry index (FileNotFoundError for a missing file).
    """
    p = Path(path)
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    if not class_names:
        raise ValueError("class_names is empty: a layout needs at least one class")
    if not p.is_file():
        raise FileNotFoundError(f"layout file not found: {p}" + (" (it is a folder)" if p.is_dir() else ""))
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"layout {p}: not JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"layout {p}: not JSON (not UTF-8 text: byte {e.start})") from None
    if not isinstance(data, list):
        raise ValueError(f"layout {p}: expected a JSON list of {{\"label\": ..., \"box\": [x0, y0, x1, y1]}} "
                         f"objects, got a JSON {type(data).__name__}")
    if len(data) > max_objects:
        raise ValueError(f"layout {p}: {len(data)} objects, more than the {max_objects} the model takes "
                         f"(max_objects)")
    boxes, labels = [], []
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise ValueError(f"layout {p}: entry {i}: expected an object {{\"label\": ..., \"box\": [...]}}, "
                             f"got {json.dumps(entry)[:80]}")
        for key in ("label", "box"):
            if key not in entry:
                raise ValueError(f"layout {p}: entry {i}: missing key {key!r} (has {sorted(entry)})")
        labels.append(_label_index(p, i, entry["label"], class_names))
        boxes.append(_box(p, i, entry["box"]))
    pixels = any(v > 1.0 for b in boxes for v in b)
    scale, limit = (float(image_size), f"[0, {image_size}] (pixels of a {image_size}x{image_size} image)") if pixels \
        else (1.0, "[0, 1] (fractions of the image; values over 1 would make every box pixels)")
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        if min(x0, y0, x1, y1) < 0 or max(x0, y0, x1, y1) > scale:
            raise ValueError(f"layout {p}: entry {i}: box {[x0, y0, x1, y1]} is outside {limit}")
        if x1 <= x0 or y1 <= y0:
            side = "x1 <= x0" if x1 <= x0 else "y1 <= y0"
            raise ValueError(f"layout {p}: entry {i}: box {[x0, y0, x1, y1]} is empty ({side}); boxes are "
                             f"[x0, y0, x1, y1] with x0 < x1 and y0 < y1")
    out = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4) / scale
    return out.clamp(0.0, 1.0), torch.tensor(labels, dtype=torch.long).reshape(-1)


def write_layout(path: str | Path, boxes: Tensor, labels: Tensor, class_names: Sequence[str]) -> Path:
    """Write boxes (N, 4) in [0, 1] and labels (N,) as the JSON `read_layout` reads (labels by name; rows with
    label -1 are padding and left out). Written atomically: a reader never sees half a file."""
    boxes, labels = torch.as_tensor(boxes), torch.as_tensor(labels)
    if boxes.ndim != 2 or boxes.shape[1] != 4 or tuple(labels.shape) != (boxes.shape[0],):
        raise ValueError(f"write_layout needs boxes (N, 4) and labels (N,), got {tuple(boxes.shape)} and "
                         f"{tuple(labels.shape)}")
    entries = []
    for box, label in zip(boxes.tolist(), labels.tolist()):
        if label == -1:
            continue
        if not 0 <= label < len(class_names):
            raise ValueError(f"label {label} outside [0, {len(class_names) - 1}] ({', '.join(class_names)})")
        if min(box) < 0 or max(box) > 1:
            raise ValueError(f"box {box} is outside [0, 1]; write_layout takes fractions of the image")
        entries.append({"label": class_names[int(label)], "box": [round(float(v), 6) for v in box]})
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(entries, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, p)
    return p


def batch_layout(boxes: Tensor, objects: Tensor, image_size: int) -> tuple[Tensor, Tensor]:
    """Collated shapes boxes (B, M, 4) in pixels and objects (B, M, A) (column 0 the shape index, -1 rows absent)
    -> (boxes (B, M, 4) float32 fractions clipped to [0, 1], zero on absent rows; labels (B, M) int64, -1 absent)."""
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    if boxes.ndim != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be (B, M, 4) pixel boxes, got {tuple(boxes.shape)}")
    if objects.ndim != 3 or tuple(objects.shape[:2]) != tuple(boxes.shape[:2]) or objects.shape[2] < 1:
        raise ValueError(f"objects must be (B, M, A) with (B, M) = {tuple(boxes.shape[:2])} as boxes, got "
                         f"{tuple(objects.shape)}")
    labels = objects[..., 0].long()
    present = labels >= 0
    frac = (boxes.float() / image_size).clamp(0.0, 1.0)
    frac = torch.where(present[..., None], frac, torch.zeros((), dtype=frac.dtype, device=frac.device))
    return frac, torch.where(present, labels, torch.full_like(labels, -1))


def layout_from_sample(
    sample: Mapping[str, Any], image_size: int, max_objects: int | None = None
) -> tuple[Tensor, Tensor]:
    """A shapes sample's "boxes" (M, 4) pixels and "objects" (M, A) -> (boxes (K, 4) fractions in [0, 1],
    labels (K,) with -1 on absent rows), K = max_objects (padded with absent rows) or M when None."""
    for key in ("boxes", "objects"):
        if key not in sample:
            raise ValueError(f"sample has no {key!r} (keys: {', '.join(sorted(sample))}); layouts come from the "
                             f"shapes dataset's boxes and objects")
    boxes, objects = torch.as_tensor(sample["boxes"]), torch.as_tensor(sample["objects"])
    if boxes.ndim != 2 or objects.ndim != 2:
        raise ValueError(f"sample boxes must be (M, 4) and objects (M, A), got {tuple(boxes.shape)} and "
                         f"{tuple(objects.shape)}")
    frac, labels = batch_layout(boxes[None], objects[None], image_size)
    frac, labels = frac[0], labels[0]
    if max_objects is not None:
        m = frac.shape[0]
        if m > max_objects and bool((labels[max_objects:] >= 0).any()):
            raise ValueError(f"sample has {int((labels >= 0).sum())} objects, more than max_objects={max_objects}")
        pad = max(0, max_objects - m)
        frac = torch.cat([frac[:max_objects], frac.new_zeros(pad, 4)])
        labels = torch.cat([labels[:max_objects], labels.new_full((pad,), -1)])
    return frac, labels
