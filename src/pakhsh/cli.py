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

DEFAULT_MODEL = "shapes"
DEBUG_ENV = "PAKHSH_DEBUG"  # set to 1 for Python tracebacks instead of one-line messages


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: the usage block buries the message that says what to fix."""

    def error(self, message: str) -> Any:  # argparse's signature says NoReturn; it exits
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _int_at_least(low: int) -> Callable[[str], int]:
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


_positive_int = _int_at_least(1)
_nonneg_int = _int_at_least(0)


def _float_in(low: float, high: float = math.inf, low_open: bool = False, hint: str = "") -> Callable[[str], float]:
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


def _lambdas(text: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"lambdas must be comma-separated numbers, got {text!r}") from None
    if not vals or any(not 0 <= v <= 1 for v in vals):
        raise argparse.ArgumentTypeError(f"lambdas must lie in [0, 1], got {text!r}")
    return vals


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=DEFAULT_MODEL,
                   help="checkpoint folder, run folder (its latest checkpoint) or shipped model name "
                        "(default: %(default)s; shipped: shapes, fashion_mnist)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA average")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default: auto)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CPU or GPU)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")


def _add_sampler_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sampler", choices=["ddpm", "ddim", "dpm++2m", "sde-dpm++2m"], default="ddpm",
                   help="ddpm: ancestral; ddim: DDIM (eta); dpm++2m: DPM-Solver++(2M); sde-dpm++2m: its stochastic "
                        "variant, the best at 20 steps (default: %(default)s)")
    p.add_argument("--steps", type=_nonneg_int, default=100,
                   help="sampling steps, a subset of the training steps (0 = all) (default: %(default)s)")
    p.add_argument("--eta", type=_float_in(0.0, 1.0), default=0.0, help="DDIM eta in [0, 1] (default: %(default)s)")
    p.add_argument("--guidance", type=_float_in(0.0, hint=" (1 = no guidance, 0 = unconditional)"), default=1.0,
                   help="classifier-free guidance scale for class-conditional models (default: %(default)s)")
    p.add_argument("--threshold", type=_float_in(0.0, 1.0, low_open=True), default=None,
                   help="dynamic thresholding percentile in (0, 1], e.g. 0.995, instead of clipping x0")


def _add_edit_output_args(p: argparse.ArgumentParser, default_out: str) -> None:
    p.add_argument("--steps", type=_nonneg_int, default=0,
                   help="respaced ancestral steps for decoding (0 = all, as the paper)")
    p.add_argument("--out", "-o", default=default_out, help="PNG path (default: %(default)s)")
    p.add_argument("--scale", type=_positive_int, default=4, help="integer upscaling of the PNG (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pakhsh", description="Train, sample, edit and evaluate diffusion models (DDPM / Improved DDPM).",
        epilog="Run `pakhsh COMMAND --help` for a command's options.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model from a YAML config", description=(
        "Train from a YAML config (see configs/). Override any key with --set section.key=value; unknown keys "
        "are errors. `accelerate launch` or `torchrun` run the same command on several GPUs/processes."))
    p.add_argument("config", nargs="?", help="YAML experiment config (default: built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.lr=1e-4 --set data.name=fashion_mnist")
    p.add_argument("--out", help="run folder (same as --set train.out_dir=...)")
    p.add_argument("--resume", action="store_true", help="continue exactly from the run folder's latest checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in the folder (deletes its checkpoints, log and samples first)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="sample images and write a PNG grid")
    _add_model_args(p)
    _add_sampler_args(p)
    p.add_argument("--num", "-n", type=_positive_int, default=16, help="number of images (default: %(default)s)")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="images per batch (default: %(default)s)")
    p.add_argument("--label", type=int, action="append", help="class label(s) for class-conditional models")
    p.add_argument("--out", "-o", default="samples.png", help="PNG grid path (default: %(default)s)")
    p.add_argument("--singles", help="also write each image as its own PNG into this folder")
    p.add_argument("--nrow", type=_positive_int, default=None, help="images per grid row")
    p.add_argument("--scale", type=_positive_int, default=4,
                   help="integer upscaling of the grid PNG (default: %(default)s)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("interpolate", help="interpolate two images through x_t (DDPM sec. 4.3)")
    _add_model_args(p)
    p.add_argument("image_a", help="image file, or data:INDEX for an image of the model's test split")
    p.add_argument("image_b", help="image file, or data:INDEX")
    p.add_argument("--lambdas", type=_lambdas, default=_lambdas("0,0.125,0.25,0.375,0.5,0.625,0.75,0.875,1"),
                   help="mixing weights in [0, 1] (default: 9 evenly spaced)")
    p.add_argument("--t", type=_nonneg_int, default=500,
                   help="training step to mix at, 0..T-1 (default: %(default)s)")
    p.add_argument("--mixing", choices=["linear", "slerp"], default="linear", help="how to mix (default: linear)")
    _add_edit_output_args(p, "interpolation.png")
    p.set_defaults(func=cmd_interpolate)

    p = sub.add_parser("vary", help="variations of an image from an intermediate x_t (DDPM Fig. 9)")
    _add_model_args(p)
    p.add_argument("image", help="image file, or data:INDEX for an image of the model's test split")
    p.add_argument("--t", type=_nonneg_int, default=750,
                   help="training step to restart from, 0..T-1 (default: %(default)s)")
    p.add_argument("--count", type=_positive_int, default=8, help="number of variations (default: %(default)s)")
    _add_edit_output_args(p, "variations.png")
    p.set_defaults(func=cmd_vary)

    p = sub.add_parser("nll", help="bits/dim (full variational bound) on a dataset split")
    _add_model_args(p)
    p.add_argument("--split", choices=["train", "test"], default="test")
    p.add_argument("--max-images", type=_positive_int, default=256, help="images to evaluate (default: %(default)s)")
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--json", help="also write the report as JSON here")
    p.set_defaults(func=cmd_nll)

    p = sub.add_parser("eval", help="FID/KID/IS/precision-recall (and bits/dim) of a checkpoint or image folder",
                       description=(
        "Evaluate a checkpoint (it samples) or a folder of images against a dataset split, offline. Features come "
        "from the dataset's built-in feature net (default) or the standard FID Inception read from a local file; "
        "reference statistics are cached per (dataset, split, extractor, size, n). Writes JSON and a markdown table."))
    p.add_argument("source", help="checkpoint/run folder or shipped model name (sampled), or a folder of images")
    p.add_argument("--dataset", help="reference dataset (default: the checkpoint's; required for image folders)")
    p.add_argument("--data-path", help="location of the reference dataset where it needs one")
    p.add_argument("--split", choices=["train", "test"], default="train", help="reference split (default: train)")
    p.add_argument("--image-size", type=_positive_int,
                   help="reference image size (default: checkpoint's or feature net's)")
    p.add_argument("--num-real", type=_positive_int, default=10_000, help="reference images (default: %(default)s)")
    p.add_argument("--num-samples", "-n", type=_positive_int, default=1000,
                   help="images to sample, or at most this many from a folder (default: %(default)s)")
    p.add_argument("--feature-net", help="'inception', a shipped net (fashion_mnist, shapes) or a FeatureNet folder "
                                         "(default: the dataset's shipped net)")
    p.add_argument("--inception-weights", metavar="PATH",
                   help="local pt_inception-2015-12-05-6726825d.pth (selects the standard FID Inception)")
    p.add_argument("--metrics", default="fid,kid,is,pr", help="comma-separated subset of fid,kid,is,pr")
    _add_sampler_args(p)
    p.add_argument("--bpd", action="store_true", help="also bits/dim (full bound) of the checkpoint on the test split")
    p.add_argument("--bpd-images", type=_positive_int, default=256,
                   help="test images for bits/dim (default: %(default)s)")
    p.add_argument("--batch-size", type=_positive_int, default=64)
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

    p = sub.add_parser("info", help="summarise a checkpoint: config, parameters, training state")
    p.add_argument("checkpoint", nargs="?", default=DEFAULT_MODEL, help="checkpoint/run folder or shipped name")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("export", help="write an inference-only model folder (config + EMA weights)")
    p.add_argument("checkpoint", help="run or checkpoint folder")
    p.add_argument("out", help="output folder")
    p.add_argument("--no-ema", action="store_true")
    p.set_defaults(func=cmd_export)
    return parser


def _pipeline(args: argparse.Namespace) -> Any:
    from .pipelines import ImagePipeline

    pipe = ImagePipeline.from_pretrained(args.model, ema=not args.no_ema, device=args.device, bf16=args.bf16)
    _check_model_flags(args, pipe)
    return pipe


def _check_model_flags(args: argparse.Namespace, pipe: Any) -> None:
    """Flags whose valid range is the model's own (T): checked right after loading it, before any sampling."""
    if getattr(args, "steps", 0):  # 0 = all steps
        pipe.check_steps(args.steps, "--steps")
    if getattr(args, "t", None) is not None:
        pipe.check_t(args.t, "--t")


