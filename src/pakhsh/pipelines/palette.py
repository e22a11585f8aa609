"""Palette inference (Saharia et al. 2022): colorize, inpaint, uncrop, panorama and JPEG restoration with a model
trained by `pakhsh train palette_*`, and super-resolution (SR3; unCLIP's upsampler, `pakhsh train
unclip_upsampler`) - diffusion (any sampler of the core) or the one-pass regression baseline.

`PalettePipeline.from_pretrained("palette")` loads a model; `prepare` turns a user image into the model's
condition (degraded image + mask; for superres the user image is the low-resolution one); `restore` samples K
outputs per input, each from its own seed stream; `panorama` extends an image sideways by repeated uncropping
(the paper's method).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..conditioning.concat import restore as restore_batch
from ..samplers import default_spacing
from ..samplers.common import ImageGenerators, StepProgress, steps_for
from ..tasks import (
    SINGLE_TASKS,
    TASK_NAMES,
    TaskConfig,
    apply_mask,
    area_downsample,
    center_mask,
    degrade,
    freeform_masks,
    box_masks,
    jpeg_compress,
    load_mask,
    panorama_step,
    panorama_tiles_needed,
    stitch_panorama,
    superres_condition,
    to_luma,
    uncrop_canvas,
)
from .base import ResolvedModel, Source, resolve_model
from .unconditional import ImagePipeline, SampleSettings

DEFAULT_PALETTE_MODEL = "palette"
RESTORE_TASKS = SINGLE_TASKS + ("panorama",)


class PalettePipeline(ImagePipeline):
    """A trained Palette (or regression-baseline) model. `task` is what it was trained for: one of SINGLE_TASKS or
    "multi" (the four TASK_NAMES, the task given as the label)."""

    # "auto" is uniform for every sampler: the condition image fixes the layout that noise-dense steps help an
    # unconditional model find, and docs/results/palette.md was measured with uniform steps
    AUTO_SPACING: dict[str, str] = {}

    def __init__(self, loaded: ResolvedModel, device: str | torch.device = "auto", bf16: bool = False) -> None:
        if loaded.config is None or loaded.config.task is None:
            raise ValueError(f"{loaded.path} is not an image-to-image (Palette) model: it was trained without a "
                             "task; give a model made by `pakhsh train palette` (or a palette_* config)")
        super().__init__(loaded, device, bf16)
        assert self.config is not None and self.config.task is not None
        self.task_config: TaskConfig = self.config.task
        self.objective = self.config.objective

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path = DEFAULT_PALETTE_MODEL, *, ema: bool = True,
                        device: str = "auto", bf16: bool = False, source: Source = "auto",
                        openai_flags: str | dict[str, Any] | None = None) -> "PalettePipeline":
        return cls(resolve_model(name_or_path, ema=ema, source=source, openai_flags=openai_flags), device, bf16)

    @property
    def trained_task(self) -> str:
        return self.task_config.name

    @property
    def default_task(self) -> str | None:
        """The task to run when none is named: a single-task model's own; None for a multi-task model."""
        return None if self.trained_task == "multi" else self.trained_task

    @property
    def size(self) -> int:
        """Side of the model's images: what it outputs (and, except for superres, what it takes)."""
        return self.image_shape[1]

    @property
    def scale(self) -> int:
        """How many times larger the output is than the input: task.scale for superres, else 1."""
        return self.task_config.scale if self.trained_task == "superres" else 1

    def input_size(self, task: str) -> int:
        """Side of the input image `prepare` takes for `task`: the model's size / scale for superres."""
        return self.size // self.scale if task == "superres" else self.size

    def low_res(self, image: Tensor) -> Tensor:
        """A full-size image (B, C, size, size) -> the superres model's input, area-downsampled as in training."""
        return area_downsample(image.float(), self.scale)

    def check_task(self, task: str) -> str:
        """The model task that does `task` (panorama is repeated uncropping); an error naming both tasks when
        this checkpoint was trained for another one."""
        if task not in RESTORE_TASKS:
            raise ValueError(f"--task {task}: not a task; use {', '.join(RESTORE_TASKS)}")
        needed = "uncrop" if task == "panorama" else task
        if needed not in TASK_NAMES and self.trained_task != needed:  # multi-task models do the four only
            raise ValueError(f"this checkpoint ({self.loaded.path}) was trained for {self.trained_task}, not {needed} "
                             f"(--task {task}); give a {needed} model with -m")
        if self.trained_task not in ("multi", needed):
            raise ValueError(f"this checkpoint ({self.loaded.path}) was trained for {self.trained_task}, not {needed} "
                             f"(--task {task}); give a {needed} or multi-task model with -m")
        return needed

    # ------------------------------------------------------------------ conditions
    def prepare(self, image: Tensor, task: str, *, mask: Tensor | None = None, mask_kind: str = "center",
                side: str = "right", fraction: float = 0.25, quality: int | None = None, seed: int = 0,
                blur_sigma: float = 0.0) -> dict[str, Tensor]:
        """A user image (B, C, H, W) in [-1, 1] at `input_size(task)` -> the model's condition for `task`:
        colorize: its luma; jpeg: the image itself (already compressed), or compressed at `quality` first;
        inpaint: `mask` (B or 1, 1, H, W), or a generated centre / boxes / freeform mask; uncrop: the image
        squeezed into the known part of the canvas, the `side` band of `fraction` generated; superres: the image
        is the low-resolution one (size / scale), blurred by `blur_sigma` low-res pixels (0: not at all) and
        brought to the model's size exactly as in training (`tasks.superres_condition`)."""
        needed = self.check_task(task)
        b, _, h, w = image.shape
        if needed == "superres":
            cond, m = superres_condition(image.float(), self.scale, (self.size, self.size), blur_sigma)
        elif needed == "colorize":
            cond, m = to_luma(image), torch.ones(b, 1, h, w)
        elif needed == "jpeg":
            cond, m = (image if quality is None else jpeg_compress(image, quality)), torch.ones(b, 1, h, w)
        elif needed == "inpaint":
            m = self._inpaint_mask(b, h, w, mask, mask_kind, seed)
            cond = apply_mask(image, m)
        else:
            parts = [uncrop_canvas(image[i : i + 1], side, fraction) for i in range(b)]
            cond, m = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        return self._cond(cond, m, needed)

    def _inpaint_mask(self, b: int, h: int, w: int, mask: Tensor | None, kind: str, seed: int) -> Tensor:
        if mask is not None:
            return mask.expand(b, 1, h, w).clone() if mask.ndim == 4 else mask.reshape(1, 1, h, w).expand(b, 1, h, w).clone()
        g = torch.Generator().manual_seed(seed)
        if kind == "center":
            return center_mask(h, w).reshape(1, 1, h, w).expand(b, 1, h, w).clone()
        if kind == "boxes":
            return box_masks(b, h, w, g)
        if kind == "freeform":
            return freeform_masks(b, h, w, g)
        raise ValueError(f"--mask {kind}: use a mask image file, center, boxes or freeform")

    def _cond(self, cond_image: Tensor, mask: Tensor, task: str) -> dict[str, Tensor]:
        out = {"cond_image": cond_image.float(), "mask": mask.float()}
        if self.num_classes is not None:  # multi-task: the task is the label
            out["y"] = torch.full((cond_image.shape[0],), TASK_NAMES.index(task), dtype=torch.long)
        return out

    def degrade(self, x0: Tensor, task: str, seed: int = 0) -> dict[str, Tensor]:
        """Held-out originals (B, C, H, W) -> conditions as in training (the model's own task settings, this
        task only), deterministic under `seed`: what the evaluation feeds the model."""
        needed = self.check_task(task)
        cfg = TaskConfig(**{**self.task_config.__dict__, "name": needed})
        deg, _ = degrade(x0.float().cpu(), cfg, torch.Generator().manual_seed(seed))
        return self._cond(deg.cond, deg.mask, needed)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def restore(self, cond: dict[str, Tensor], settings: SampleSettings | None = None, *, samples: int = 1,
                seed: int = 0, batch_size: int = 64, progress: bool = True, first_index: int = 0) -> Tensor:
        """Outputs (N * samples, C, H, W) in [-1, 1] for N conditions: rows n*samples .. n*samples + samples - 1
        are the outputs for input n. Output j draws from its own generator (seed, first_index + j), so results
        do not depend on batch_size; known pixels are the input's exactly."""
        s = settings or SampleSettings()
        if self.objective == "regression":  # one pass: sampler settings do not apply
            s = SampleSettings(steps=None)
        self.check_steps(s.steps)
        n = cond["cond_image"].shape[0]
        rep = {k: v.repeat_interleave(samples, dim=0) for k, v in cond.items()}
        total = n * samples
        spacing = default_spacing(s.sampler, s.steps, self.diffusion.num_steps, self.spacing_rule(s))
        d = self.diffusion.respace(spacing) if spacing else self.diffusion
        per_batch = 1 if self.objective == "regression" else d.num_steps
        kwargs: dict[str, Any] = {"eta": s.eta} if s.sampler == "ddim" else {}
        desc = f"{self.trained_task}: {total} output{'s' * (total != 1)} ({self._how(s, d.num_steps)})"
        out = []
        with StepProgress(steps_for(total, batch_size, per_batch), desc, progress) as bar:
            counted = bar.counted(self.model)
            for start in range(0, total, batch_size):
                b = min(batch_size, total - start)
                gens = ImageGenerators.for_images(seed, range(first_index + start, first_index + start + b))
                x_T = gens.randn(*self.image_shape).to(self.device)
                c = {k: v[start : start + b].to(self.device) for k, v in rep.items()}
                with self._autocast():
                    x = restore_batch(d, counted, c, x_T, sampler=s.sampler, objective=self.objective,
                                      generator=gens, clip_denoised=self._clip(s), threshold=s.threshold, **kwargs)
                out.append(x.float().cpu())
        return torch.cat(out)

    def _how(self, s: SampleSettings, steps: int) -> str:
        return "regression, one pass" if self.objective == "regression" else f"{s.sampler}, {steps} steps"

    def panorama(self, image: Tensor, width: int, *, fraction: float = 0.5, settings: SampleSettings | None = None,
                 seed: int = 0, progress: bool = True) -> Tensor:
        """Extend a (1, C, H, W) image to the right by repeated uncropping until the strip is `width` wide: each
        output is the next input; returns (1, C, H, width)."""
        self.check_task("panorama")
        h, w = image.shape[2:]
        if width < w:
            raise ValueError(f"--width {width}: must be at least the model's image width {w}")
        tiles = [image.float()]
        for k in range(1, panorama_tiles_needed(width, w, fraction)):
            cond_image, mask = panorama_step(tiles[-1], fraction)
            cond = self._cond(cond_image, mask, "uncrop")
            tiles.append(self.restore(cond, settings, seed=seed, progress=progress, first_index=k))
        return stitch_panorama(tiles, fraction)[..., :width]


