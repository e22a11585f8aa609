"""`pakhsh restore`: Palette image-to-image (and super-resolution) on a file or a folder (kept out of cli.py,
which wires it in)."""

from __future__ import annotations

import argparse
import math
import warnings
from pathlib import Path
from typing import Any

from .cli_args import add_model_args, add_sampler_args, positive_int, side_fraction

import torch

from .pipelines.palette import RESTORE_TASKS
from .tasks import TASK_NAMES
from .tasks.config import MAX_BLUR_SIGMA

DEFAULT_RESTORE_MODEL = "palette"
MASK_KINDS = ("center", "boxes", "freeform")


def add_restore_parser(sub: Any) -> None:
    p = sub.add_parser(
        "restore", help="image-to-image with Palette: colorize, inpaint, uncrop, panorama, jpeg, superres",
        description="Run a Palette model on an image file or a folder of them. Writes, per input, a row "
                    "[degraded input | output(s)] (a folder input: one row per image in OUT/grid.png and each "
                    "output as OUT/<name>.png). Inputs are resized to the model's resolution (superres: to its "
                    "low-resolution input, model size / scale), with a notice.")
    p.add_argument("input", help="image file, folder of images, or data:INDEX (image INDEX of the model's test "
                                 "split; superres: area-downsampled to the model's input size)")
    p.add_argument("--task", default=None, choices=RESTORE_TASKS,
                   help="colorize: colour from the image's luminance; inpaint: fill the --mask; uncrop: extend "
                        "--side by --fraction; panorama: extend right to --width by repeated uncropping; jpeg: "
                        "remove JPEG artefacts (the input is compressed at --quality first when given); superres: "
                        "upsample a low-resolution input by the model's scale (default: the model's own task; "
                        "required for a multi-task model)")
    add_model_args(p)
    p.set_defaults(model=DEFAULT_RESTORE_MODEL)
    add_sampler_args(p)
    p.set_defaults(sampler="sde-dpm++2m", steps=50)
    p.add_argument("--mask", default="center",
                   help="inpaint: a mask image (white = fill; same size as the input) or center, boxes, freeform "
                        "(default: %(default)s)")
    p.add_argument("--side", choices=["left", "right", "top", "bottom", "all"], default="right",
                   help="uncrop: which side to extend (default: %(default)s)")
    p.add_argument("--fraction", type=side_fraction, default=None,
                   help="uncrop: share of the side generated; panorama: share of each new tile (default: the "
                        "model's training fraction, 0.25 for the shipped model)")
    p.add_argument("--quality", type=_quality, default=None,
                   help="jpeg: compress the input at this JPEG quality (1..100; the paper's hardest is 5) before "
                        "restoring; without it the input is taken as already compressed")
    p.add_argument("--blur", type=_sigma, default=None,
                   help="superres: blur the low-resolution input with a Gaussian of this sigma (in its pixels) "
                        "first, as the model's training augmentation does (default: 0, no blur)")
    p.add_argument("--width", type=positive_int, default=None,
                   help="panorama: width of the strip in pixels (default: 4 model widths)")
    p.add_argument("--samples", "-k", type=positive_int, default=1,
                   help="diverse outputs per input, side by side (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per batch (default: %(default)s)")
    p.add_argument("--scale", type=positive_int, default=4, help="integer upscaling of the written images (default: "
                                                                 "%(default)s)")
    p.add_argument("--out", "-o", default=None,
                   help="output image (file input; its suffix picks the format) or folder (folder input) "
                        "(default: restored.png / restored/)")
    p.set_defaults(func=cmd_restore)


def _quality(text: str) -> int:
    try:
        q = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; JPEG quality is 1..100") from None
    if not 1 <= q <= 100:
        raise argparse.ArgumentTypeError(f"{q} is out of range; JPEG quality is 1..100 (5 = the paper's hardest)")
    return q