def cmd_train(args: argparse.Namespace) -> int:
    from .training import Trainer, load_experiment

    overrides = list(args.overrides) + ([f"train.out_dir={args.out}"] if args.out else [])
    cfg = load_experiment(args.config, overrides)
    result = Trainer(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet).fit()
    # only the main process reports, and only a checkpoint that is on disk
    if result.checkpoint is not None and result.checkpoint.is_dir():
        if result.interrupted:
            print(f"interrupted at step {result.step}; checkpoint: {result.checkpoint}; continue with --resume")
        else:
            print(f"trained to step {result.step}; last loss {result.last_loss:.5f}; checkpoint: {result.checkpoint}")
    # stopped by a signal (after saving): exit as the shell expects, 128 + signal (130 Ctrl-C, 143 SIGTERM)
    return 128 + result.interrupted if result.interrupted else 0


def cmd_sample(args: argparse.Namespace) -> int:
    from .interop.images import save_grid, save_images
    from .pipelines import SampleSettings

    pipe = _pipeline(args)
    settings = SampleSettings(args.sampler, args.steps or None, args.eta, args.guidance, threshold=args.threshold)
    labels = None
    if args.label:
        labels = args.label if len(args.label) > 1 else args.label[0]
        if isinstance(labels, list) and len(labels) != args.num:
            raise ValueError(f"give one --label or exactly --num={args.num} of them, got {len(labels)}")
    x = pipe.generate(args.num, settings, labels=labels, seed=args.seed, batch_size=args.batch_size,
                      progress=not args.quiet)
    path = save_grid(x, args.out, nrow=args.nrow, scale=args.scale)
    if args.singles:
        save_images(x, args.singles)
    print(f"wrote {x.shape[0]} samples to {path}" + (f" and {args.singles}/" if args.singles else ""))
    return 0


