"""Which degradation a Palette model learns to undo: task names, the per-batch result, `TaskConfig`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

from torch import Tensor

# The order defines the task ids 0..3 that label a multi-task model's inputs (multi draws one of these per image):
# never reorder or extend them - the shipped multi-task model has these four labels; add new tasks to SINGLE_TASKS.
TASK_NAMES = ("colorize", "inpaint", "uncrop", "jpeg")
# Every task a model can be trained for alone: TASK_NAMES, then tasks that multi never draws (superres changes the
# input's size, so it cannot share a batch or a label space with the four). `degrade`'s task ids index this.
SINGLE_TASKS = TASK_NAMES + ("superres",)
MASK_KINDS = ("center", "boxes", "freeform")
UNCROP_SIDES = ("left", "right", "top", "bottom", "all")

TaskName = Literal["colorize", "inpaint", "uncrop", "jpeg", "superres", "multi"]
MaskKind = Literal["center", "boxes", "freeform", "mixed"]
UncropSide = Literal["left", "right", "top", "bottom", "all", "random"]


class Degraded(NamedTuple):
    """A degraded batch: what the model sees, and which pixels it must generate."""

    cond: Tensor  # (B, C, H, W) in [-1, 1]; pixels under mask == 1 are 0.0 for inpaint / uncrop
    mask: Tensor  # (B, 1, H, W) float32 of exactly 0.0 / 1.0; 1 = generate, 0 = known pixel kept exactly


def _or_list(names: tuple[str, ...]) -> str:
    """("a", "b", "c") -> "a, b or c" for error messages."""
    if len(names) == 1:
        return names[0]
    return ", ".join(names[:-1]) + " or " + names[-1]


@dataclass
class TaskConfig:
    """The degradation applied to each training batch (see `degrade`)."""

    name: TaskName = "colorize"  # multi: each image draws one of TASK_NAMES uniformly
    mask: MaskKind = "mixed"  # inpainting masks; mixed: each image draws center, boxes or freeform
    uncrop_side: UncropSide = "random"  # random: each image draws one of UNCROP_SIDES
    uncrop_fraction: float = 0.25  # of the side generated; "all": of each side, so the centre stays known
    jpeg_quality: tuple[int, int] = (5, 30)  # inclusive range a training image draws its JPEG quality from
    # superres (SR3, unCLIP's upsamplers): the model sees the image area-downsampled by `scale`, then (with
    # probability aug_prob) blurred and noised so it does not rely on a perfectly clean input - at sampling time
    # the input is another model's output (DALL-E 2 blurs its first upsampler's conditions for this reason).
    scale: int = 2  # the low-resolution input is H / scale x W / scale
    blur_sigma: tuple[float, float] = (0.0, 0.6)  # range of the Gaussian blur's sigma, in low-resolution pixels
    cond_noise: tuple[float, float] = (0.0, 0.1)  # range of the added Gaussian noise's std, in [-1, 1] units
    aug_prob: float = 0.5  # share of training images augmented; the rest see the clean downsample, as at sampling

    def __post_init__(self) -> None:
        if self.name not in SINGLE_TASKS + ("multi",):
            raise ValueError(f"task.name={self.name!r} is not a task: use {_or_list(TASK_NAMES + ('multi',))} "
                             f"(those four in one model), or {_or_list(SINGLE_TASKS[len(TASK_NAMES):])}")
        if self.mask not in MASK_KINDS + ("mixed",):
            raise ValueError(f"task.mask={self.mask!r} is not a mask kind: use {_or_list(MASK_KINDS + ('mixed',))}")
        if self.uncrop_side not in UNCROP_SIDES + ("random",):
            raise ValueError(
                f"task.uncrop_side={self.uncrop_side!r} is not a side: use {_or_list(UNCROP_SIDES + ('random',))}"
            )
        check_uncrop_fraction(self.uncrop_fraction, self.uncrop_side, "task.uncrop_fraction")
        self.jpeg_quality = _quality_range(self.jpeg_quality)
        if isinstance(self.scale, bool) or not isinstance(self.scale, int) or not 2 <= self.scale <= MAX_SCALE:
            raise ValueError(f"task.scale={self.scale!r}: must be a whole number in 2..{MAX_SCALE} (the low-res "
                             "input is H / scale)")
        self.blur_sigma = _float_range(self.blur_sigma, "task.blur_sigma", MAX_BLUR_SIGMA, "low-res pixels")
        self.cond_noise = _float_range(self.cond_noise, "task.cond_noise", MAX_COND_NOISE, "std in [-1, 1] units")
        p = self.aug_prob
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise ValueError(f"task.aug_prob={p!r}: must be a probability in [0, 1]")
        self.aug_prob = float(p)


MAX_SCALE = 16
MAX_BLUR_SIGMA = 8.0  # in low-res pixels: far past where an image is one colour; a typo, not an augmentation
MAX_COND_NOISE = 1.0  # std of 1 on [-1, 1] images already drowns the input


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


def _float_range(value: object, key: str, most: float, unit: str) -> tuple[float, float]:
    """(lo, hi) of finite numbers with 0 <= lo <= hi <= most (a YAML list is accepted), as floats."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{key}={value!r}: must be two numbers (lo, hi)")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0.0 <= v <= most:
            raise ValueError(f"{key}={tuple(value)!r}: each bound must be a number in [0, {most:g}] ({unit})")
    lo, hi = float(value[0]), float(value[1])
    if lo > hi:
        raise ValueError(f"{key}={tuple(value)!r}: lo must not exceed hi")
    return (lo, hi)
