"""Noise schedules (beta_t) and timestep respacing: pure functions over numpy float64 arrays.

All schedules return betas of shape (T,) in float64: the maths of the forward process is done in float64 and
only cast to the working dtype when gathered per timestep (improved-diffusion does the same; float32 alpha-bar
products lose several digits at T = 4000).
"""

from __future__ import annotations

import math
from typing import Callable, Literal, Sequence

import numpy as np

ScheduleName = Literal[
    "linear",  # DDPM: beta from 1e-4 to 0.02, rescaled by 1000 / T so any T spans the same noise range
    "cosine",  # Improved DDPM eq. 17: alpha-bar(t) = cos^2(((t/T + s) / (1 + s)) * pi / 2), s = 0.008
]


def linear_betas(num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """DDPM linear schedule (Ho et al. 2020, sec. 4), scaled to T steps as improved-diffusion does.

    The published endpoints are for T = 1000; for other T both endpoints are multiplied by 1000 / T so that the
    product of (1 - beta_t) -- the total noise added -- stays about the same.
    """
    _check_steps(num_steps)
    scale = 1000.0 / num_steps
    if scale * beta_end >= 1.0:
        raise ValueError(
            f"linear schedule with T = {num_steps} would need beta_T = {scale * beta_end:.3g} >= 1; use T >= "
            f"{int(1000 * beta_end) + 1} or the cosine schedule"
        )
    return np.linspace(scale * beta_start, scale * beta_end, num_steps, dtype=np.float64)


def betas_for_alpha_bar(
    num_steps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999
) -> np.ndarray:
    """Discretise a continuous alpha-bar(t), t in [0, 1], into betas: beta_i = 1 - abar((i+1)/T) / abar(i/T).

    Betas are clipped at `max_beta` (iDDPM sec. 3.2) to avoid the singularity at t = T.
    """
    _check_steps(num_steps)
    t = np.arange(num_steps + 1, dtype=np.float64) / num_steps
    abar = np.array([alpha_bar(x) for x in t], dtype=np.float64)
    return np.minimum(1.0 - abar[1:] / abar[:-1], max_beta)


def cosine_betas(num_steps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Improved DDPM cosine schedule (Nichol & Dhariwal 2021, eq. 17), betas clipped at 0.999."""

    def abar(t: float) -> float:
        return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2

    return betas_for_alpha_bar(num_steps, abar, max_beta)


def explicit_betas(betas: Sequence[float]) -> np.ndarray:
    """A user-given list of betas, validated to lie in (0, 1) (beta = 1 would make alpha-bar zero)."""
    arr = np.asarray(betas, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"betas must be a non-empty 1-D list, got shape {arr.shape}")
    if not np.all((arr > 0) & (arr < 1)):
        bad = int(np.flatnonzero((arr <= 0) | (arr >= 1))[0])
        raise ValueError(f"betas must lie in (0, 1); betas[{bad}] = {arr[bad]}")
    return arr


def named_betas(name: str, num_steps: int) -> np.ndarray:
    """Betas for a schedule name ("linear" or "cosine")."""
    if name == "linear":
        return linear_betas(num_steps)
    if name == "cosine":
        return cosine_betas(num_steps)
    raise ValueError(f"unknown noise schedule {name!r}; known: 'linear', 'cosine'")


def space_timesteps(num_steps: int, spacing: str | int | Sequence[int]) -> list[int]:
    """Which of the T training steps to keep when sampling with fewer steps (improved-diffusion respacing).

    `spacing` forms:
      - "250" or 250: that many steps, as evenly strided as possible over [0, T);
      - "ddim25": a stride that gives exactly 25 steps starting at t = 0 (DDIM paper's "uniform" spacing);
      - "10,15,20": split [0, T) into 3 equal sections and take 10, 15 and 20 evenly spaced steps in each;
      - an explicit list of step indices.
    Returns the sorted list of kept step indices (always in [0, T)).
    """
    _check_steps(num_steps)
    if isinstance(spacing, (list, tuple)):
        kept = sorted(set(int(s) for s in spacing))
        if not kept or kept[0] < 0 or kept[-1] >= num_steps:
            raise ValueError(f"explicit timesteps must lie in [0, {num_steps}), got {list(spacing)}")
        return kept
    text = str(spacing).strip()
    if text.startswith("ddim"):
        count = _parse_count(text[4:], text)
        for stride in range(1, num_steps):
            if len(range(0, num_steps, stride)) == count:
                return list(range(0, num_steps, stride))
        if count == num_steps:
            return list(range(num_steps))
        raise ValueError(f"cannot make exactly {count} evenly strided steps out of {num_steps} ({text!r})")
    counts = [_parse_count(c, text) for c in text.split(",")]
    return _sectioned(num_steps, counts)


def _sectioned(num_steps: int, counts: list[int]) -> list[int]:
    """Split [0, T) into len(counts) near-equal sections and take counts[i] evenly spaced steps from each.

    Exactly improved-diffusion's respace.space_timesteps (Nichol & Dhariwal 2021), so a spacing string picks the
    same steps as the published checkpoints were evaluated with:
      1. sections of T // k steps, the first T % k of them one step longer;
      2. in a section of `length` steps, the fractional stride (length - 1) / (count - 1) keeps both its ends;
      3. the position is a running float sum of that stride, rounded (half to even) at each step. Rounding
         j * stride instead differs in the last bit for some j, which moves a step whenever the exact value
         is a half (e.g. "21" at T = 1000, stride 49.95), so the sum is accumulated as improved-diffusion does.
    """
    size, extra = divmod(num_steps, len(counts))  # 1.
    kept: list[int] = []
    start = 0
    for i, count in enumerate(counts):
        length = size + (1 if i < extra else 0)
        if count > length:
            raise ValueError(f"cannot take {count} steps from a section of {length} steps (T = {num_steps})")
        kept.extend(start + offset for offset in _section_offsets(length, count))
        start += length
    return sorted(set(kept))


def _section_offsets(length: int, count: int) -> list[int]:
    """Offsets of `count` evenly spaced steps within a section of `length` steps (steps 2 and 3 above)."""
    stride = 1.0 if count <= 1 else (length - 1) / (count - 1)  # 2.
    offsets: list[int] = []
    position = 0.0
    for _ in range(count):
        offsets.append(round(position))  # 3. Python's round: half to even, as improved-diffusion
        position += stride
    return offsets


def respace_betas(alphas_cumprod: np.ndarray, kept: Sequence[int]) -> np.ndarray:
    """Betas of a shorter chain that visits only the `kept` steps, with the same alpha-bar at those steps.

    beta'_i = 1 - abar[kept_i] / abar[kept_{i-1}] (with abar[kept_{-1}] = 1), so that the cumulative product of
    (1 - beta') reproduces abar exactly at the kept steps (iDDPM sec. 4, appendix).
    """
    abar = np.asarray(alphas_cumprod, dtype=np.float64)[list(kept)]
    prev = np.concatenate([[1.0], abar[:-1]])
    return 1.0 - abar / prev


def _parse_count(text: str, whole: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise ValueError(
            f"bad timestep spacing {whole!r}: use e.g. '250', 'ddim25' or section counts '10,15,20'"
        ) from None
    if n < 1:
        raise ValueError(f"bad timestep spacing {whole!r}: counts must be >= 1")
    return n


def _check_steps(num_steps: int) -> None:
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"number of diffusion steps must be a positive integer, got {num_steps!r}")