def read_input(path: str | Path, size: int, output_size: int | None = None) -> Tensor:
    """One image file -> (1, 3, size, size) in [-1, 1] (grey files become RGB); a notice says when it was
    centre-cropped to a square or resized to the model's resolution. `output_size`, when it differs from `size`,
    is a super-resolution model's output side: the notice then says the input is the low-resolution one, so a
    user who gave a full-size image learns that it was shrunk first."""
    from PIL import Image

    from ..imageio import load_image

    x = load_image(path, size=size, channels=3)  # safe decoding and one-line errors naming the file
    with Image.open(path) as im:  # the header only: the size the notices name
        w, h = im.size
    name = Path(path).name
    if w != h:
        warnings.warn(f"{name} is {w}x{h}: centre-cropped to a square", stacklevel=2)
    if min(w, h) != size and output_size not in (None, size):
        warnings.warn(f"{name} is {w}x{h}: resized to {size}x{size}, the low-resolution input of this "
                      f"{output_size // size}x upsampler (the output is {output_size}x{output_size})", stacklevel=2)
    elif min(w, h) != size:
        warnings.warn(f"{name} is {w}x{h}: resized to {size}x{size}, the model's resolution (the output is "
                      f"{size}x{size})", stacklevel=2)
    return x


def read_mask_for(mask_path: Path, image_path: Path | None, size: int) -> Tensor:
    """A user mask (white = generate) for `image_path`: same size as that image (else an error naming both), then
    cropped and resized with it to the model's (1, 1, size, size), kept binary. No image_path: the image is at
    the model's size."""
    from ..data.image_folder import open_image

    if image_path is None:
        w = h = size
    else:
        with open_image(image_path) as img:
            w, h = img.size
    mask, notice = load_mask(mask_path, (h, w))
    if notice:
        warnings.warn(notice, stacklevel=2)
    m = mask.reshape(1, 1, h, w).float()
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    m = m[..., top : top + side, left : left + side]
    if side != size:
        m = torch.nn.functional.interpolate(m, size=(size, size), mode="area")
    return (m >= 0.5).float()
