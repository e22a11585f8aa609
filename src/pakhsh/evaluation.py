"""Evaluate a checkpoint (it samples) or a folder of images against a dataset split: one offline call.

    result = evaluate(EvalConfig(source="runs/fashion_mnist", num_samples=1000, bpd=True))
    print(result.to_markdown())      # | FID[fashion-net]-1k | 23.456 | ... | bits/dim (test, 256 images) | 3.91 |

Composes the pipelines (sampling, bits/dim) with the metrics (feature extractors, FID/KID/IS/precision-recall).
The feature extractor is named in every label: the dataset's built-in feature net (shipped under
`pakhsh/assets/featnets/<dataset>/`) by default, or the standard FID Inception read from a local weights file.
Reference features are cached per (dataset, split, extractor, size, n) under `stats_dir`, so a second evaluation
against the same reference reads them instead of recomputing them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from pakhsh.data import DataConfig, build_dataset
from pakhsh.data.registry import native_channels
from pakhsh.metrics import (
    ALL_METRICS,
    Extracted,
    FeatureExtractor,
    FeatureNetExtractor,
    InceptionExtractor,
    MetricName,
    MetricReport,
    StatsCache,
    StatsKey,
    compute_metrics,
    compute_statistics,
    default_inception_path,
    extract,
)

FEATNETS = Path(__file__).resolve().parent / "assets" / "featnets"
# reference statistics shipped with pakhsh (feature-net features of datasets that are not always installed)
SHIPPED_STATS = Path(__file__).resolve().parent / "assets" / "stats"
# split sizes of fixed datasets: the stats-cache key is known without reading the dataset
_SPLIT_SIZES = {("fashion_mnist", "train"): 60_000, ("fashion_mnist", "test"): 10_000}
FEATNET_FILE = "model.safetensors"


def default_stats_dir() -> Path:
    """$PAKHSH_CACHE/stats when set, else ~/.cache/pakhsh/stats (XDG_CACHE_HOME respected)."""
    from .config import cache_root

    return cache_root() / "stats"


@dataclass
class EvalConfig:
    """What to evaluate, against what, and how. One definition for the library call and `pakhsh eval`."""

    source: str = "fashion_mnist"  # checkpoint/run folder or shipped model name (sampled), or a folder of images
    source_format: str = "auto"  # model format: auto | pakhsh | diffusers | openai (see pipelines.base)
    openai_flags: str | None = None  # improved/guided-diffusion flags, for an openai .pt source
    dataset: str | None = None  # reference dataset; None: the checkpoint's own (required for image folders)
    data_path: str | None = None  # where the reference dataset lives, if it needs one (fashion_mnist, folder)
    split: str = "train"  # reference split for FID/KID/precision-recall
    image_size: int | None = None  # reference size; None: the checkpoint's size, else the feature net's
    num_real: int = 10_000  # reference images (capped at the split's size)
    num_samples: int = 1000  # images sampled from a checkpoint; an image folder uses up to this many
    feature_net: str | None = None  # None: the dataset's shipped net; "inception"; a shipped name; a folder
    inception_weights: str | None = None  # local FID Inception file (implies feature_net="inception")
    metrics: tuple[str, ...] = ALL_METRICS  # subset of fid, kid, is, pr
    sampler: str = "ddim"  # "ddpm" | "ddim" | "dpm++2m" | "sde-dpm++2m"
    steps: int | None = 50  # sampling steps (None = all training steps)
    spacing: str = "auto"  # which training steps they are: "uniform", "noise-dense" or "auto" (the pipeline's choice)
    eta: float = 0.0  # DDIM only
    guidance: float = 1.0  # class-conditional models
    threshold: float | None = None  # dynamic thresholding percentile (e.g. 0.995) instead of clipping x0
    ema: bool = True
    bf16: bool = False  # bf16 autocast while sampling
    bpd: bool = False  # also bits/dim of the checkpoint on the test split (full bound: T evaluations/batch)
    bpd_images: int = 256
    batch_size: int = 64
    seed: int = 0
    strict: bool = False  # size/channel mismatches and unreadable files are errors instead of notices
    stats_dir: str | None = None  # None: default_stats_dir()
    device: str = "auto"
    progress: bool = True


@dataclass
class EvalResult:
    """What one evaluation gives: the metric report plus where every number came from."""

    report: MetricReport
    source: str  # the checkpoint folder or image folder evaluated
    kind: str  # "checkpoint" | "images"
    dataset: str
    split: str
    image_size: int
    extractor: str  # name in the labels, e.g. "fashion-net"
    extractor_id: str  # name@digest of the weights: part of the stats-cache key
    stats_path: str
    stats_cached: bool  # True when the reference features were read from the cache
    sampling: dict[str, Any] | None = None  # sampler settings (checkpoints only)
    bpd: float | None = None  # bits/dim on the test split
    bpd_images: int | None = None
    seconds: float = 0.0
    notices: list[str] = field(default_factory=list)  # conversions and skipped files, as warned

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["labels"] = self.report.labels()
        return d

    def to_markdown(self) -> str:
        """The metrics table (with a bits/dim row when computed), then where the numbers came from."""
        table = self.report.to_markdown().split("\n\n")[0]
        if self.bpd is not None:
            table += f"\n| bits/dim (test, {self.bpd_images} images) | {self.bpd:.4f} |"
        lines = [f"## Evaluation of `{self.source}`", "", table, "",
                 f"- reference: {self.dataset} {self.split} split, {self.report.n_real} images at "
                 f"{self.image_size}x{self.image_size} (stats {'from cache' if self.stats_cached else 'computed'}: "
                 f"`{self.stats_path}`)",
                 f"- generated: {self.report.n_fake} images ({self.kind})",
                 f"- feature extractor: {self.extractor} (`{self.extractor_id}`)"]
        if self.sampling:
            lines.append("- sampling: " + ", ".join(f"{k}={v}" for k, v in self.sampling.items()))
        lines += [f"- notice: {n}" for n in self.notices]
        lines.append(f"- time: {self.seconds:.1f} s")
        return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- feature extractors


def shipped_feature_nets() -> list[str]:
    """Datasets with a feature net inside the package (e.g. ["fashion_mnist", "shapes"])."""
    if not FEATNETS.is_dir():
        return []
    return sorted(p.name for p in FEATNETS.iterdir() if (p / FEATNET_FILE).is_file())


def _file_digest(path: Path, chunk: int = 1 << 20) -> str:
    """First 10 hex digits of the file's sha256: cached statistics follow the weights, not just the name."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()[:10]


