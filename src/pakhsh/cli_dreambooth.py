"""`pakhsh dreambooth`: subject-driven fine-tuning of a latent text-to-image model (kept out of cli.py, which wires it
in). The run is an ordinary training run (training/dreambooth.py on the one trainer): checkpoints, `--resume`,
`pakhsh generate -m RUN "a sks star ..."`.

  pakhsh dreambooth --subject demo --out runs/dreambooth                  # the built-in demo subject on t2i
  pakhsh dreambooth --subject DIR --class-noun star --token sks -m t2i --out RUN [--lora 4] [--prior-weight 1]
"""

from __future__ import annotations

import argparse
import math
import warnings
from pathlib import Path
from typing import Any

from .cli_args import key_value, nonneg_float, nonneg_int, positive_int

DEMO = "demo"
SUBJECT_FOLDER = "subject"  # RUN/subject: where --subject demo is written


def add_dreambooth_parser(sub: Any) -> None:
    p = sub.add_parser(
        "dreambooth", help="DreamBooth: fine-tune a text-to-image model on a few images of one subject",
        description="Fine-tune a latent text-to-image model (default: the shipped t2i) on 3-5 images of one subject, "
                    "learnt under a rare identifier beside its class noun (\"a sks star\"). Images of the plain class "
                    "(the same prompts without the identifier: \"a star\"), generated once by the frozen base and "
                    "cached, are trained alongside with weight "
                    "--prior-weight (prior preservation), so the class keeps its variety. Full fine-tuning of the "
                    "UNet, or LoRA adapters on its attention with --lora RANK. Afterwards: pakhsh generate -m RUN "
                    "\"a sks star at the bottom right on a blue background\".")
    p.add_argument("--subject", default=None,
                   help="folder of the subject's images (a NAME.txt beside an image is its caption and must contain "
                        "the token; images without one use --instance-prompt), or `demo`: the built-in demo subject "
                        "(a two-tone star in 4 scenes, written to RUN/subject)")
    p.add_argument("--class-noun", default=None,
                   help="the subject's class as the base's prompts name it, e.g. star (default for --subject demo: "
                        "star)")
    p.add_argument("--token", default="sks", help="the rare identifier (one word) (default: %(default)s)")
    p.add_argument("--model", "-m", default="t2i",
                   help="the base: a latent text-to-image model (shipped name, run or checkpoint) "
                        "(default: %(default)s)")
    p.add_argument("--out", default=None, help="run folder (default: runs/dreambooth)")
    p.add_argument("--instance-prompt", default=None,
                   help="prompt of subject images without a caption (default: \"a TOKEN CLASS-NOUN\")")
    p.add_argument("--class-prompt", default=None,
                   help="what the class images are generated from (default: each subject prompt without the token: "
                        "\"a sks star at the top left on a gray background\" -> \"a star at the top left on a gray "
                        "background\"; \"a sks star\" -> \"a star\")")
    p.add_argument("--class-images", type=nonneg_int, default=100,
                   help="class images for prior preservation (default: %(default)s)")
    p.add_argument("--prior-weight", type=nonneg_float, default=1.0,
                   help="lambda in L = L_subject + lambda L_prior; 0 trains on the subject alone "
                        "(default: %(default)s)")
    p.add_argument("--lora", type=positive_int, default=None, metavar="RANK",
                   help="train LoRA adapters of this rank on the attention projections instead of the whole UNet "
                        "(saved also as a diffusers LoRA folder, RUN/lora)")
    p.add_argument("--train-token", action="store_true",
                   help="also learn the identifier's input embedding in the frozen text encoder (textual inversion: "
                        "one vector per tokenizer piece); with --lora it is saved beside the adapters")
    p.add_argument("--steps", type=positive_int, default=None, help="optimizer steps (default: 400)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="items per step, each one subject and one class image (default: 4)")
    p.add_argument("--lr", type=_positive_float, default=None,
                   help="learning rate (default: 3e-4 full fine-tuning, 1e-3 LoRA)")
    p.add_argument("--seed", type=int, default=0, help="training seed (default: %(default)s)")
    p.add_argument("--class-seed", type=int, default=0, help="seed of the class images (default: %(default)s)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", type=key_value,
                   help="override any key of the run's config, e.g. --set train.save_every=50")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out exactly; without --subject, with the run's own saved config")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_dreambooth)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


# ---------------------------------------------------------------------------------------------- checks
def check_dreambooth_args(args: argparse.Namespace) -> None:
    """Before any model loads: flags that fit together, a readable subject folder, a base that DreamBooth takes."""
    from .training.experiment import has_word

    if args.out is None:
        args.out = "runs/dreambooth"
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite deletes it: use one of them")
    if args.subject is None:
        if not args.resume:
            raise ValueError("--subject is required: a folder of the subject's images, or demo (the built-in one)")
        return  # --resume alone: the run's saved config says everything
    if args.class_noun is None:
        if args.subject != DEMO:
            raise ValueError("--class-noun is required: the subject's class as the base's prompts name it, e.g. star")
        args.class_noun = "star"
    if not args.token.strip() or len(args.token.split()) != 1:
        raise ValueError(f"--token {args.token!r}: must be one word, e.g. sks")
    if not args.class_noun.strip():
        raise ValueError("--class-noun is empty: name the subject's class, e.g. star")
    if args.token.lower() in args.class_noun.lower().split():
        raise ValueError(f"--token {args.token} is the class noun: pick a rare word, e.g. sks")
    if args.instance_prompt is not None and not has_word(args.instance_prompt, args.token):
        raise ValueError(f"--instance-prompt {args.instance_prompt!r} lacks the token {args.token!r}: the subject is "
                         "learnt under it")
    if args.prior_weight > 0 and args.class_images < 1:
        raise ValueError(f"--class-images {args.class_images}: prior preservation (--prior-weight "
                         f"{args.prior_weight:g}) needs at least 1 class image; --prior-weight 0 trains without")
    if args.subject != DEMO:
        check_subject_folder(Path(args.subject))
    from .training.dreambooth_base import read_base_config

    read_base_config(args.model)


def check_subject_folder(folder: Path) -> list[Path]:
    """The subject's images: a folder holding at least one image, directly (no class subfolders), every one of
    them readable (decoded here: a subject of 3-5 images cannot afford to skip one silently)."""
    from PIL import Image

    from .data.image_folder import scan_images, verify_image

    if not folder.exists():
        raise FileNotFoundError(f"--subject {folder}: no such folder (give a folder of the subject's images, or demo)")
    if not folder.is_dir():
        raise ValueError(f"--subject {folder}: is a file; give the folder that holds the subject's images")
    images = scan_images(folder)
    if not images:
        raise ValueError(f"--subject {folder}: no images (png, jpg, webp, bmp); DreamBooth needs 1 or more, 3-5 is "
                         "usual")
    nested = [p for p in images if p.parent != folder]
    if nested:
        raise ValueError(f"--subject {folder}: {nested[0].relative_to(folder)} is in a subfolder; put the subject's "
                         "images directly in the folder")
    for path in images:
        problem = verify_image(path)
        if problem is None:
            try:
                with Image.open(path) as im:
                    im.load()
            except Exception as e:  # truncated data only shows when decoding
                problem = f"{type(e).__name__}: {e}"
        if problem is not None:
            raise ValueError(f"--subject: {path} is not a readable image ({problem}); fix or remove it")
    if len(images) > 20:
        warnings.warn(f"--subject {folder}: {len(images)} images; DreamBooth is meant for a few (3-5) of one subject")
    return images


# ---------------------------------------------------------------------------------------------- the command
def dreambooth_run_config(args: argparse.Namespace) -> Any:
    """The run's config from the flags (writing the demo subject into the run folder when asked for), or with
    `--resume` and no --subject the run's own saved config."""
    from .training.checkpoint import load_run_config
    from .training.dreambooth import dreambooth_config
    from .training.experiment import DreamBoothConfig

    out = Path(args.out)
    if args.subject is None:
        cfg = load_run_config(out, args.overrides)
        if cfg.dreambooth is None:
            raise ValueError(f"--resume: {out} is not a DreamBooth run; continue it with `pakhsh train --out {out} "
                             "--resume`")
        return cfg
    subject = Path(args.subject)
    if args.subject == DEMO:
        from .data.builtin.subject import write_demo_subject

        subject = out / SUBJECT_FOLDER
        if args.overwrite or not subject.is_dir():  # a run's own subject folder is left as it trained on it
            write_demo_subject(subject, args.token)
    db = DreamBoothConfig(base=args.model, token=args.token, class_noun=args.class_noun,
                          instance_prompt=args.instance_prompt, class_prompt=args.class_prompt,
                          class_images=args.class_images if args.prior_weight > 0 else 0,
                          prior_weight=args.prior_weight, class_seed=args.class_seed, lora_rank=args.lora,
                          train_token=args.train_token)
    extra: dict[str, Any] = {}
    if args.steps is not None:
        extra["steps"] = args.steps
    if args.batch_size is not None:
        extra["batch_size"] = args.batch_size
    return dreambooth_config(args.model, subject.resolve(), out, db, lr=args.lr, seed=args.seed,
                             overrides=args.overrides, **extra)


def cmd_dreambooth(args: argparse.Namespace) -> int:
    from .training.distributed import fit_run
    from .training.dreambooth_base import save_lora

    cfg = dreambooth_run_config(args)
    result = fit_run(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
    if result.checkpoint is None or not result.checkpoint.is_dir():
        return 128 + result.interrupted if result.interrupted else 0
    db = cfg.dreambooth
    if result.interrupted:
        print(f"interrupted at step {result.step}; checkpoint: {result.checkpoint}; continue with "
              f"`pakhsh dreambooth --out {args.out} --resume`")
        return 128 + result.interrupted
    print(f"trained to step {result.step}; last loss {result.last_loss:.5f}; checkpoint: {result.checkpoint}")
    if db.lora_rank is not None:
        print(f"LoRA adapters (diffusers layout): {save_lora(args.out)}")
    where = " at the bottom right on a blue background" if args.subject == DEMO else " ..."
    print(f"generate with: pakhsh generate -m {args.out} \"{db.instance}{where}\"")
    return 0
