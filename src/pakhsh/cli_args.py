"""What every `pakhsh` subcommand's parser shares: one-line parse errors, the argparse types that validate
numbers at parse time (the message names the flag), and the model / sampler / output argument groups.

The cli_* modules import these directly, so each defines its subcommand with the same flag types and wording.
"""

from __future__ import annotations

import argparse
import math
from typing import Any, Callable

from .samplers import SAMPLERS
from .samplers import SPACINGS as SAMPLER_SPACINGS

DEFAULT_MODEL = "shapes"
SAMPLER_NAMES = list(SAMPLERS)
SPACINGS = ["auto", *SAMPLER_SPACINGS]  # "auto": the pipeline's choice for the sampler (ImagePipeline.AUTO_SPACING)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the usage block buries the message that says what to fix."""

    def error(self, message: str) -> Any:  # argparse's signature says NoReturn; it exits
        # "argument --set: --set expects ..." -> "--set expects ...": our own messages already name the flag
        head, sep, rest = message.partition(": ")
        if head.startswith("argument ") and sep and rest.startswith(head[len("argument "):].split("/")[0] + " "):
            message = rest
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= low (counts, sizes, steps); the message names the flag via argparse."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"int>={low}"
    return parse


positive_int = int_at_least(1)
nonneg_int = int_at_least(0)


def float_in(low: float, high: float = math.inf, low_open: bool = False, hint: str = "") -> Callable[[str], float]:
    """An argparse type: a finite float in [low, high] ((low, high] when low_open; no upper bound when high is inf)."""
    if high < math.inf:
        span = f"in {'(' if low_open else '['}{low:g}, {high:g}]"
    else:
        span = f"{'>' if low_open else '>='} {low:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < low or value > high or (low_open and value == low):
            raise argparse.ArgumentTypeError(f"must be {span}, got {text}{hint}")
        return value

    parse.__name__ = "number"
    return parse


guidance_scale = float_in(0.0, hint=" (1 = no guidance)")
nonneg_float = float_in(0.0)
side_fraction = float_in(0.0, 1.0, low_open=True, hint=" (a share of the image side)")


def lambdas(text: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"lambdas must be comma-separated numbers, got {text!r}") from None
    if not vals or any(not 0 <= v <= 1 for v in vals):
        raise argparse.ArgumentTypeError(f"lambdas must lie in [0, 1], got {text!r}")
    return vals


def key_value(text: str) -> str:
    """An argparse type for --set: KEY=VALUE (without it, argparse would blame the next word instead)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--set expects KEY=VALUE, got {text!r}")
    return text


def add_source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="source_format", choices=["auto", "pakhsh", "diffusers", "openai"], default="auto",
                   help="model format (default: auto: a folder with model_index.json is diffusers, a .pt file is "
                        "openai/improved-diffusion, anything else pakhsh)")
    p.add_argument("--openai-flags", metavar="FLAGS|FILE",
                   help="for an improved/guided-diffusion .pt: the flags it was trained with, e.g. "
                        "\"--image_size 64 --num_channels 128 --learn_sigma True\", or a file holding them (text or "
                        "JSON object)")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=DEFAULT_MODEL,
                   help="checkpoint folder, run folder (its latest checkpoint), shipped model name, diffusers "
                        "pipeline folder or improved-diffusion .pt file "
                        "(default: %(default)s; `pakhsh configs` lists the shipped models)")
    add_source_args(p)
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA average")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default: auto)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CPU or GPU)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")


def add_sampler_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sampler", choices=SAMPLER_NAMES, default="ddpm",
                   help="ddpm: ancestral; ddim: DDIM (eta); dpm++2m: DPM-Solver++(2M); sde-dpm++2m: its stochastic "
                        "variant, the best at 20 steps (default: %(default)s)")
    p.add_argument("--steps", type=nonneg_int, default=100,
                   help="sampling steps, a subset of the training steps (0 = all) (default: %(default)s)")
    p.add_argument("--spacing", choices=SPACINGS, default="auto",
                   help="which training steps --steps visits: uniform (improved-diffusion's even stride), noise-dense "
                        "(crowded towards pure noise) or auto: noise-dense for sde-dpm++2m on unconditional and "
                        "class-conditional models, uniform for the other samplers and for Palette (default: "
                        "%(default)s)")
    p.add_argument("--eta", type=float_in(0.0, 1.0), default=0.0, help="DDIM eta in [0, 1] (default: %(default)s)")
    p.add_argument("--guidance", type=float_in(0.0, hint=" (1 = no guidance, 0 = unconditional)"), default=1.0,
                   help="classifier-free guidance scale for class-conditional models (default: %(default)s)")
    p.add_argument("--threshold", type=float_in(0.0, 1.0, low_open=True), default=None,
                   help="dynamic thresholding percentile in (0, 1], e.g. 0.995, instead of clipping x0")


def add_edit_output_args(p: argparse.ArgumentParser, default_out: str) -> None:
    p.add_argument("--steps", type=nonneg_int, default=0,
                   help="respaced ancestral steps for decoding (0 = all, as the paper)")
    p.add_argument("--out", "-o", default=default_out,
                   help="image path; its suffix picks the format (.png, .jpg, .webp, ...) (default: %(default)s)")
    p.add_argument("--scale", type=positive_int, default=4,
                   help="integer upscaling of the image (default: %(default)s)")
    p.add_argument("--label", help="class label (number or class name) for class-conditional models "
                                   "(default: the null class, i.e. unconditional)")