def load_extractor(
    spec: str | None, dataset: str, inception_weights: str | None = None, device: str | torch.device = "cpu"
) -> tuple[FeatureExtractor, str]:
    """(extractor, id) for a spec: None (the dataset's shipped net), "inception", a shipped name or a folder.

    The id is `name@digest` of the weights file, used in the stats-cache key.
    """
    if spec is None and inception_weights is not None:
        spec = "inception"
    if spec == "inception":
        from pakhsh.metrics.inception import find_inception_weights

        path = find_inception_weights(inception_weights)
        ext: FeatureExtractor = InceptionExtractor(path=path, device=device)
        return ext, f"{ext.name}@{_file_digest(path)}"
    folder = _featnet_folder(spec if spec is not None else dataset, explicit=spec is not None)
    ext = FeatureNetExtractor.from_dir(folder, device=device)
    return ext, f"{ext.name}@{_file_digest(folder / FEATNET_FILE)}"


def _featnet_folder(spec: str, explicit: bool) -> Path:
    """A folder holding a FeatureNet: the path itself, or the shipped net of that dataset name."""
    if explicit and Path(spec).is_dir():
        return Path(spec)
    if (FEATNETS / spec / FEATNET_FILE).is_file():
        return FEATNETS / spec
    what = f"feature net {spec!r}" if explicit else f"no built-in feature net for dataset {spec!r}"
    raise FileNotFoundError(
        f"{what}: give --feature-net as one of the shipped nets {shipped_feature_nets()}, a folder written by "
        f"`python -m pakhsh.metrics.train_featnet`, or 'inception' with --inception-weights PATH (or the file at "
        f"{default_inception_path()})"
    )