def _sigma(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; a blur sigma is >= 0 (low-res pixels)") from None
    if not (math.isfinite(v) and 0.0 <= v <= MAX_BLUR_SIGMA):
        raise argparse.ArgumentTypeError(f"{text} is out of range; a blur sigma is in [0, {MAX_BLUR_SIGMA:g}] "
                                         "(low-res pixels)")
    return v


def check_restore_args(args: argparse.Namespace) -> None:
    """Before any model loads: the input exists, flags fit the task, the output path is usable. Without --task
    the task-dependent checks wait for the model (`check_task_flags`, once its task is known)."""
    src = Path(args.input)
    if args.input.startswith("data:"):
        if not args.input[5:].strip().isdigit():
            raise ValueError(f"{args.input}: INDEX must be a whole number, e.g. data:0 (an image of the model's test split)")
        args.out = args.out or "restored.png"
        from .imageio import image_format

        image_format(args.out, "--out")
        if args.task is not None:
            check_task_flags(args)
        return
    if not src.exists():
        raise FileNotFoundError(f"input {args.input}: not found; give an image file or a folder of images")
    if args.out is None:
        args.out = "restored" if src.is_dir() else "restored.png"
    if not src.is_dir():
        from .imageio import image_format

        image_format(args.out, "--out")
    elif Path(args.out).suffix and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out}: the input is a folder, so --out must be a folder (no image suffix)")
    if args.task is not None:
        check_task_flags(args)


def check_task_flags(args: argparse.Namespace) -> None:
    """Flags that fit only some tasks: a missing --mask file is an error, flags of other tasks are ignored with a
    notice, a panorama needs one file."""
    task = args.task
    folder = not args.input.startswith("data:") and Path(args.input).is_dir()
    if args.mask not in MASK_KINDS and task == "inpaint" and not Path(args.mask).is_file():
        raise FileNotFoundError(f"--mask {args.mask}: not a file; give a mask image or one of {', '.join(MASK_KINDS)}")
    if args.quality is not None and task != "jpeg":
        warnings.warn(f"--quality is for --task jpeg; ignored for --task {task}")
    if args.width is not None and task != "panorama":
        warnings.warn(f"--width is for --task panorama; ignored for --task {task}")
    if getattr(args, "blur", None) is not None and task != "superres":
        warnings.warn(f"--blur is for --task superres; ignored for --task {task}")
    if task == "panorama" and folder:
        raise ValueError("--task panorama takes one image file, not a folder")


