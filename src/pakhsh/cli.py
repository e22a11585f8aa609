"""The `pakhsh` command: thin wrappers (parse -> config -> library call) over training and pipelines."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

from .cli_args import (
    DEFAULT_MODEL,
    Parser,
    add_edit_output_args,
    add_model_args,
    add_sampler_args,
    add_source_args,
    key_value,
    lambdas,
    nonneg_int,
    positive_int,
)
from .cli_generate import (
    add_generate_parser,
    add_inpaint_parser,
    add_reconstruct_parser,
    check_generate_args,
    check_inpaint_args,
    check_reconstruct_args,
)
from .cli_dreambooth import add_dreambooth_parser, check_dreambooth_args
from .cli_restore import add_restore_parser, check_restore_args
from .cli_unclip import add_unclip_parser, check_unclip_args
from .threads import MAX_AUTO_THREADS, choose_threads

DEBUG_ENV = "PAKHSH_DEBUG"  # set to 1 for Python tracebacks instead of one-line messages


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="pakhsh", description="Train, sample, edit and evaluate diffusion models (DDPM / Improved DDPM, "
                                   "Palette image-to-image).",
        epilog="Run `pakhsh COMMAND --help` for a command's options.")
    parser.add_argument("--version", action="version", version=f"pakhsh {_version()}")
    parser.add_argument("--threads", type=positive_int, default=None, metavar="N",
                        help="CPU threads for torch (default: the cores this process may run on that other "
                             f"processes leave idle, 1 to {MAX_AUTO_THREADS}; OMP_NUM_THREADS wins when set)")
    parser.add_argument("--verbose", "-v", action="store_true", help="say what was chosen (threads, ...)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model from a shipped or YAML config", description=(
        "Train from a shipped config (`pakhsh configs` lists them) or a YAML file. Override any key with --set "
        "section.key=value; unknown keys are errors. `accelerate launch` or `torchrun` run the same command on "
        "several GPUs/processes."))
    p.add_argument("config", nargs="?",
                   help="shipped config name (e.g. shapes) or YAML file (default: built-in defaults; with --resume: "
                        "the run's own saved config)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", type=key_value,
                   help="override a config key, e.g. --set train.lr=1e-4 --set data.name=fashion_mnist")
    p.add_argument("--out", help="run folder (same as --set train.out_dir=...; default: runs/NAME)")
    p.add_argument("--resume", action="store_true",
                   help="continue exactly from the run folder's latest checkpoint; `--out RUN --resume` alone "
                        "reuses the run's saved config (--set train.steps=N extends a finished run)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in the folder (deletes its checkpoints, log and samples first)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("configs", aliases=["list"], help="list the shipped configs and models",
                       description="The configs `pakhsh train NAME` takes and the models `pakhsh sample -m NAME` "
                                   "takes, from any directory.")
    p.set_defaults(func=cmd_configs)

    p = sub.add_parser("sample", help="sample images and write a PNG grid")
    add_model_args(p)
    add_sampler_args(p)
    p.add_argument("--num", "-n", type=positive_int, default=16, help="number of images (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per batch (default: %(default)s)")
    p.add_argument("--label", action="append",
                   help="class label for class-conditional models: a number or a class name (e.g. --label cat); "
                        "give it once for all images or --num times")
    p.add_argument("--out", "-o", default="samples.png",
                   help="grid image path; its suffix picks the format (.png, .jpg, .webp, ...) (default: %(default)s)")
    p.add_argument("--npz", metavar="PATH",
                   help="also write the images as uint8 NHWC under arr_0 (labels under arr_1), the format of "
                        "improved-diffusion's image_sample.py and the ADM evaluator")
    p.add_argument("--singles", help="also write each image as its own PNG into this folder")
    p.add_argument("--nrow", type=positive_int, default=None, help="images per grid row")
    p.add_argument("--scale", type=positive_int, default=4,
                   help="integer upscaling of the grid PNG (default: %(default)s)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("interpolate", help="interpolate two images through x_t (DDPM sec. 4.3)")
    add_model_args(p)
    p.add_argument("image_a", help="image file, or data:INDEX for an image of the model's test split")
    p.add_argument("image_b", help="image file, or data:INDEX")
    p.add_argument("--lambdas", type=lambdas, default=lambdas("0,0.125,0.25,0.375,0.5,0.625,0.75,0.875,1"),
                   help="mixing weights in [0, 1] (default: 9 evenly spaced)")
    p.add_argument("--t", type=nonneg_int, default=500,
                   help="training step to mix at, 0..T-1 (default: %(default)s)")
    p.add_argument("--mixing", choices=["linear", "slerp"], default="linear", help="how to mix (default: linear)")
    add_edit_output_args(p, "interpolation.png")
    p.set_defaults(func=cmd_interpolate)

    p = sub.add_parser("vary", help="variations of an image from an intermediate x_t (DDPM Fig. 9)")
    add_model_args(p)
    p.add_argument("image", help="image file, or data:INDEX for an image of the model's test split")
    p.add_argument("--t", type=nonneg_int, default=750,
                   help="training step to restart from, 0..T-1 (default: %(default)s)")
    p.add_argument("--count", type=positive_int, default=8, help="number of variations (default: %(default)s)")
    add_edit_output_args(p, "variations.png")
    p.set_defaults(func=cmd_vary)

    p = sub.add_parser("nll", help="bits/dim (full variational bound) on a dataset split")
    add_model_args(p)
    p.add_argument("--split", choices=["train", "test"], default="test")
    p.add_argument("--max-images", type=positive_int, default=256, help="images to evaluate (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--dataset", help="dataset to evaluate on (default: the model's own; needed for diffusers and "
                                     "improved-diffusion models, which record none)")
    p.add_argument("--data-path", help="location of --dataset where it needs one")
    p.add_argument("--json", help="also write the report as JSON here")
    p.set_defaults(func=cmd_nll)

    p = sub.add_parser("eval", help="FID/KID/IS/precision-recall (and bits/dim) of a checkpoint or image folder",
                       description=(
        "Evaluate a checkpoint (it samples) or a folder of images against a dataset split, offline. Features come "
        "from the dataset's built-in feature net (default) or the standard FID Inception read from a local file; "
        "reference statistics are cached per (dataset, split, extractor, size, n). Writes JSON and a markdown table."))
    p.add_argument("source", help="checkpoint/run folder, shipped model name, diffusers pipeline folder or "
                                  "improved-diffusion .pt (sampled), or a folder of images")
    add_source_args(p)
    p.add_argument("--dataset", help="reference dataset (default: the checkpoint's; required for image folders)")
    p.add_argument("--data-path", help="location of the reference dataset where it needs one")
    p.add_argument("--split", choices=["train", "test"], default="train", help="reference split (default: train)")
    p.add_argument("--image-size", type=positive_int,
                   help="reference image size (default: checkpoint's or feature net's)")
    p.add_argument("--num-real", type=positive_int, default=10_000, help="reference images (default: %(default)s)")
    p.add_argument("--num-samples", "-n", type=positive_int, default=1000,
                   help="images to sample, or at most this many from a folder (default: %(default)s)")
    p.add_argument("--feature-net", help="'inception', a shipped net (fashion_mnist, shapes) or a FeatureNet folder "
                                         "(default: the dataset's shipped net)")
    p.add_argument("--inception-weights", metavar="PATH",
                   help="local pt_inception-2015-12-05-6726825d.pth (selects the standard FID Inception)")
    p.add_argument("--metrics", default="fid,kid,is,pr", help="comma-separated subset of fid,kid,is,pr")
    add_sampler_args(p)
    p.add_argument("--bpd", action="store_true", help="also bits/dim (full bound) of the checkpoint on the test split")
    p.add_argument("--bpd-images", type=positive_int, default=256,
                   help="test images for bits/dim (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--strict", action="store_true", help="size/channel mismatches and unreadable files are errors")
    p.add_argument("--stats-dir", help="reference statistics cache (default: ~/.cache/pakhsh/stats)")
    p.add_argument("--json", default="eval.json", help="JSON report path (default: %(default)s)")
    p.add_argument("--markdown", default="eval.md", help="markdown report path (default: %(default)s)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA average")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: auto)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast while sampling")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_eval)

    for add in (add_generate_parser, add_inpaint_parser, add_reconstruct_parser, add_unclip_parser,
                add_dreambooth_parser, add_restore_parser):
        add(sub)

    p = sub.add_parser("info", help="summarise a model: config, parameters, training state")
    p.add_argument("checkpoint", nargs="?", default=DEFAULT_MODEL,
                   help="checkpoint/run folder, shipped name, diffusers pipeline folder or improved-diffusion .pt")
    add_source_args(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("export", help="write an inference-only model folder (pakhsh or diffusers format)",
                       description="Write the EMA weights as an inference-only folder: pakhsh's (config.json + "
                                   "model.safetensors) or a diffusers DDPMPipeline folder that "
                                   "DDPMPipeline.from_pretrained(OUT) loads and that samples exactly as pakhsh does.")
    p.add_argument("checkpoint", help="run or checkpoint folder, or shipped model name")
    p.add_argument("out", help="output folder")
    p.add_argument("--format", choices=["pakhsh", "diffusers"], default="pakhsh",
                   help="pakhsh: config.json + model.safetensors; diffusers: model_index.json, unet/ (UNet2DModel), "
                        "scheduler/ (DDPMScheduler) (default: %(default)s)")
    p.add_argument("--no-ema", action="store_true")
    p.set_defaults(func=cmd_export)
    return parser


def _pipeline(args: argparse.Namespace) -> Any:
    from .pipelines import ImagePipeline

    pipe = ImagePipeline.from_pretrained(args.model, ema=not args.no_ema, device=args.device, bf16=args.bf16,
                                         source=args.source_format, openai_flags=args.openai_flags)
    _check_model_flags(args, pipe)
    return pipe


def _check_model_flags(args: argparse.Namespace, pipe: Any) -> None:
    """Flags whose valid range is the model's own (T): checked right after loading it, before any sampling."""
    if getattr(args, "steps", 0):  # 0 = all steps
        pipe.check_steps(args.steps, "--steps")
    if getattr(args, "t", None) is not None:
        pipe.check_t(args.t, "--t")
    for label in _as_list(getattr(args, "label", None)):
        pipe.label_index(label, "--label")  # a class name the model lacks fails before any sampling
    if getattr(args, "guidance", 1.0) != 1.0 and pipe.loaded.null_class is None:
        what = "unconditional" if pipe.num_classes is None else "class-conditional without a null class"
        warnings.warn(f"--guidance {args.guidance:g} is ignored: this model is {what}")
        args.guidance = 1.0  # said once here; the pipeline would say it again


