"""Palette's image-to-image tasks: degradations for training and condition building for inference.

`degrade` turns a clean batch into (cond, mask) plus task ids; the single-purpose pieces (luma, JPEG, masks,
uncropping canvases, panorama bookkeeping, super-resolution's low-res condition) also prepare a user's inputs
at inference time. Depends only on
torch, numpy, PIL and `pakhsh.data.transforms`.
"""

from pakhsh.tasks.colorize import to_luma
from pakhsh.tasks.config import SINGLE_TASKS, TASK_NAMES, Degraded, TaskConfig
from pakhsh.tasks.degrade import degrade
from pakhsh.tasks.jpeg import jpeg_compress
from pakhsh.tasks.mask_file import load_mask
from pakhsh.tasks.masks import apply_mask, box_masks, center_mask, freeform_masks, uncrop_mask
from pakhsh.tasks.superres import area_downsample, gaussian_blur, superres_condition, upsample_nearest
from pakhsh.tasks.uncrop import panorama_step, panorama_tiles_needed, stitch_panorama, uncrop_canvas

__all__ = [
    "SINGLE_TASKS",
    "TASK_NAMES",
    "Degraded",
    "TaskConfig",
    "apply_mask",
    "area_downsample",
    "box_masks",
    "center_mask",
    "degrade",
    "freeform_masks",
    "gaussian_blur",
    "jpeg_compress",
    "load_mask",
    "panorama_step",
    "panorama_tiles_needed",
    "stitch_panorama",
    "superres_condition",
    "to_luma",
    "uncrop_canvas",
    "uncrop_mask",
    "upsample_nearest",
]