def cmd_restore(args: argparse.Namespace) -> int:
    from .imageio import save_grid, save_png, to_uint8
    from .pipelines import SampleSettings
    from .pipelines.palette import PalettePipeline, read_input

    # check_restore_args ran in cli.main before any work (it also sets the default --out)
    pipe = PalettePipeline.from_pretrained(args.model, ema=not args.no_ema, device=args.device, bf16=args.bf16,
                                           source=args.source_format, openai_flags=args.openai_flags)
    if args.task is None:
        args.task = pipe.default_task
        if args.task is None:
            raise ValueError(f"{args.model} is a multi-task model ({', '.join(TASK_NAMES)}): choose one with --task")
        check_task_flags(args)
    pipe.check_task(args.task)
    if args.guidance != 1.0:
        warnings.warn(f"--guidance {args.guidance:g} is ignored: Palette models are conditioned on the image, "
                      "without classifier-free guidance")
    if args.steps:
        pipe.check_steps(args.steps, "--steps")
    settings = SampleSettings(args.sampler, args.steps or None, args.eta, threshold=args.threshold, spacing=args.spacing)
    if args.input.startswith("data:"):
        files, images = [Path(args.input.replace(":", "_"))], pipe.data_image(args.input)
        if args.task == "superres":  # a full-size dataset image: the model's input is its downsample
            images = pipe.low_res(images)
    else:
        files = _input_files(Path(args.input))
        images = torch.cat([read_input(f, pipe.input_size(args.task), pipe.size) for f in files])
    if args.task == "panorama":
        return _panorama(args, pipe, images, settings)
    mask = _mask(args, pipe, files) if args.task == "inpaint" else None
    fraction = args.fraction if args.fraction is not None else pipe.task_config.uncrop_fraction
    cond = pipe.prepare(images, args.task, mask=mask, mask_kind=args.mask, side=args.side, fraction=fraction,
                        quality=args.quality, seed=args.seed, blur_sigma=getattr(args, "blur", None) or 0.0)
    out = pipe.restore(cond, settings, samples=args.samples, seed=args.seed, batch_size=args.batch_size,
                       progress=not args.quiet)
    shown = cond["cond_image"]
    rows = torch.cat([torch.cat([shown[i : i + 1], out[i * args.samples : (i + 1) * args.samples]])
                      for i in range(len(files))])
    if Path(args.input).is_dir():
        folder = Path(args.out)
        names = output_names(Path(args.input), files, args.samples)
        for j, name in enumerate(names):
            save_png(to_uint8(out[j : j + 1])[0], folder / name)
        grid = save_grid(rows, folder / overview_name(names), nrow=args.samples + 1, scale=args.scale)
        print(f"wrote {out.shape[0]} outputs for {len(files)} images to {folder}/ (overview: {grid})")
    else:
        path = save_grid(rows, args.out, nrow=args.samples + 1, scale=args.scale)
        print(f"wrote the {args.task} input and {args.samples} output(s) to {path}")
    return 0


def _panorama(args: argparse.Namespace, pipe: Any, images: torch.Tensor, settings: Any) -> int:
    from .imageio import save_grid

    width = args.width or 4 * pipe.size
    fraction = args.fraction if args.fraction is not None else pipe.task_config.uncrop_fraction
    strip = pipe.panorama(images[:1], width, fraction=fraction, settings=settings, seed=args.seed,
                          progress=not args.quiet)
    path = save_grid(strip, args.out, nrow=1, scale=args.scale)
    print(f"wrote a {strip.shape[-1]}x{strip.shape[-2]} panorama to {path}")
    return 0


def output_names(root: Path, files: list[Path], samples: int) -> list[str]:
    """One PNG name per output, mirroring the input folder (a/x.png -> a/x.png, a/x.jpg -> a/x.png); two inputs
    that would share a name (x.png and x.jpg) keep their suffix in it (x_jpg.png). With several samples per
    input: x_0.png, x_1.png, ..."""
    stems = [f.relative_to(root).with_suffix("") for f in files]
    clash = {s for s in stems if stems.count(s) > 1}
    names = []
    for f, stem in zip(files, stems):
        base = f"{stem}_{f.suffix.lstrip('.').lower()}" if stem in clash else str(stem)
        names += [f"{base}.png"] if samples == 1 else [f"{base}_{k}.png" for k in range(samples)]
    return names


def overview_name(names: list[str]) -> str:
    """grid.png, unless an output already has that name."""
    name, k = "grid.png", 0
    while name in names:
        k += 1
        name = f"grid_{k}.png"
    return name


def _input_files(src: Path) -> list[Path]:
    if not src.is_dir():
        return [src]
    from .data.image_folder import scan_images

    files = scan_images(src)
    if not files:
        raise ValueError(f"input folder {src} holds no images (.png, .jpg, ...)")
    return files


def _mask(args: argparse.Namespace, pipe: Any, files: list[Path]) -> torch.Tensor | None:
    """The --mask file for every input (each must have the mask's size), as (N, 1, size, size)."""
    if args.mask in MASK_KINDS:
        return None
    from .pipelines.palette import read_mask_for

    if args.input.startswith("data:"):  # a dataset image is at the model's size already
        return read_mask_for(Path(args.mask), None, pipe.size)
    return torch.cat([read_mask_for(Path(args.mask), f, pipe.size) for f in files])