def _input_image(pipe: Any, spec: str) -> Any:
    """An image file, or data:INDEX from the model's own dataset (test split)."""
    from .interop.images import load_image

    if spec.startswith("data:"):
        return _data_image(pipe, spec)
    c, size, _ = pipe.image_shape
    return load_image(spec, size=size, channels=c)


def _data_image(pipe: Any, spec: str) -> Any:
    """data:INDEX: one image of the model's test split; a bad INDEX is named with the valid range."""
    from dataclasses import replace

    from .data import build_dataset

    ds = build_dataset(replace(pipe.config.data, split="test", random_flip=False))
    n = len(ds)
    valid = f"the model's test split ({pipe.config.data.name}) has {n} images: use data:0 .. data:{n - 1}"
    try:
        index = int(spec[5:])
    except ValueError:
        raise ValueError(f"{spec}: INDEX must be a whole number; {valid}") from None
    if not 0 <= index < n:
        raise ValueError(f"{spec}: index out of range; {valid}")
    return ds[index]["image"].unsqueeze(0)


def _check_image_spec(spec: str) -> None:
    """Before loading anything: an input image file exists, or data:INDEX has a whole-number INDEX."""
    if spec.startswith("data:"):
        if not spec[5:].strip().lstrip("-").isdigit():
            raise ValueError(f"{spec}: INDEX must be a whole number, e.g. data:0 (an image of the model's test split)")
    elif not Path(spec).is_file():
        what = "is a folder, not an image file" if Path(spec).is_dir() else "not found"
        raise FileNotFoundError(f"image {spec}: {what}; give an image file or data:INDEX")


def cmd_interpolate(args: argparse.Namespace) -> int:
    from .interop.images import save_grid

    pipe = _pipeline(args)
    a, b = _input_image(pipe, args.image_a), _input_image(pipe, args.image_b)
    x = pipe.interpolate(a, b, args.lambdas, args.t, steps=args.steps or None, mixing=args.mixing, seed=args.seed)
    import torch

    row = torch.cat([a, x, b])  # source, the interpolations, target
    path = save_grid(row, args.out, nrow=row.shape[0], scale=args.scale)
    print(f"wrote {len(args.lambdas)} interpolations (t={args.t}) with sources at both ends to {path}")
    return 0


