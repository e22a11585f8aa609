"""Which degradation a Palette model learns to undo: task names, the per-batch result, `TaskConfig`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

from torch import Tensor

# The order defines the task ids 0..3 that label a multi-task model's inputs; never reorder, only append.
TASK_NAMES = ("colorize", "inpaint", "uncrop", "jpeg")
MASK_KINDS = ("center", "boxes", "freeform")
UNCROP_SIDES = ("left", "right", "top", "bottom", "all")

TaskName = Literal["colorize", "inpaint", "uncrop", "jpeg", "multi"]
MaskKind = Literal["center", "boxes", "freeform", "mixed"]
UncropSide = Literal["left", "right", "top", "bottom", "all", "random"]


class Degraded(NamedTuple):
    """A degraded batch: what the model sees, and which pixels it must generate."""

    cond: Tensor  # (B, C, H, W) in [-1, 1]; pixels under mask == 1 are 0.0 for inpaint / uncrop
    mask: Tensor  # (B, 1, H, W) float32 of exactly 0.0 / 1.0; 1 = generate, 0 = known pixel kept exactly


def _or_list(names: tuple[str, ...]) -> str:
    """("a", "b", "c") -> "a, b or c" for error messages."""
    return ", ".join(names[:-1]) + " or " + names[-1]


@dataclass
class TaskConfig:
    """The degradation applied to each training batch (see `degrade`)."""

    name: TaskName = "colorize"  # multi: each image draws one of TASK_NAMES uniformly
    mask: MaskKind = "mixed"  # inpainting masks; mixed: each image draws center, boxes or freeform
    uncrop_side: UncropSide = "random"  # random: each image draws one of UNCROP_SIDES
    uncrop_fraction: float = 0.25  # of the side generated; "all": of each side, so the centre stays known
    jpeg_quality: tuple[int, int] = (5, 30)  # inclusive range a training image draws its JPEG quality from

    def __post_init__(self) -> None:
        if self.name not in TASK_NAMES + ("multi",):
            raise ValueError(f"task.name={self.name!r} is not a task: use {_or_list(TASK_NAMES + ('multi',))}")
        if self.mask not in MASK_KINDS + ("mixed",):
            raise ValueError(f"task.mask={self.mask!r} is not a mask kind: use {_or_list(MASK_KINDS + ('mixed',))}")
        if self.uncrop_side not in UNCROP_SIDES + ("random",):
            raise ValueError(
                f"task.uncrop_side={self.uncrop_side!r} is not a side: use {_or_list(UNCROP_SIDES + ('random',))}"
            )
        check_uncrop_fraction(self.uncrop_fraction, self.uncrop_side, "task.uncrop_fraction")
        self.jpeg_quality = _quality_range(self.jpeg_quality)


def check_uncrop_fraction(fraction: float, side: str, key: str = "fraction") -> None:
    """Raise ValueError naming `key` unless `fraction` leaves some pixels known on `side`.

    "all" takes the fraction from each of the four sides, so it must stay below 0.5; "random" may draw "all".
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise ValueError(f"{key}={fraction!r}: must be a number")
    if side in ("all", "random"):
        if not 0.0 < fraction < 0.5:
            why = "a border on every side" if side == "all" else "side 'random' may draw 'all', a border on every side"
            raise ValueError(f"{key}={fraction}: must be in (0, 0.5) for uncrop side {side!r} ({why})")
    elif not 0.0 < fraction < 1.0:
        raise ValueError(f"{key}={fraction}: must be in (0, 1)")


def _quality_range(value: object) -> tuple[int, int]:
    """(lo, hi) of JPEG qualities, each an int in 1..100 with lo <= hi (a YAML list is accepted)."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"task.jpeg_quality={value!r}: must be two qualities (lo, hi)")
    lo, hi = value
    for q in (lo, hi):
        if isinstance(q, bool) or not isinstance(q, int) or not 1 <= q <= 100:
            raise ValueError(f"task.jpeg_quality={tuple(value)!r}: each quality must be an integer in 1..100")
    if lo > hi:
        raise ValueError(f"task.jpeg_quality={tuple(value)!r}: lo must not exceed hi")
    return (lo, hi)