# ----------------------------------------------------------------------------- image sources


def is_checkpoint(source: str) -> bool:
    """A model (run/checkpoint folder, exported model, shipped name, diffusers pipeline folder, openai .pt file)
    rather than a folder of images."""
    p = Path(source)
    if not p.exists() or p.is_file():
        return True  # a shipped name (which names the missing path if unknown), or a .pt checkpoint
    return (p / "model.safetensors").is_file() or (p / "checkpoints").is_dir() or (p / "model_index.json").is_file()


def image_folder(folder: str, strict: bool, limit: int | None, shape: tuple[int, int]) -> Dataset:
    """The images of a folder (first `limit`), each read at the reference's (channels, size) = `shape`.

    Every file is converted on its own (mode, resize, centre crop), so one odd file cannot decide how the others are
    read; files whose own format differs from `shape` are named in a warning (an error under `strict`). Corrupt
    files are named and skipped with a warning, or raise under `strict`.
    """
    from pakhsh.data import Truncated
    from pakhsh.data.image_folder import ImageFolderDataset

    channels, side = shape
    ds = ImageFolderDataset(Path(folder), side, channels=channels, strict=strict)
    n = min(len(ds), limit) if limit is not None else len(ds)
    _notice_odd_files(ds, n, shape, strict)
    return Truncated(ds, n) if n < len(ds) else ds


def _notice_odd_files(ds: Any, n: int, shape: tuple[int, int], strict: bool) -> None:
    """Name the files (among the first n) whose own (C, H, W) is not the reference's: they are converted."""
    from pakhsh.data.image_folder import listing

    ref = (shape[0], shape[1], shape[1])
    odd: dict[tuple[int, int, int], list[str]] = {}
    for path, head in zip(ds.paths[:n], ds.headers[:n]):
        own = (head.channels, head.size[1], head.size[0])
        if own != ref:
            odd.setdefault(own, []).append(str(path.relative_to(ds.root)))
    if not odd:
        return
    count = sum(len(v) for v in odd.values())
    groups = "; ".join(f"{names[0]} is {own}" if len(names) == 1 else f"{len(names)} are {own} ({listing(names, 3)})"
                       for own, names in odd.items())
    what = f"{ds.root}: {count} of {n} images differ from the reference's (C, H, W) = {ref}: {groups}"
    if strict:
        raise ValueError(what + "; strict: convert them first, or leave out --strict to convert them")
    warnings.warn(what + f"; each was converted to {ref}", stacklevel=3)


def reference_dataset(data: DataConfig, num_real: int) -> Dataset:
    """The reference split (no augmentation), capped at `num_real` images."""
    from pakhsh.data import Truncated

    ds = build_dataset(replace(data, random_flip=False, length=None if data.name != "shapes" else num_real))
    return Truncated(ds, num_real) if len(ds) > num_real else ds


# ----------------------------------------------------------------------------- reference statistics


@dataclass
class Reference:
    """Reference features of a dataset split, from the cache or freshly extracted."""

    features: Extracted
    path: Path
    cached: bool
    shape_probe: Any = None  # one reference image (1, C, H, W), or the dataset: what fake images are matched to


def reference(cache: StatsCache, data: DataConfig, ext_id: str, extractor: FeatureExtractor, cfg: EvalConfig
              ) -> Reference:
    """The reference features of `data`: from the cache or the shipped statistics when the key is known without
    reading the dataset (so `pakhsh eval fashion_mnist` works where the dataset is not installed), else extracted."""
    n = _known_count(data, cfg.num_real)
    if n is not None:
        key = StatsKey(data.name, data.split, ext_id, data.image_size, n)
        feats = cache.load_features(key)
        if feats is not None:
            probe = torch.zeros(1, data.channels or native_channels(data.name), data.image_size, data.image_size)
            return Reference(Extracted(torch.from_numpy(np.asarray(feats)), None), cache.path(key), True, probe)
    real_ds = reference_dataset(data, cfg.num_real)
    key = StatsKey(data.name, data.split, ext_id, data.image_size, len(real_ds))
    ref = reference_features(cache, key, real_ds, extractor, cfg.batch_size, cfg.progress)
    return replace(ref, shape_probe=real_ds)