def _as_list(value: Any) -> list[Any]:
    return [] if value is None else value if isinstance(value, list) else [value]


def cmd_train(args: argparse.Namespace) -> int:
    from .training.distributed import fit_run

    cfg = _train_config(args)
    result = fit_run(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
    # only the main process reports, and only a checkpoint that is on disk
    if result.checkpoint is not None and result.checkpoint.is_dir():
        if result.interrupted:
            print(f"interrupted at step {result.step}; checkpoint: {result.checkpoint}; continue with --resume")
        elif math.isnan(result.last_loss):  # a resumed run already at train.steps: nothing was trained
            print(f"at step {result.step}; checkpoint: {result.checkpoint}")
        else:
            print(f"trained to step {result.step}; last loss {result.last_loss:.5f}; checkpoint: {result.checkpoint}")
    # stopped by a signal (after saving): exit as the shell expects, 128 + signal (130 Ctrl-C, 143 SIGTERM)
    return 128 + result.interrupted if result.interrupted else 0


def _train_config(args: argparse.Namespace) -> Any:
    """The experiment config of `pakhsh train`: a YAML or shipped config + --set, or with `--resume` and no config,
    the run folder's own saved config + --set (the trainer still refuses changes other than resumable train.*)."""
    from .training import load_experiment, load_run_config

    overrides = list(args.overrides) + ([f"train.out_dir={args.out}"] if args.out else [])
    if args.config is not None or not args.resume:
        return load_experiment(args.config, overrides)
    run = args.out or next((o.split("=", 1)[1] for o in reversed(args.overrides)
                            if o.split("=", 1)[0].strip() == "train.out_dir"), None)
    if not run:
        raise ValueError("--resume without a config needs --out RUN: the run folder to continue")
    return load_run_config(run, overrides)


def cmd_configs(args: argparse.Namespace) -> int:
    from .pipelines import shipped_models
    from .training import config_summary, shipped_configs

    configs = shipped_configs()
    width = max(map(len, [*configs, *shipped_models(), ""]))
    print("configs (pakhsh train NAME):")
    for name, path in configs.items():
        print(f"  {name:<{width}}  {config_summary(path)}")
    print("models (pakhsh sample -m NAME; Palette: pakhsh restore; text-to-image: pakhsh generate; autoencoders: "
          "pakhsh reconstruct):")
    for name in shipped_models():
        print(f"  {name:<{width}}  {_model_title(name)}")
    return 0


def _model_title(name: str) -> str:
    """A shipped model's one-line description: the title of its model card (`# shapes: what it is`)."""
    from .pipelines import resolve_model_path

    card = resolve_model_path(name) / "README.md"
    first = card.read_text(errors="replace").splitlines()[0] if card.is_file() else ""
    return first.lstrip("#").strip().removeprefix(f"{name}:").strip()


def cmd_sample(args: argparse.Namespace) -> int:
    from .imageio import save_grid, save_images, save_npz
    from .pipelines import SampleSettings

    pipe = _pipeline(args)
    settings = SampleSettings(args.sampler, args.steps or None, args.eta, args.guidance, threshold=args.threshold,
                              spacing=args.spacing)
    labels = None
    if args.label:
        labels = args.label if len(args.label) > 1 else args.label[0]
        if isinstance(labels, list) and len(labels) != args.num:
            raise ValueError(f"give one --label or exactly --num={args.num} of them, got {len(labels)}")
    x = pipe.generate(args.num, settings, labels=labels, seed=args.seed, batch_size=args.batch_size,
                      progress=not args.quiet)
    path = save_grid(x, args.out, nrow=args.nrow, scale=args.scale)
    written = [str(path)]
    if args.singles:
        save_images(x, args.singles)
        written.append(args.singles.rstrip("/") + "/")
    if args.npz:
        written.append(str(save_npz(x, args.npz, pipe.labels_for(labels, args.num))))
    print(f"wrote {x.shape[0]} samples to {' and '.join(written)}")
    return 0


def _input_image(pipe: Any, spec: str) -> Any:
    """An image file, or data:INDEX from the model's own dataset (test split)."""
    from .imageio import load_image

    if spec.startswith("data:"):
        return pipe.data_image(spec)
    c, size, _ = pipe.image_shape
    return load_image(spec, size=size, channels=c)


def _check_image_spec(spec: str) -> None:
    """Before loading anything: an input image file exists, or data:INDEX has a whole-number INDEX."""
    if spec.startswith("data:"):
        if not spec[5:].strip().lstrip("-").isdigit():
            raise ValueError(f"{spec}: INDEX must be a whole number, e.g. data:0 (an image of the model's test split)")
    elif not Path(spec).is_file():
        what = "is a folder, not an image file" if Path(spec).is_dir() else "not found"
        raise FileNotFoundError(f"image {spec}: {what}; give an image file or data:INDEX")


def cmd_interpolate(args: argparse.Namespace) -> int:
    from .imageio import save_grid

    pipe = _pipeline(args)
    a, b = _input_image(pipe, args.image_a), _input_image(pipe, args.image_b)
    x = pipe.interpolate(a, b, args.lambdas, args.t, steps=args.steps or None, mixing=args.mixing, seed=args.seed,
                         label=args.label, progress=not args.quiet)
    import torch

    row = torch.cat([a, x, b])  # source, the interpolations, target
    path = save_grid(row, args.out, nrow=row.shape[0], scale=args.scale)
    print(f"wrote {len(args.lambdas)} interpolations (t={args.t}) with sources at both ends to {path}")
    return 0


def cmd_vary(args: argparse.Namespace) -> int:
    import torch

    from .imageio import save_grid

    pipe = _pipeline(args)
    img = _input_image(pipe, args.image)
    x = pipe.vary(img, args.t, args.count, steps=args.steps or None, seed=args.seed, label=args.label,
                  progress=not args.quiet)
    path = save_grid(torch.cat([img, x]), args.out, nrow=args.count + 1, scale=args.scale)
    print(f"wrote the source and {args.count} variations from t={args.t} to {path}")
    return 0


def cmd_nll(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from torch.utils.data import DataLoader

    from .data import build_dataset

    pipe = _pipeline(args)
    data = _nll_data(args, pipe)
    ds = build_dataset(replace(data, split=args.split, random_flip=False))
    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=False)
    rep = pipe.nll(iter(loader), max_images=min(args.max_images, len(ds)), seed=args.seed, progress=not args.quiet)
    print(f"{data.name} {args.split}: {rep.bpd:.4f} bits/dim over {rep.num_images} images "
          f"(prior term {rep.prior_bpd:.5f}, decoder term {rep.terms_bpd[0]:.4f}, T={len(rep.terms_bpd)})")
    if args.json:
        Path(args.json).write_text(json.dumps({"dataset": data.name, "split": args.split,
                                               "bpd": rep.bpd, "prior_bpd": rep.prior_bpd,
                                               "terms_bpd": rep.terms_bpd, "num_images": rep.num_images}, indent=2))
    return 0


def _nll_data(args: argparse.Namespace, pipe: Any) -> Any:
    """The dataset nll reads: the model's own, or --dataset at the model's image size and channels."""
    from .data import DataConfig

    if args.dataset is None:
        return pipe.require_data("nll (pass --dataset)")
    c, h, _ = pipe.image_shape
    return DataConfig(name=args.dataset, path=args.data_path, image_size=h, channels=c)


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation import EvalConfig, evaluate

    cfg = EvalConfig(
        source=args.source, source_format=args.source_format, openai_flags=args.openai_flags,
        dataset=args.dataset, data_path=args.data_path, split=args.split,
        image_size=args.image_size, num_real=args.num_real, num_samples=args.num_samples,
        feature_net=args.feature_net, inception_weights=args.inception_weights,
        metrics=tuple(m.strip() for m in args.metrics.split(",") if m.strip()), sampler=args.sampler,
        steps=args.steps or None, spacing=args.spacing, eta=args.eta, guidance=args.guidance, threshold=args.threshold,
        ema=not args.no_ema, bf16=args.bf16,
        bpd=args.bpd, bpd_images=args.bpd_images, batch_size=args.batch_size, seed=args.seed, strict=args.strict,
        stats_dir=args.stats_dir, device=args.device, progress=not args.quiet,
    )  # fmt: skip
    result = evaluate(cfg)
    markdown = result.to_markdown()
    for path, text in ((args.json, json.dumps(result.to_dict(), indent=2) + "\n"), (args.markdown, markdown)):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    print(markdown + f"\nwrote {args.json} and {args.markdown}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .pipelines import resolve_model

    m = resolve_model(args.checkpoint, source=args.source_format, openai_flags=args.openai_flags)
    n_params = sum(p.numel() for p in m.model.parameters())
    print(f"checkpoint: {m.path}\nformat:     {m.kind}\nweights:    {m.weights}\nparameters: {n_params:,}")
    c, h, w = m.image_shape
    if m.config is not None:
        _info_pakhsh(m)
    else:
        print(f"data:       (not recorded) {h}x{w}x{c}")
    if m.num_classes is not None:
        names = f" ({', '.join(m.class_names)})" if m.class_names else ""
        null = f"; null class {m.null_class}" if m.null_class is not None else "; no null class (no guidance)"
        print(f"classes:    {m.num_classes}{names}{null}")
    d = m.diffusion
    schedule = d.schedule if d.betas is None else "explicit betas"
    if m.config is None or m.config.objective not in ("autoencoder", "clip"):
        print(f"diffusion:  T={d.num_steps} {schedule} output={d.model_output.value} variance={d.variance.value} "
              f"loss={d.loss}" + ("" if m.clip_denoised else " (no clipping of x0)"))
    print(json.dumps(_info_json(m), indent=2, default=str))
    return 0


def _info_pakhsh(m: Any) -> None:
    from .training.checkpoint import load_state

    cfg = m.config
    if (m.path / "state.pt").is_file():
        print(f"step:       {load_state(m.path, 'state.pt')['step']}")
    if cfg.is_autoencoder:
        ae = cfg.autoencoder
        f = ae.downsample_factor
        size = cfg.data.image_size
        print(f"data:       {cfg.data.name} {size}x{size}x{ae.in_channels} -> latents {ae.latent_channels}x{size // f}x"
              f"{size // f} (f={f}; `pakhsh reconstruct -m {m.path.name} IMAGES`)")
        return
    if cfg.is_unclip:
        _info_unclip(cfg, m.path.name)
        return
    if cfg.is_latent:
        c = cfg.condition
        conds = [n for n, on in (("text", c is not None and c.text is not None), ("map", c is not None and c.segmap),
                                 ("layout", c is not None and c.layout)) if on]
        print(f"data:       {cfg.data.name} {cfg.data.image_size}x{cfg.data.image_size} via latents "
              f"{cfg.model.in_channels}x{cfg.model.image_size}x{cfg.model.image_size} of {cfg.latent.autoencoder} "
              f"(scale {cfg.latent.scale_factor:.5f})")
        print(f"conditions: {', '.join(conds) or 'none'} (`pakhsh generate -m {m.path.name} ...`)")
        if (db := cfg.dreambooth) is not None:  # a DreamBooth fine-tune: what it learnt, on which base, how
            how = f"LoRA rank {db.lora_rank}" if db.lora_rank is not None else "full fine-tuning"
            how += " + the token's embedding" if db.train_token else ""
            klass = f"\"{db.class_prompt}\"" if db.class_prompt is not None else "its prompts without the token"
            print(f"dreambooth: \"{db.instance}\" on {db.base} (fingerprint {db.base_fingerprint}); {how}; prior "
                  f"weight {db.prior_weight:g} on {db.class_images} class images of {klass}")
        return
    print(f"data:       {cfg.data.name} {cfg.model.image_size}x{cfg.model.image_size}x{cfg.model.out_channels}")
    if cfg.task is not None:  # Palette: what it restores, and how
        how = "regression baseline, one pass" if cfg.objective == "regression" else "diffusion"
        print(f"task:       {cfg.task.name} ({how}; `pakhsh restore --task ... -m {m.path.name}`)")


def _info_unclip(cfg: Any, name: str) -> None:
    size = cfg.data.image_size
    if cfg.objective == "clip":
        c = cfg.clip
        print(f"data:       {cfg.data.name} {size}x{size} images + captions ({cfg.condition.text.name_or_path} "
              f"tokens) -> {c.embed_dim}-d joint embeddings (unCLIP's CLIP)")
        return
    u = cfg.unclip
    part = "prior: caption -> image embedding" if cfg.objective == "prior" else "decoder: image embedding -> image"
    print(f"unclip:     {part}; CLIP {u.clip} (fingerprint {u.clip_fingerprint}), {size}x{size} "
          f"(`pakhsh unclip --{'prior' if cfg.objective == 'prior' else 'decoder'} {name} ...`)")


def _info_json(m: Any) -> dict[str, Any]:
    """The full config: pakhsh's experiment config, or the foreign model's own settings in our terms."""
    from .config import to_dict

    if m.config is not None:
        return to_dict(m.config)
    details = {k: to_dict(v) if hasattr(v, "__dataclass_fields__") else v for k, v in m.details.items()}
    return {"diffusion": to_dict(m.diffusion), **details}


def cmd_export(args: argparse.Namespace) -> int:
    if args.format == "diffusers":
        return _export_diffusers(args)
    from .pipelines import resolve_model_path
    from .training import export_model

    out = export_model(resolve_model_path(args.checkpoint), args.out, ema=not args.no_ema)
    print(f"exported to {out}")
    return 0


def _export_diffusers(args: argparse.Namespace) -> int:
    from .interop.diffusers import export_diffusers
    from .pipelines import resolve_model

    m = resolve_model(args.checkpoint, ema=not args.no_ema, source="pakhsh")
    if m.config is not None and m.config.task is not None:
        raise ValueError(f"{args.checkpoint} is a Palette ({m.config.task.name}) model: diffusers has no pipeline for "
                         "it; export it with --format pakhsh")
    if m.config is not None and (m.config.is_autoencoder or m.config.is_latent or m.config.is_unclip):
        from .pipelines.unconditional import unclip_part

        what = ("an autoencoder" if m.config.is_autoencoder else unclip_part(m.config) if m.config.is_unclip
                else "a latent diffusion model")
        raise ValueError(f"{args.checkpoint} is {what}: --format diffusers writes pixel-space DDPMPipelines only; "
                         "export it with --format pakhsh")
    out = export_diffusers(m.model, m.diffusion, args.out, class_names=m.class_names)
    print(f"exported a diffusers DDPMPipeline folder to {out} (load it with DDPMPipeline.from_pretrained)")
    if m.num_classes is not None:
        print(f"note: class-conditional; DDPMPipeline passes no labels: call pipe.unet(x, t, class_labels=y) "
              f"yourself (label {m.num_classes} = no class)")
    return 0


# Outputs per command: (flag, attribute, is a folder). Checked before any work, so a typo in a path does not cost a
# sampling run.
_OUTPUTS: dict[str, tuple[tuple[str, str, bool], ...]] = {
    "sample": (("--out", "out", False), ("--singles", "singles", True), ("--npz", "npz", False)),
    "interpolate": (("--out", "out", False),),
    "vary": (("--out", "out", False),),
    "nll": (("--json", "json", False),),
    "eval": (("--json", "json", False), ("--markdown", "markdown", False)),
    "export": (("OUT", "out", True),),
    "dreambooth": (("--out", "out", True),),
}


def _check_writable(flag: str, path: str, folder: bool) -> None:
    """Raise ValueError naming `flag` unless `path` can be written: try a temporary file in the nearest existing
    folder on its way (permission bits alone say nothing for root, read-only mounts or /proc)."""
    p = Path(path).expanduser()
    if folder and p.exists() and not p.is_dir():
        raise ValueError(f"{flag} {path}: exists and is not a folder; give a folder path")
    if not folder and p.is_dir():
        raise ValueError(f"{flag} {path}: is a folder; give a file path")
    existing = p if folder else p.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{flag} {path}: {existing} is a file, not a folder; choose another path")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".pakhsh-write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot write in {existing} ({e.strerror}); choose another path") from None


def _check_before_work(args: argparse.Namespace) -> None:
    """Checks that need no model (device, input images, output paths): they fail before anything is computed."""
    if getattr(args, "device", None) is not None:
        from .pipelines.base import pick_device
        from .training.precision import bf16_sampling_notice

        device = pick_device(args.device, "--device")
        if getattr(args, "bf16", False) and (notice := bf16_sampling_notice(device)):
            warnings.warn(notice, stacklevel=1)
    for attr in ("image", "image_a", "image_b"):
        if getattr(args, attr, None) is not None:
            _check_image_spec(getattr(args, attr))
    latent_checks = {"generate": check_generate_args, "inpaint": check_inpaint_args,
                     "reconstruct": check_reconstruct_args, "unclip": check_unclip_args}
    if args.command in latent_checks:
        latent_checks[args.command](args)
        _check_writable("--out", args.out, False)
    if args.command == "dreambooth":  # the run folder is checked with the other outputs below
        check_dreambooth_args(args)
    if args.command == "restore":
        check_restore_args(args)
        _check_writable("--out", args.out, Path(args.input).is_dir())
    if args.command in ("sample", "interpolate", "vary"):
        from .imageio import image_format

        image_format(args.out, "--out")  # the suffix picks the format: an unknown one fails now, not after sampling
    for flag, attr, folder in _OUTPUTS.get(args.command, ()):
        if getattr(args, attr, None):
            _check_writable(flag, getattr(args, attr), folder)


@contextlib.contextmanager
def _one_line_notices(command: str) -> Iterator[None]:
    """Warnings print as `pakhsh CMD: notice: ...`: they are messages to the user, not pointers into our code."""
    original = warnings.formatwarning

    def one_line(message: Any, category: Any, filename: str, lineno: int, line: str | None = None) -> str:
        return f"pakhsh {command}: notice: {message}\n"

    warnings.formatwarning = one_line  # type: ignore[assignment]
    try:
        yield
    finally:
        warnings.formatwarning = original


def _describe(e: Exception) -> tuple[str, int]:
    """One line for an error and the exit code: 2 for what the user can fix (input, paths, disk), 1 for a bug."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        where = e.filename if e.filename2 is None else f"{e.filename} -> {e.filename2}"
        return f"error: {where}: {e.strerror}", 2
    if isinstance(e, (ValueError, OSError, RuntimeError, NotImplementedError)):
        return f"error: {e}", 2
    first = (str(e).strip().splitlines() or [""])[0]
    return f"internal error: {type(e).__name__}: {first} (set {DEBUG_ENV}=1 for the traceback)", 1


def _version() -> str:
    from . import __version__

    return __version__


def _apply_threads(args: argparse.Namespace) -> None:
    import torch

    n, why = choose_threads(args.threads)
    torch.set_num_threads(n)
    if args.verbose:
        print(f"pakhsh {args.command}: using {n} CPU thread(s) ({why})", file=sys.stderr)


def _quiet_broken_pipe() -> int:
    """stdout's reader went away (`pakhsh info | head`): stop quietly, as Unix tools do, and keep Python's exit
    flush from printing a second traceback by pointing stdout at /dev/null."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by a closed pipe


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        with _one_line_notices(args.command):
            _check_before_work(args)
            _apply_threads(args)
            code = func(args)
            sys.stdout.flush()  # a closed pipe shows up here, inside the handler, not at interpreter exit
            return code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except Exception as e:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        message, code = _describe(e)
        print(f"pakhsh {args.command}: {message}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