def cmd_vary(args: argparse.Namespace) -> int:
    import torch

    from .interop.images import save_grid

    pipe = _pipeline(args)
    img = _input_image(pipe, args.image)
    x = pipe.vary(img, args.t, args.count, steps=args.steps or None, seed=args.seed)
    path = save_grid(torch.cat([img, x]), args.out, nrow=args.count + 1, scale=args.scale)
    print(f"wrote the source and {args.count} variations from t={args.t} to {path}")
    return 0


def cmd_nll(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from torch.utils.data import DataLoader

    from .data import build_dataset

    pipe = _pipeline(args)
    ds = build_dataset(replace(pipe.config.data, split=args.split, random_flip=False))
    loader = DataLoader(ds, batch_size=args.batch_size, shuffle=False)
    rep = pipe.nll(iter(loader), max_images=args.max_images, seed=args.seed, progress=not args.quiet)
    print(f"{pipe.config.data.name} {args.split}: {rep.bpd:.4f} bits/dim over {rep.num_images} images "
          f"(prior term {rep.prior_bpd:.5f}, decoder term {rep.terms_bpd[0]:.4f}, T={len(rep.terms_bpd)})")
    if args.json:
        Path(args.json).write_text(json.dumps({"dataset": pipe.config.data.name, "split": args.split,
                                               "bpd": rep.bpd, "prior_bpd": rep.prior_bpd,
                                               "terms_bpd": rep.terms_bpd, "num_images": rep.num_images}, indent=2))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation import EvalConfig, evaluate

    cfg = EvalConfig(
        source=args.source, dataset=args.dataset, data_path=args.data_path, split=args.split,
        image_size=args.image_size, num_real=args.num_real, num_samples=args.num_samples,
        feature_net=args.feature_net, inception_weights=args.inception_weights,
        metrics=tuple(m.strip() for m in args.metrics.split(",") if m.strip()), sampler=args.sampler,
        steps=args.steps or None, eta=args.eta, guidance=args.guidance, threshold=args.threshold,
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
    from .interop.config import to_dict
    from .pipelines import resolve_model_path
    from .training.checkpoint import load_model, load_state

    loaded = load_model(resolve_model_path(args.checkpoint))
    n_params = sum(p.numel() for p in loaded.model.parameters())
    cfg = loaded.config
    print(f"checkpoint: {loaded.path}\nweights:    {loaded.weights}\nparameters: {n_params:,}")
    if (loaded.path / "state.pt").is_file():
        print(f"step:       {load_state(loaded.path, 'state.pt')['step']}")
    print(f"data:       {cfg.data.name} {cfg.model.image_size}x{cfg.model.image_size}x{cfg.model.out_channels}")
    d = cfg.diffusion
    print(f"diffusion:  T={d.num_steps} {d.schedule} output={d.model_output.value} variance={d.variance.value} loss={d.loss}")
    print(json.dumps(to_dict(cfg), indent=2))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .training import export_model

    out = export_model(args.checkpoint, args.out, ema=not args.no_ema)
    print(f"exported to {out}")
    return 0


# Outputs per command: (flag, attribute, is a folder). Checked before any work, so a typo in a path does not cost a
# sampling run.
_OUTPUTS: dict[str, tuple[tuple[str, str, bool], ...]] = {
    "sample": (("--out", "out", False), ("--singles", "singles", True)),
    "interpolate": (("--out", "out", False),),
    "vary": (("--out", "out", False),),
    "nll": (("--json", "json", False),),
    "eval": (("--json", "json", False), ("--markdown", "markdown", False)),
    "export": (("OUT", "out", True),),
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
        from .pipelines.unconditional import pick_device

        pick_device(args.device, "--device")
    for attr in ("image", "image_a", "image_b"):
        if getattr(args, attr, None) is not None:
            _check_image_spec(getattr(args, attr))
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        with _one_line_notices(args.command):
            _check_before_work(args)
            return func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        message, code = _describe(e)
        print(f"pakhsh {args.command}: {message}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
