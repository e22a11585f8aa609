"""`pakhsh unclip`: the DALL-E 2 system (kept out of cli.py, which wires it in).

  pakhsh unclip "caption" ...           caption -> prior -> CLIP image embedding -> decoder -> upsampler
  pakhsh unclip --variations IMAGE      the image's CLIP embedding decoded with new noise (the paper's Fig. 24)
  pakhsh unclip --interpolate A B       slerp between two images' embeddings, decoded with one noise
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .cli_args import SAMPLER_NAMES, guidance_scale, positive_int



def add_unclip_parser(sub: Any) -> None:
    from .pipelines.unclip import DEFAULT_DECODER, DEFAULT_PRIOR, DEFAULT_UPSAMPLER

    p = sub.add_parser(
        "unclip", help="unCLIP (DALL-E 2): captions -> images, image variations, interpolations",
        description="Run unCLIP: a caption goes through the CLIP text encoder and the diffusion prior to a CLIP "
                    "image embedding, the decoder turns that into a 32x32 image and the diffusion upsampler into "
                    "64x64. --variations decodes one image's embedding with new noise; --interpolate walks the "
                    "slerp between two images' embeddings. The shipped models (unclip_prior, unclip_decoder, "
                    "unclip_upsampler on unclip_clip) know 64x64 shapes scenes, e.g. \"a large red circle at the "
                    "top left on a gray background\". Writes a grid.")
    p.add_argument("captions", nargs="*", help="one or more captions (one row of --num images each)")
    p.add_argument("--variations", metavar="IMAGE", default=None,
                   help="image file or data:INDEX (a shapes test scene): write [image | --num variations]")
    p.add_argument("--interpolate", nargs=2, metavar=("A", "B"), default=None,
                   help="two images (files or data:INDEX): write [A | --num interpolations | B]")
    p.add_argument("--num", "-n", type=positive_int, default=4,
                   help="images per caption, variations or interpolation steps (default: %(default)s)")
    p.add_argument("--prior", default=DEFAULT_PRIOR, help="prior: shipped name, run or checkpoint (default: %(default)s)")
    p.add_argument("--decoder", default=DEFAULT_DECODER,
                   help="decoder: shipped name, run or checkpoint (default: %(default)s)")
    p.add_argument("--upsampler", default=DEFAULT_UPSAMPLER,
                   help="super-resolution model (default: %(default)s); `none` stops at the decoder's 32x32")
    p.add_argument("--prior-guidance", type=guidance_scale, default=2.0, help="prior guidance scale (default: 2)")
    p.add_argument("--decoder-guidance", type=guidance_scale, default=3.0, help="decoder guidance scale (default: 3)")
    p.add_argument("--prior-steps", type=positive_int, default=25, help="prior sampling steps (default: 25)")
    p.add_argument("--decoder-steps", type=positive_int, default=25, help="decoder sampling steps (default: 25)")
    p.add_argument("--upsampler-steps", type=positive_int, default=50, help="upsampler sampling steps (default: 50)")
    p.add_argument("--candidates", type=positive_int, default=2,
                   help="prior samples per caption; the one closest to the caption's CLIP text embedding is kept "
                        "(the paper's choice: 2) (default: %(default)s)")
    p.add_argument("--sampler", choices=SAMPLER_NAMES, default="ddim",
                   help="sampler of the prior and the decoder (default: ddim)")
    p.add_argument("--upsampler-sampler", choices=SAMPLER_NAMES, default="ddpm",
                   help="sampler of the upsampler (default: ddpm, ancestral: DDIM leaves residual noise in its "
                        "outputs)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default: auto)")
    p.add_argument("--bf16", action="store_true",
                   help="bf16 autocast for the prior, decoder and upsampler (CPU or GPU)")
    p.add_argument("--scale", type=positive_int, default=2, help="integer upscaling of the grid (default: 2)")
    p.add_argument("--out", "-o", default="unclip.png", help="grid image; its suffix picks the format "
                                                           "(default: %(default)s)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_unclip)


def check_unclip_args(args: argparse.Namespace) -> None:
    """Before any model loads: one mode, non-empty captions, existing models and inputs, a known output format."""
    from .data.image_folder import verify_image
    from .imageio import image_format
    from .pipelines.base import resolve_model_path

    modes = [bool(args.captions), args.variations is not None, args.interpolate is not None]
    if sum(modes) != 1:
        raise ValueError("give captions, or --variations IMAGE, or --interpolate A B (exactly one of them)")
    for i, c in enumerate(args.captions, 1):
        if not c.strip():
            raise ValueError(f"caption {i} is empty: describe the image, e.g. \"a small blue star at the center "
                             "on a white background\"")
    for flag, spec in (("--prior", args.prior), ("--decoder", args.decoder), ("--upsampler", args.upsampler)):
        if flag == "--upsampler" and spec == "none":
            continue
        if flag == "--prior" and not args.captions:
            continue  # variations and interpolations do not use the prior
        try:
            resolve_model_path(spec)
        except FileNotFoundError:
            raise FileNotFoundError(f"{flag} {spec}: no such folder or shipped model") from None
    for spec in ([args.variations] if args.variations else []) + list(args.interpolate or []):
        if spec.startswith("data:"):
            if not spec[5:].strip().isdigit():
                raise ValueError(f"{spec}: INDEX must be a whole number, e.g. data:0")
        elif not Path(spec).is_file():
            what = "is a folder, not an image file" if Path(spec).is_dir() else "not found"
            raise FileNotFoundError(f"image {spec}: {what}; give an image file or data:INDEX")
        elif (problem := verify_image(Path(spec))) is not None:  # the header only: no model has loaded yet
            raise ValueError(f"image {spec}: not a readable image ({problem}); give a PNG or JPEG file or data:INDEX")
    if args.interpolate is not None and args.num < 2:
        raise ValueError(f"--num {args.num}: an interpolation needs at least 2 images")
    image_format(args.out, "--out")


def _image(spec: str, size: int) -> Any:
    """An image file (resized to the CLIP's input size, with a notice) or data:INDEX -> (1, 3, size, size)."""
    if spec.startswith("data:"):
        from .cli_generate import _test_scene

        return _test_scene(int(spec[5:]), size)["image"][None]
    import warnings

    from PIL import Image

    from .imageio import load_image

    x = load_image(spec, size=size, channels=3)  # safe decoding, one-line errors naming the file
    with Image.open(spec) as im:
        w, h = im.size
    if (w, h) != (size, size):
        warnings.warn(f"{Path(spec).name} is {w}x{h}: {'centre-cropped and ' if w != h else ''}resized to "
                      f"{size}x{size}, the CLIP's input size", stacklevel=2)
    return x


def cmd_unclip(args: argparse.Namespace) -> int:
    import torch

    from .imageio import save_grid
    from .pipelines.unclip import UnclipPipeline, UnclipSettings

    settings = UnclipSettings(args.prior_steps, args.prior_guidance, args.candidates, args.decoder_steps,
                              args.decoder_guidance, args.upsampler_steps, args.sampler, args.upsampler_sampler)
    upsampler = None if args.upsampler == "none" else args.upsampler
    prior = args.prior if args.captions else None  # variations and interpolations start from images
    pipe = UnclipPipeline.from_pretrained(prior, args.decoder, upsampler, device=args.device, bf16=args.bf16)
    n = args.num
    if args.captions:
        captions = [c for c in args.captions for _ in range(n)]
        x = pipe.generate(captions, settings, seed=args.seed, progress=not args.quiet)
        path = save_grid(x, args.out, nrow=n, scale=args.scale)
        print(f"wrote {x.shape[0]} image(s) ({len(args.captions)} caption(s) x {n}, {x.shape[-1]}x{x.shape[-2]}) "
              f"to {path}")
        return 0
    size = pipe.image_size
    if args.variations is not None:
        image = _image(args.variations, size)
        x = pipe.variations(image, n, settings, seed=args.seed)
        row = torch.cat([_shown(image, x), x])
        path = save_grid(row, args.out, nrow=n + 1, scale=args.scale)
        print(f"wrote [image | {n} variations] to {path}")
        return 0
    a, b = (_image(s, size) for s in args.interpolate)
    x = pipe.interpolate(a, b, n, settings, seed=args.seed)
    row = torch.cat([_shown(a, x), x, _shown(b, x)])
    path = save_grid(row, args.out, nrow=n + 2, scale=args.scale)
    print(f"wrote [A | {n} interpolations | B] to {path}")
    return 0


def _shown(image: Any, like: Any) -> Any:
    """The input image at the outputs' size, for the grid."""
    import torch.nn.functional as F

    if image.shape[-1] == like.shape[-1]:
        return image
    return F.interpolate(image.float(), size=like.shape[-2:], mode="bilinear", align_corners=False)
