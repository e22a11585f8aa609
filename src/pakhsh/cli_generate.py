"""The latent diffusion commands (kept out of cli.py, which wires them in):

  pakhsh generate PROMPT...  text-to-image (and map / layout to image) with a latent model pakhsh trained (default:
                             the shipped `t2i`) or a local diffusers Stable Diffusion folder
  pakhsh inpaint IMAGE PROMPT  fill a masked region of an image with a latent model, the rest kept
  pakhsh reconstruct INPUT   an autoencoder's reconstructions and their PSNR / SSIM
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Any

from .cli_args import SAMPLER_NAMES, guidance_scale, nonneg_int, positive_int

DEFAULT_T2I_MODEL = "t2i"
DEFAULT_AUTOENCODER = "autoencoder_f4"


def _add_latent_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=DEFAULT_T2I_MODEL,
                   help="a latent model pakhsh trained (shipped name, run or checkpoint folder) or a diffusers "
                        "Stable Diffusion folder (default: %(default)s, the shipped shapes text-to-image model)")
    p.add_argument("--negative", default=None, help="negative prompt (default: the empty prompt)")
    p.add_argument("--guidance", type=guidance_scale, default=None,
                   help="classifier-free guidance scale (1 = none, 0 = unconditional) (default: 3 for pakhsh "
                        "models, 7.5 for Stable Diffusion folders)")
    p.add_argument("--sampler", choices=SAMPLER_NAMES, default="ddim", help="sampler (default: %(default)s)")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="sampling steps (default: 25 for pakhsh models, 50 for Stable Diffusion folders)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default: auto)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CPU or GPU)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="images per batch (default: %(default)s)")
    p.add_argument("--scale", type=positive_int, default=2, help="integer upscaling of the grid (default: 2)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


def add_generate_parser(sub: Any) -> None:
    p = sub.add_parser(
        "generate", help="text-to-image (and map/layout-to-image) with a latent diffusion model",
        description="Generate images from prompts with a latent diffusion model: the shipped `t2i` (64x64 shapes "
                    "scenes, e.g. \"a large red circle at the top left on a gray background\"), a model you "
                    "trained (pakhsh train t2i), or a local diffusers Stable Diffusion folder. Nothing is "
                    "downloaded. Writes a grid, one row per prompt.")
    p.add_argument("prompts", nargs="*",
                   help="one or more prompts; \"\" means unconditional (may be left out with --map / --layout)")
    _add_latent_sampling(p)
    p.add_argument("--map", dest="segmap", default=None,
                   help="segmentation map PNG (colour or class-id PNG, see `pakhsh.conditioning.segmap`) for "
                        "models trained with maps")
    p.add_argument("--layout", default=None,
                   help="layout JSON: [{\"label\": \"circle\", \"box\": [x0, y0, x1, y1]}, ...] in [0, 1] "
                        "fractions (or pixels), for models trained with layouts")
    p.add_argument("--label", default=None,
                   help="class name or index, for class-conditional latent models (default: the null class)")
    p.add_argument("--num", "-n", type=positive_int, default=1, help="images per prompt (default: %(default)s)")
    p.add_argument("--height", type=nonneg_int, default=0, help="image height (default: the model's size)")
    p.add_argument("--width", type=nonneg_int, default=0, help="image width (default: the model's size)")
    p.add_argument("--out", "-o", default="generated.png",
                   help="grid image; its suffix picks the format (default: %(default)s)")
    p.set_defaults(func=cmd_generate)


def add_inpaint_parser(sub: Any) -> None:
    p = sub.add_parser(
        "inpaint", help="fill a masked region of an image with a latent diffusion model (the rest kept)",
        description="Inpaint with a latent model: the region under the mask (white = fill) is generated to match "
                    "the prompt and its surroundings; the known pixels are kept exactly. Writes a row "
                    "[masked input | output(s)].")
    p.add_argument("source", metavar="IMAGE",
                   help="image file (resized to the model's resolution) or data:INDEX (a shapes test scene)")
    p.add_argument("prompt", nargs="?", default="", help="what to paint (default: \"\", unconditional)")
    p.add_argument("--mask", default="center",
                   help="mask image (white = fill, same size as the image) or center (default: %(default)s)")
    _add_latent_sampling(p)
    p.add_argument("--num", "-n", type=positive_int, default=4, help="outputs, side by side (default: %(default)s)")
    p.add_argument("--out", "-o", default="inpainted.png", help="output image (default: %(default)s)")
    p.set_defaults(func=cmd_inpaint)


def add_reconstruct_parser(sub: Any) -> None:
    p = sub.add_parser(
        "reconstruct", help="encode and decode images with an autoencoder; PSNR and SSIM",
        description="Run a KL autoencoder (latent diffusion's first stage) on images: writes rows of "
                    "[original | reconstruction] and prints PSNR and SSIM of the reconstructions (posterior mean).")
    p.add_argument("input", help="image file, folder of images, or data:N (the first N test scenes)")
    p.add_argument("--model", "-m", default=DEFAULT_AUTOENCODER,
                   help="autoencoder: a shipped name (autoencoder_f4, autoencoder_f8), run or checkpoint folder "
                        "(default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, ... (default: auto)")
    p.add_argument("--max-rows", type=positive_int, default=16, help="pairs shown in the grid (default: 16)")
    p.add_argument("--scale", type=positive_int, default=2, help="integer upscaling of the grid (default: 2)")
    p.add_argument("--out", "-o", default="reconstructed.png", help="grid image (default: %(default)s)")
    p.set_defaults(func=cmd_reconstruct)


# ---------------------------------------------------------------------------------------------- checks
def _check_model(spec: str) -> None:
    from .pipelines.base import resolve_model_path

    resolve_model_path(spec)  # a missing path or unknown shipped name: one line naming it


def check_generate_args(args: argparse.Namespace) -> None:
    """Before any model loads: the model, map and layout files exist and the output names an image format."""
    from .imageio import image_format

    _check_model(args.model)
    if not args.prompts:
        if args.segmap is None and args.layout is None and args.label is None:
            raise ValueError("give a prompt (\"\" for unconditional), or --map / --layout / --label")
        args.prompts = [""]
    for flag, path in (("--map", args.segmap), ("--layout", args.layout)):
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"{flag} {path}: no such file")
    image_format(args.out, "--out")


def check_inpaint_args(args: argparse.Namespace) -> None:
    from .imageio import image_format

    _check_model(args.model)
    if args.source.startswith("data:"):
        if not args.source[5:].strip().isdigit():
            raise ValueError(f"{args.source}: INDEX must be a whole number, e.g. data:0")
    elif not Path(args.source).is_file():
        raise FileNotFoundError(f"{args.source}: no such image file")
    if args.mask != "center" and not Path(args.mask).is_file():
        raise FileNotFoundError(f"--mask {args.mask}: no such file (give a mask image or center)")
    image_format(args.out, "--out")


def check_reconstruct_args(args: argparse.Namespace) -> None:
    from .imageio import image_format

    _check_model(args.model)
    if args.input.startswith("data:"):
        if not args.input[5:].strip().isdigit() or int(args.input[5:]) < 1:
            raise ValueError(f"{args.input}: N must be a whole number >= 1, e.g. data:64")
    elif not Path(args.input).exists():
        raise FileNotFoundError(f"{args.input}: no such file or folder")
    image_format(args.out, "--out")


# ---------------------------------------------------------------------------------------------- commands
def _pipeline(args: argparse.Namespace) -> Any:
    from .pipelines.text_to_image import TextToImagePipeline

    return TextToImagePipeline.from_pretrained(args.model, device=args.device, bf16=args.bf16)


def _settings(args: argparse.Namespace, pipe: Any) -> Any:
    from .pipelines import SampleSettings

    pakhsh_model = pipe.model.config is not None
    guidance = args.guidance if args.guidance is not None else (3.0 if pakhsh_model else 7.5)
    steps = args.steps if args.steps is not None else (25 if pakhsh_model else 50)
    return SampleSettings(args.sampler, steps, guidance=guidance)


def _image_size(pipe: Any) -> int:
    return pipe.model.latent_size[0] * pipe.model.vae_factor


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .imageio import save_grid

    pipe = _pipeline(args)
    extra: dict[str, Any] = {}
    size = _image_size(pipe)
    if args.segmap is not None:
        from .conditioning.segmap import read_segmap

        c = pipe.condition
        classes = c.segmap_classes if c is not None else 7
        extra["segmap"] = read_segmap(args.segmap, classes, size)[None]
    if args.layout is not None:
        from .conditioning.layout import read_layout

        cfg = pipe.model.config
        names = (cfg.class_names if cfg is not None and cfg.class_names else None) or _shape_names()
        boxes, labels = read_layout(args.layout, names, size, cfg.model.layout_max_objects if cfg else 8)
        extra["layout"] = (boxes[None], labels[None])
    prompts = [p for p in args.prompts for _ in range(args.num)]  # row per prompt: its --num images side by side
    if args.label is not None:
        extra["labels"] = torch.full((len(prompts),), _label_index(args.label, pipe), dtype=torch.long)
    x = pipe.generate(prompts, args.negative, _settings(args, pipe), seed=args.seed, height=args.height or None,
                      width=args.width or None, batch_size=args.batch_size, progress=not args.quiet, **extra)
    path = save_grid(x, args.out, nrow=args.num, scale=args.scale)
    print(f"wrote {x.shape[0]} image{'s' * (x.shape[0] != 1)} ({len(args.prompts)} prompt(s) x {args.num}) to {path}")
    return 0


def _label_index(label: str, pipe: Any) -> int:
    """--label NAME or INDEX -> the class index of the model (its recorded class names)."""
    cfg = pipe.model.config
    classes = pipe.unet.cfg.num_classes
    if classes is None:
        raise ValueError(f"--label {label}: this model is not class-conditional")
    names = (cfg.class_names if cfg is not None else None) or []
    if label in names:
        return names.index(label)
    if label.isdigit() and int(label) < classes:
        return int(label)
    known = ", ".join(names) if names else f"0..{classes - 1}"
    raise ValueError(f"--label {label}: not a class of this model ({known})")


def _shape_names() -> list[str]:
    from .data.builtin.shapes import SHAPES

    return list(SHAPES)


def _test_scene(index: int, size: int) -> Any:
    from .data import DataConfig, build_dataset

    ds = build_dataset(DataConfig(name="shapes", split="test", image_size=size, length=max(index + 1, 1)))
    return ds[index]


def cmd_inpaint(args: argparse.Namespace) -> int:
    import torch

    from .imageio import save_grid
    from .tasks.masks import center_mask

    pipe = _pipeline(args)
    size = _image_size(pipe)
    if args.source.startswith("data:"):
        image = _test_scene(int(args.source[5:]), size)["image"][None]
        image_path = None
    else:
        from .pipelines.palette import read_input

        image, image_path = read_input(args.source, size), Path(args.source)
    if args.mask == "center":
        mask = center_mask(size, size).reshape(1, 1, size, size).float()
    else:
        from .pipelines.palette import read_mask_for

        mask = read_mask_for(Path(args.mask), image_path, size)
    n = args.num
    images, masks = image.expand(n, -1, -1, -1), mask.expand(n, -1, -1, -1)
    x = pipe.generate([args.prompt] * n, args.negative, _settings(args, pipe), seed=args.seed,
                      batch_size=args.batch_size, progress=not args.quiet, known=(images, masks))
    shown = image * (1 - mask) + mask * torch.tensor([1.0, -1.0, 1.0]).view(1, 3, 1, 1)  # magenta = to fill
    path = save_grid(torch.cat([shown, x]), args.out, nrow=n + 1, scale=args.scale)
    print(f"wrote [masked input | {n} output(s)] to {path}")
    return 0


def cmd_reconstruct(args: argparse.Namespace) -> int:
    import torch

    from .imageio import save_grid
    from .metrics.restoration import psnr, ssim
    from .pipelines.base import pick_device
    from .training.autoencoder import load_autoencoder

    ae, folder = load_autoencoder(args.model)
    device = pick_device(args.device)
    ae = ae.to(device)
    size = _trained_size(folder)
    x = _read_images(args.input, size)
    outs = []
    with torch.no_grad():
        for start in range(0, x.shape[0], 64):
            outs.append(ae(x[start:start + 64].to(device), sample=False)[0].float().clamp(-1, 1).cpu())
    recon = torch.cat(outs)
    k = min(args.max_rows, x.shape[0])
    rows = torch.stack([x[:k], recon[:k]], dim=1).flatten(0, 1)
    path = save_grid(rows, args.out, nrow=min(8, 2 * k) // 2 * 2, scale=args.scale)
    f = ae.cfg.downsample_factor
    print(f"{x.shape[0]} image(s) through {folder} (f={f}, {ae.cfg.latent_channels}x{size // f}x{size // f} "
          f"latents): PSNR {psnr(recon, x):.2f} dB, SSIM {ssim(recon, x):.4f}; wrote {path}")
    return 0


def _trained_size(folder: Path) -> int:
    from .training.checkpoint import read_config

    return read_config(folder).data.image_size


def _read_images(spec: str, size: int) -> Any:
    """data:N -> the first N shapes test scenes; a file or folder -> its images at the autoencoder's size."""
    import torch

    from .imageio import load_image

    if spec.startswith("data:"):
        from .data import DataConfig, build_dataset

        n = int(spec[5:])
        ds = build_dataset(DataConfig(name="shapes", split="test", image_size=size, length=n))
        return torch.stack([ds[i]["image"] for i in range(n)])
    p = Path(spec)
    if p.is_dir():
        from .data.image_folder import IMAGE_EXTENSIONS

        files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise ValueError(f"{p}: no images in the folder")
    else:
        files = [p]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.cat([load_image(f, size=size, channels=3).reshape(1, 3, size, size) for f in files])