def _known_count(data: DataConfig, num_real: int) -> int | None:
    """How many reference images `reference_dataset` would give, where that is known without building it."""
    if data.name == "shapes":
        return num_real
    size = _SPLIT_SIZES.get((data.name, data.split))
    return None if size is None else min(size, num_real)


def reference_features(
    cache: StatsCache, key: StatsKey, dataset: Dataset, extractor: FeatureExtractor, batch_size: int, progress: bool
) -> Reference:
    """Cached features for `key`, or extract them from `dataset` and store them (with their Gaussian fit)."""
    feats = cache.load_features(key)
    if feats is not None:
        return Reference(Extracted(torch.from_numpy(np.asarray(feats)), None), cache.path(key), True)
    with torch.no_grad():
        ext = extract(extractor, dataset, batch_size, progress=progress)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a small reference set warns again, with context, when metrics run
        stats = compute_statistics(ext.features)
    path = cache.save(key, stats, ext.features)
    return Reference(Extracted(ext.features, None), path, False)


# ----------------------------------------------------------------------------- evaluation


def _bpd(pipe: Any, cfg: EvalConfig) -> tuple[float, int]:
    """Bits/dim of the full bound on the model's test split (first `bpd_images` images)."""
    from torch.utils.data import DataLoader

    test = build_dataset(replace(pipe.require_data("--bpd"), split="test", random_flip=False))
    loader = DataLoader(test, batch_size=min(cfg.batch_size, cfg.bpd_images), shuffle=False)
    rep = pipe.nll(iter(loader), max_images=cfg.bpd_images, seed=cfg.seed, progress=cfg.progress)
    return rep.bpd, rep.num_images


def _settings(cfg: EvalConfig) -> Any:
    from pakhsh.pipelines import SampleSettings

    return SampleSettings(cfg.sampler, cfg.steps, cfg.eta, cfg.guidance, threshold=cfg.threshold, spacing=cfg.spacing)


def _sample(pipe: Any, cfg: EvalConfig) -> torch.Tensor:
    """cfg.num_samples images (N, C, H, W) in [-1, 1] from the checkpoint."""
    return pipe.generate(cfg.num_samples, _settings(cfg), seed=cfg.seed, batch_size=cfg.batch_size,
                         progress=cfg.progress)


def _sampling_info(pipe: Any, cfg: EvalConfig) -> dict[str, Any]:
    steps = cfg.steps if cfg.steps is not None else pipe.diffusion.num_steps
    info: dict[str, Any] = {"sampler": cfg.sampler, "steps": steps, "seed": cfg.seed}
    if steps < pipe.diffusion.num_steps:
        info["spacing"] = pipe.spacing_rule(_settings(cfg))
    if cfg.sampler == "ddim":
        info["eta"] = cfg.eta
    if cfg.guidance != 1.0:
        info["guidance"] = cfg.guidance
    if cfg.threshold is not None:
        info["threshold"] = cfg.threshold
    return info


def _reference_config(cfg: EvalConfig, dataset: str, pipe: Any, extractor: FeatureExtractor) -> DataConfig:
    """The reference DataConfig: the checkpoint's own data unless another dataset is named; otherwise at the
    feature net's training size (Inception takes any size: 32 then)."""
    if pipe is not None and pipe.data is not None and dataset == pipe.data.name:
        data = pipe.data
        return replace(data, split=cfg.split, path=cfg.data_path or data.path,
                       image_size=cfg.image_size or data.image_size)
    size = cfg.image_size or extractor.image_size or 32
    return DataConfig(name=dataset, path=cfg.data_path, image_size=size, split=cfg.split)  # type: ignore[arg-type]


