"""`degrade`: a clean training batch -> (what the model is conditioned on, which pixels it generates, task ids).

Randomness comes only from the caller's CPU generator and is drawn in a fixed order (task per image, then
each task's own draws in TASK_NAMES order), so a batch replays exactly from the generator's state. superres is a
task of its own (multi never draws it, so the multi-task stream is what it always was); see tasks/superres.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pakhsh.tasks.colorize import to_luma
from pakhsh.tasks.config import MASK_KINDS, SINGLE_TASKS, TASK_NAMES, UNCROP_SIDES, Degraded, TaskConfig
from pakhsh.tasks.jpeg import jpeg_compress_each
from pakhsh.tasks.masks import check_generator, apply_mask, box_masks, center_mask, freeform_masks, uncrop_mask
from pakhsh.tasks.superres import superres_degrade


def degrade(x0: Tensor, cfg: TaskConfig, generator: torch.Generator) -> tuple[Degraded, Tensor]:
    """Degrade a batch x0 (B, C, H, W) in [-1, 1] for training.

    Returns (Degraded(cond (B, C, H, W), mask (B, 1, H, W) float32 0/1), task_ids (B,) int64 into SINGLE_TASKS,
    whose first four are TASK_NAMES, multi's labels). colorize needs C = 3; the others take C = 1 or 3; superres
    needs H and W divisible by task.scale. Outputs are on x0's device, cond in x0's dtype.
    The same x0, cfg and generator state give identical outputs; the global RNG is never touched.
    """
    if x0.ndim != 4 or x0.shape[1] not in (1, 3):
        raise ValueError(f"degrade: expected images (B, 1 or 3, H, W), got shape {tuple(x0.shape)}")
    check_generator(generator)
    b, c, h, w = x0.shape
    if cfg.name == "superres":  # never part of multi: only its own draws (tasks/superres.py)
        ids = torch.full((b,), SINGLE_TASKS.index("superres"), dtype=torch.int64)
        return superres_degrade(x0, cfg, generator), ids.to(x0.device)
    if cfg.name == "multi":
        ids = torch.randint(0, len(TASK_NAMES), (b,), generator=generator)
    else:
        ids = torch.full((b,), TASK_NAMES.index(cfg.name), dtype=torch.int64)
    if c != 3 and cfg.name in ("colorize", "multi"):  # multi may draw colorize for any image
        raise ValueError(f"task.name={cfg.name!r}: colorize needs RGB images (3 channels), got {c}")

    cond = x0.clone()
    mask = torch.ones(b, 1, h, w, dtype=torch.float32)
    for task_id, task in enumerate(TASK_NAMES):
        idx = (ids == task_id).nonzero().flatten()
        if len(idx) == 0:
            continue
        dev_idx = idx.to(x0.device)
        part = x0[dev_idx]
        if task == "colorize":
            cond[dev_idx] = to_luma(part)
        elif task == "jpeg":
            cond[dev_idx] = _jpeg(part, cfg.jpeg_quality, generator)
        else:
            make = _inpaint_masks if task == "inpaint" else _uncrop_masks
            m = make(len(idx), h, w, cfg, generator)
            mask[idx] = m
            cond[dev_idx] = apply_mask(part, m)
    return Degraded(cond, mask.to(x0.device)), ids.to(x0.device)


def _choose(n: int, options: tuple[str, ...], fixed: str, generator: torch.Generator) -> list[str]:
    """`fixed` for every image, or (fixed == "mixed" / "random") a uniform draw per image."""
    if fixed in options:
        return [fixed] * n
    return [options[i] for i in torch.randint(0, len(options), (n,), generator=generator).tolist()]


def _inpaint_masks(n: int, h: int, w: int, cfg: TaskConfig, generator: torch.Generator) -> Tensor:
    """(n, 1, H, W) inpainting masks of cfg.mask's kind (mixed: each image draws centre, boxes or free-form)."""
    kinds = _choose(n, MASK_KINDS, cfg.mask, generator)
    masks = torch.empty(n, 1, h, w, dtype=torch.float32)
    for kind in MASK_KINDS:  # one batched draw per kind, in a fixed order
        sel = [i for i, k in enumerate(kinds) if k == kind]
        if not sel:
            continue
        if kind == "center":
            masks[sel] = center_mask(h, w)
        elif kind == "boxes":
            masks[sel] = box_masks(len(sel), h, w, generator)
        else:
            masks[sel] = freeform_masks(len(sel), h, w, generator)
    return masks


def _uncrop_masks(n: int, h: int, w: int, cfg: TaskConfig, generator: torch.Generator) -> Tensor:
    """(n, 1, H, W) uncropping bands on cfg.uncrop_side (random: each image draws one of UNCROP_SIDES)."""
    sides = _choose(n, UNCROP_SIDES, cfg.uncrop_side, generator)
    bands = {s: uncrop_mask(h, w, s, cfg.uncrop_fraction) for s in set(sides)}
    return torch.stack([bands[s] for s in sides])


def _jpeg(x: Tensor, quality: tuple[int, int], generator: torch.Generator) -> Tensor:
    """Each image JPEG-compressed at a quality drawn uniformly from the inclusive range."""
    lo, hi = quality
    return jpeg_compress_each(x, torch.randint(lo, hi + 1, (len(x),), generator=generator).tolist())
