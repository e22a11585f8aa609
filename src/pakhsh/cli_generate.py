"""`pakhsh generate`: text-to-image with a latent diffusion model (today: a local diffusers Stable Diffusion
folder run on pakhsh's own UNet, VAE, samplers and guidance). Kept out of cli.py, which wires it in."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable


def add_generate_parser(sub: Any, positive_int: Callable[[str], int], nonneg_int: Callable[[str], int],
                        nonneg_float: Callable[[str], float]) -> None:
    p = sub.add_parser(
        "generate", help="text-to-image with a Stable Diffusion folder (pakhsh's own nets and samplers)",
        description="Generate images from prompts with a latent text-to-image model: a local diffusers Stable "
                    "Diffusion folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/). "
                    "Nothing is downloaded. Writes a grid, one row per prompt.")
    p.add_argument("prompts", nargs="+", help="one or more prompts (an empty prompt means unconditional)")
    p.add_argument("--model", "-m", required=True, help="a Stable Diffusion folder in diffusers format")
    p.add_argument("--negative", default=None, help="negative prompt (default: the empty prompt)")
    p.add_argument("--guidance", type=nonneg_float, default=7.5,
                   help="classifier-free guidance scale (1 = none) (default: %(default)s)")
    p.add_argument("--sampler", choices=["ddpm", "ddim", "dpm++2m", "sde-dpm++2m"], default="ddim",
                   help="sampler (default: %(default)s, on the folder scheduler's timesteps)")
    p.add_argument("--steps", type=positive_int, default=50, help="sampling steps (default: %(default)s)")
    p.add_argument("--num", "-n", type=positive_int, default=1, help="images per prompt (default: %(default)s)")
    p.add_argument("--height", type=nonneg_int, default=0, help="image height (default: the model's size)")
    p.add_argument("--width", type=nonneg_int, default=0, help="image width (default: the model's size)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default: auto)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CPU or GPU)")
    p.add_argument("--batch-size", type=positive_int, default=4, help="images per batch (default: %(default)s)")
    p.add_argument("--scale", type=positive_int, default=1, help="integer upscaling of the grid (default: 1)")
    p.add_argument("--out", "-o", default="generated.png",
                   help="grid image; its suffix picks the format (default: %(default)s)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_generate)


def check_generate_args(args: argparse.Namespace) -> None:
    """Before any model loads: the folder exists and the output path names an image format."""
    from .imageio import image_format

    if not Path(args.model).is_dir():
        raise FileNotFoundError(f"--model {args.model}: not a folder; give a diffusers Stable Diffusion folder "
                                "(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)")
    image_format(args.out, "--out")


def cmd_generate(args: argparse.Namespace) -> int:
    from .imageio import save_grid
    from .pipelines import SampleSettings
    from .pipelines.text_to_image import TextToImagePipeline

    pipe = TextToImagePipeline.from_pretrained(args.model, device=args.device, bf16=args.bf16)
    prompts = [p for p in args.prompts for _ in range(args.num)]  # row per prompt: its --num images side by side
    settings = SampleSettings(args.sampler, args.steps, guidance=args.guidance)
    x = pipe.generate(prompts, args.negative, settings, seed=args.seed, height=args.height or None,
                      width=args.width or None, batch_size=args.batch_size, progress=not args.quiet)
    path = save_grid(x, args.out, nrow=args.num, scale=args.scale)
    print(f"wrote {x.shape[0]} image{'s' * (x.shape[0] != 1)} ({len(args.prompts)} prompt(s) x {args.num}) to {path}")
    return 0