def evaluate(cfg: EvalConfig) -> EvalResult:
    """Sample (checkpoint) or read (folder) images, extract features, compare with the cached reference."""
    from pakhsh.pipelines import ImagePipeline
    from pakhsh.pipelines.base import pick_device

    start = time.perf_counter()
    unknown = set(cfg.metrics) - set(ALL_METRICS)
    if unknown:
        raise ValueError(f"unknown metric(s) {sorted(unknown)}; known: {', '.join(ALL_METRICS)}")
    checkpoint = is_checkpoint(cfg.source)
    if cfg.bpd and not checkpoint:
        raise ValueError("bits/dim needs a checkpoint, not a folder of images")
    device = pick_device(cfg.device)
    pipe = ImagePipeline.from_pretrained(cfg.source, ema=cfg.ema, device=str(device), bf16=cfg.bf16,
                                         source=cfg.source_format, openai_flags=cfg.openai_flags) \
        if checkpoint else None  # type: ignore[arg-type]
    if pipe is not None:
        pipe.check_steps(cfg.steps)  # before any reference features are computed
    dataset = cfg.dataset or (pipe.data.name if pipe is not None and pipe.data is not None else None)
    if dataset is None:
        what = "a folder of images" if pipe is None else f"a {pipe.loaded.kind} model (it records no dataset)"
        raise ValueError(f"evaluating {what} needs --dataset (the reference, e.g. fashion_mnist)")
    extractor, ext_id = load_extractor(cfg.feature_net, dataset, cfg.inception_weights, device)
    data = _reference_config(cfg, dataset, pipe, extractor)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # a folder is scanned first: its odd or corrupt files fail a strict run before minutes of reference work
        folder = None if pipe is not None else image_folder(cfg.source, cfg.strict, cfg.num_samples, _format(data))
        stats_dir = Path(cfg.stats_dir).expanduser() if cfg.stats_dir else default_stats_dir()
        ref = reference(StatsCache(stats_dir, shipped=[SHIPPED_STATS]), data, ext_id, extractor, cfg)
        fake = _sample(pipe, cfg) if pipe is not None else folder
        report = _metrics(ref.shape_probe, ref, fake, extractor, cfg)
    notices = _replay(caught)
    bpd, bpd_n = _bpd(pipe, cfg) if cfg.bpd and pipe is not None else (None, None)
    source = str(pipe.loaded.path) if pipe is not None else str(Path(cfg.source))
    return EvalResult(
        report=report, source=source, kind="checkpoint" if checkpoint else "images", dataset=data.name,
        split=data.split, image_size=data.image_size, extractor=extractor.name, extractor_id=ext_id,
        stats_path=str(ref.path), stats_cached=ref.cached, sampling=_sampling_info(pipe, cfg) if pipe else None,
        bpd=bpd, bpd_images=bpd_n, seconds=time.perf_counter() - start, notices=notices,
    )  # fmt: skip


def _format(data: DataConfig) -> tuple[int, int]:
    """(channels, size) of the reference images: what every image of a folder is read as."""
    return data.channels or native_channels(data.name), data.image_size


def _metrics(real_ds: Dataset, ref: Reference, fake: Any, extractor: FeatureExtractor, cfg: EvalConfig
             ) -> MetricReport:
    """Metrics of the fake set against the reference; the fake set is first matched to the reference's shape
    (a notice, or an error under strict) so that both take the same path into the extractor."""
    from pakhsh.metrics.evaluate import match_fake_to_real

    fake = match_fake_to_real(real_ds, fake, cfg.strict)
    metrics: tuple[MetricName, ...] = tuple(cfg.metrics)  # type: ignore[assignment]
    return compute_metrics(ref.features, fake, extractor, metrics, batch_size=cfg.batch_size, strict=cfg.strict,
                           progress=cfg.progress, seed=cfg.seed)


def _replay(caught: list[warnings.WarningMessage]) -> list[str]:
    """Re-issue recorded warnings (so users still see them) and return their unique texts for the report."""
    notices: list[str] = []
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        text = str(w.message)
        if text not in notices:
            notices.append(text)
    return notices
