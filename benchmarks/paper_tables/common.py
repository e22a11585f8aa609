"""Shared pieces of the paper-table scripts: budgets, cached training runs, cached evaluations, reports.

Every table is an experiment at CPU scale on Fashion-MNIST 32x32. Runs that are the same experiment are shared
between tables (the L_simple / cosine run serves tables 1-5) and cached under `runs/paper_tables/<name>-<hash>/`,
the hash covering the full experiment config, so a re-run reuses finished runs and a budget change trains anew.
Evaluations are cached as JSON inside the run folder, keyed by checkpoint, sampler, steps, sample count and seed.

Budgets: `PAKHSH_BENCH=full` (default, the documented numbers) or `PAKHSH_BENCH=smoke` (seconds; writes to
/tmp/pakhsh_bench_smoke instead of docs/results, for checking the scripts themselves).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[2]
SMOKE = os.environ.get("PAKHSH_BENCH", "full") == "smoke"
OUT_ROOT = Path("/tmp/pakhsh_bench_smoke") if SMOKE else REPO
RUNS = OUT_ROOT / "runs" / "paper_tables"
RESULTS = OUT_ROOT / "docs" / "results"
STATS = RUNS / "stats"  # reference statistics for all tables (the library's cache, in a known place)


@dataclass(frozen=True)
class Budget:
    """How much compute each table gets; recorded in every table."""

    train_steps: int = 600  # optimizer steps per run
    batch_size: int = 32
    width: int = 32  # model_channels of the shared runs
    widths: tuple[int, ...] = (8, 16, 32)  # table 5 (the widest is the shared run)
    num_steps: int = 1000  # diffusion T
    fid_samples: int = 80  # generated images per FID/KID/IS (all rows of a table share it; > 64 feature dims)
    table1_steps: int = 250  # ancestral steps of table 1's common FID column (full chain: from table 2)
    num_real: int = 10_000  # reference images (train split)
    nll_images: int = 64  # test images for the bound
    nll_terms: int = 100  # stratified terms of the T-1 KL terms (plus L_0 and L_T exactly)
    scaling_points: int = 3  # checkpoints per width evaluated in table 5
    scaling_nll_images: int = 32
    sample_batch: int = 100

    def describe(self) -> str:
        return (f"{self.train_steps} steps x batch {self.batch_size} (bf16 autocast, AdamW lr 1e-3, EMA 0.999); "
                f"T={self.num_steps}; FID/KID/IS on {self.fid_samples} samples vs {self.num_real} train images "
                f"(fashion-net features); NLL on {self.nll_images} test images, stratified estimate with "
                f"{self.nll_terms} network calls per image (the first {self.nll_terms // 5} "
                f"KL terms, L_0 and L_T exact, the other {self.num_steps - 1 - self.nll_terms // 5} KL terms in "
                f"{self.nll_terms - self.nll_terms // 5} random strata)")


BUDGET = Budget(train_steps=6, batch_size=8, width=8, widths=(4, 8, 12), num_steps=100, table1_steps=50, fid_samples=24,
                num_real=64, nll_images=8, nll_terms=4, scaling_points=2, scaling_nll_images=4,
                sample_batch=24) if SMOKE else Budget()


def step_counts(b: Budget = BUDGET) -> list[int]:
    """Sampling step counts of table 2: full length, then 250, 100, 50, 25 (those below T)."""
    return [b.num_steps] + [s for s in (250, 100, 50, 25) if s < b.num_steps]


# ----------------------------------------------------------------------------- experiments


def experiment(name: str, b: Budget = BUDGET, *, loss: str = "simple", variance: str = "fixed_small",
               schedule: str = "cosine", width: int | None = None, timestep_sampler: str = "uniform",
               saves: int = 1) -> dict[str, Any]:
    """The experiment config (as a dict) of one run; only the named knobs differ between runs."""
    w = width or b.width
    learned = variance == "learned_range"
    return {
        "name": name,
        "data": {"name": "fashion_mnist", "image_size": 32},
        "model": {"image_size": 32, "in_channels": 1, "out_channels": 1, "model_channels": w,
                  "channel_mult": [1, 2, 2], "num_res_blocks": 1, "attention_resolutions": [8], "num_heads": 4,
                  "dropout": 0.0, "learn_sigma": learned,
                  "num_groups": min(32, max(1, w // 2))},  # 2 channels per group at the first level, any width
        "diffusion": {"num_steps": b.num_steps, "schedule": schedule, "model_output": "eps", "variance": variance,
                      "loss": loss},
        "train": {"steps": b.train_steps, "batch_size": b.batch_size, "lr": 1e-3, "warmup_steps": 100,
                  "ema_rates": [0.999], "mixed_precision": "bf16", "log_every": 50,
                  "save_every": max(1, b.train_steps // saves), "sample_every": 0, "keep_last": saves + 1,
                  "timestep_sampler": timestep_sampler, "device": "cpu"},
    }


# The runs of all tables: one name per experiment, shared where the experiment is the same.
RUN_SPECS: dict[str, dict[str, Any]] = {
    "simple_cosine": dict(),  # L_simple, fixed variance, cosine: tables 1, 2, 3, 4, 5 (middle width)
    "hybrid_cosine": dict(loss="hybrid", variance="learned_range"),  # tables 1, 2
    # L_vlb with learned variance, trained with importance-sampled t as Improved DDPM sec. 3.3 does
    "vlb_cosine": dict(loss="rescaled_kl", variance="learned_range", timestep_sampler="loss-aware"),  # table 1
    "simple_linear": dict(schedule="linear"),  # table 3
}


def run_config(name: str, b: Budget = BUDGET) -> dict[str, Any]:
    """Config dict of a named run; `simple_cosine_w<W>` are the table-5 widths (the budget's width is shared)."""
    if name.startswith("simple_cosine_w"):
        w = int(name.rsplit("w", 1)[1])
        return experiment(name, b, width=w, saves=b.scaling_points)
    if name == "simple_cosine":
        return experiment(name, b, saves=b.scaling_points)  # also the middle width of table 5
    return experiment(name, b, **RUN_SPECS[name])


def scaling_runs(b: Budget = BUDGET) -> list[str]:
    return [("simple_cosine" if w == b.width else f"simple_cosine_w{w}") for w in b.widths]


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:8]


def run_dir(name: str, b: Budget = BUDGET) -> Path:
    return RUNS / f"{name}-{_digest(run_config(name, b))}"


def ensure_run(name: str, b: Budget = BUDGET) -> Path:
    """Train the named run unless a finished one is cached; resumes a partial one. Returns its folder."""
    from pakhsh.config import from_dict
    from pakhsh.training import Trainer
    from pakhsh.training.checkpoint import latest_checkpoint
    from pakhsh.training.experiment import ExperimentConfig

    out = run_dir(name, b)
    done = out / "train_result.json"
    if done.is_file():
        return out
    cfg_dict = run_config(name, b)
    cfg_dict["train"]["out_dir"] = str(out)
    cfg = from_dict(ExperimentConfig, cfg_dict)
    resume = latest_checkpoint(out) is not None
    log(f"training {name} -> {out}" + (" (resuming)" if resume else ""))
    start = time.perf_counter()
    # a folder with a log but no checkpoint is a run killed before its first save: start it again
    result = Trainer(cfg, resume=resume, overwrite=not resume, progress=False).fit()
    seconds = time.perf_counter() - start
    done.write_text(json.dumps({"step": result.step, "last_loss": result.last_loss, "train_seconds": seconds,
                                "threads": torch.get_num_threads(), "resumed": resume}, indent=2) + "\n")
    log(f"trained {name}: step {result.step}, loss {result.last_loss:.4f}, {seconds:.0f} s")
    return out


def train_info(run: Path) -> dict[str, Any]:
    return json.loads((run / "train_result.json").read_text())


def checkpoints(run: Path) -> list[Path]:
    """The run's checkpoint folders, oldest first."""
    return sorted(p for p in (run / "checkpoints").glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))


# ----------------------------------------------------------------------------- cached evaluations


@dataclass
class Job:
    """One cached evaluation: its JSON result file, how to compute it, and a rough cost (network calls)."""

    path: Path
    compute: Callable[[], dict[str, Any]]
    cost: float

    def result(self) -> dict[str, Any]:
        return json.loads(self.path.read_text())


def _try_run(job: Job) -> bool:
    """Compute `job` unless another process holds its lock; False when it is someone else's."""
    if job.path.is_file():
        return True
    job.path.parent.mkdir(parents=True, exist_ok=True)
    lock = job.path.with_suffix(".lock")
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        if _holder_alive(lock):
            return False
        lock.unlink(missing_ok=True)  # its process died: take it over
        return _try_run(job)
    try:
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        value = job.compute()
        tmp = job.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(value, indent=2) + "\n")
        tmp.replace(job.path)
        return True
    finally:
        lock.unlink(missing_ok=True)


def _holder_alive(lock: Path) -> bool:
    try:
        os.kill(int(lock.read_text() or "0"), 0)
        return True
    except (ValueError, ProcessLookupError, FileNotFoundError):
        return False
    except PermissionError:
        return True


def run_jobs(jobs: list[Job]) -> list[dict[str, Any]]:
    """Results of `jobs`, computing the missing ones, costliest first. Several processes may run the same list
    side by side: each takes the jobs nobody holds, then waits for the others' (lock files), so the work splits
    between them instead of being repeated."""
    pending = sorted(jobs, key=lambda j: -j.cost)
    while pending:
        pending = [j for j in pending if not _try_run(j)]
        if pending:
            time.sleep(2)
    return [j.result() for j in jobs]


def run_job_map(jobs: dict[Any, Job]) -> dict[Any, dict[str, Any]]:
    """`run_jobs` over a dict of named jobs: the same keys, mapped to results."""
    return dict(zip(jobs, run_jobs(list(jobs.values()))))


def sample_job(ckpt: Path, sampler: str, steps: int, n: int, b: Budget = BUDGET, seed: int = 0) -> Job:
    """FID/KID/IS (fashion-net) of `n` samples of a checkpoint. steps = T means the full chain."""
    from pakhsh.evaluation import EvalConfig, evaluate

    def compute() -> dict[str, Any]:
        start = time.perf_counter()
        cfg = EvalConfig(source=str(ckpt), num_samples=n, num_real=b.num_real, sampler=sampler,
                         steps=None if steps >= b.num_steps else steps, metrics=("fid", "kid", "is"), bf16=True,
                         batch_size=b.sample_batch, seed=seed, stats_dir=str(STATS), device="cpu", progress=False)
        r = evaluate(cfg).report
        log(f"  {ckpt.parent.parent.name}/{ckpt.name} {sampler}-{steps}: FID {r.fid:.2f} "
            f"({time.perf_counter() - start:.0f} s)")
        return {"fid": r.fid, "kid": r.kid_mean, "kid_std": r.kid_std, "is": r.is_mean, "is_std": r.is_std,
                "labels": r.labels(), "n": r.n_fake, "seconds": time.perf_counter() - start}

    width = json.loads((ckpt / "config.json").read_text())["model"]["model_channels"]
    return Job(_ckpt_eval_dir(ckpt) / f"{sampler}_{steps}_n{n}_s{seed}.json", compute, n * steps * width**2)


def nll_job(ckpt: Path, images: int, terms: int, seed: int = 0) -> Job:
    """Bits/dim on the test split (stratified estimate of the full bound)."""

    def compute() -> dict[str, Any]:
        from pakhsh.pipelines import ImagePipeline

        start = time.perf_counter()
        pipe = ImagePipeline.from_pretrained(ckpt, device="cpu")
        bpd = stratified_bpd(pipe, images, terms, seed)
        log(f"  {ckpt.parent.parent.name}/{ckpt.name} NLL: {bpd:.3f} bits/dim ({time.perf_counter() - start:.0f} s)")
        return {"bpd": bpd, "images": images, "terms": terms, "seconds": time.perf_counter() - start}

    width = json.loads((ckpt / "config.json").read_text())["model"]["model_channels"]
    cost = 2 * images * (terms + 1) * width**2  # fp32: about twice the cost of a bf16 sampling call
    return Job(_ckpt_eval_dir(ckpt) / f"nll_{images}_k{terms}_s{seed}.json", compute, cost)


def _ckpt_eval_dir(ckpt: Path) -> Path:
    return ckpt.parent.parent / "evals" / ckpt.name


@torch.no_grad()
def stratified_bpd(pipe: Any, images: int, terms: int, seed: int = 0, batch_size: int = 64) -> float:
    """Bits/dim of the variational bound (DDPM eq. 5) with the T-1 KL terms estimated by stratified sampling.

    L = L_T + L_0 + sum_{t=1}^{T-1} L_t. L_T, L_0 (the decoder NLL, the largest term) and the first `terms // 5`
    KL terms (they fall off like 1/t, so a random pick among them is very skewed) are computed exactly; the rest
    of the sum is split into equal strata of t, each image drawing one t per stratum: (stratum size) * L_t is
    unbiased for the stratum's sum. Costs terms + 1 network evaluations per image instead of T.
    Images: the first `images` of the model's test split.
    """
    from dataclasses import replace as dc_replace

    from torch.utils.data import DataLoader

    from pakhsh.data import Truncated, build_dataset
    from pakhsh.diffusion import prior_bpd, vb_term_bpd

    d, model = pipe.diffusion, pipe.model
    test = Truncated(build_dataset(dc_replace(pipe.config.data, split="test", random_flip=False)), images)
    head = max(1, terms // 5)
    tail = torch.linspace(head + 1, d.num_steps, terms - head + 1).round().long().tolist()
    edges = list(range(1, head + 1)) + tail  # strata [edges[k], edges[k+1]); the head ones hold a single t
    g = torch.Generator().manual_seed(seed)
    total, seen = 0.0, 0
    for batch in DataLoader(test, batch_size=batch_size, shuffle=False):
        x0 = batch["image"]  # (B, C, H, W)
        b = x0.shape[0]
        bound = prior_bpd(d, x0).float() + _term(d, model, x0, torch.zeros(b, dtype=torch.long), g)
        for lo, hi in zip(edges[:-1], edges[1:]):
            if hi <= lo:
                continue
            t = torch.randint(lo, hi, (b,), generator=g)
            bound += (hi - lo) * _term(d, model, x0, t, g)
        total += bound.sum().item()
        seen += b
    return total / seen


def _term(d: Any, model: Any, x0: torch.Tensor, t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """L_t in bits/dim for per-image steps t (B,), with fresh noise (as calc_bpd)."""
    from pakhsh.diffusion import vb_term_bpd

    noise = torch.randn(x0.shape, generator=g)
    term, _ = vb_term_bpd(d, model, x0, d.q_sample(x0, t, noise), t, clip_denoised=True)
    return term.float()


def training_flops(cfg: dict[str, Any], steps: int) -> float:
    """Training compute: 3 x forward FLOPs (forward + backward ~ 2 x forward) x batch x steps. Forward FLOPs are
    counted by torch's FlopCounterMode on one 32x32 image (matmuls and convolutions, 2 FLOPs per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    from pakhsh.config import from_dict
    from pakhsh.nets.unet import UNet, UNetConfig

    net = UNet(from_dict(UNetConfig, cfg["model"])).eval()
    m = cfg["model"]
    x = torch.randn(1, m["in_channels"], m["image_size"], m["image_size"])
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(x, torch.zeros(1, dtype=torch.long))
    return 3.0 * counter.get_total_flops() * cfg["train"]["batch_size"] * steps


def num_params(cfg: dict[str, Any]) -> int:
    from pakhsh.config import from_dict
    from pakhsh.nets.unet import UNet, UNetConfig

    return sum(p.numel() for p in UNet(from_dict(UNetConfig, cfg["model"])).parameters())


# ----------------------------------------------------------------------------- reports


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout
        return out.stdout.strip() + (" (working tree has uncommitted changes)" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> str:
    return (f"{platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"python {platform.python_version()}, torch {torch.__version__}, "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")


@dataclass
class Table:
    """A markdown results page: a title, what it reproduces, the table, findings, and provenance."""

    name: str  # file stem under docs/results/
    title: str
    reproduces: str
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: str = ""  # more markdown (e.g. images) after the table

    def write(self, started: float, data: dict[str, Any]) -> Path:
        RESULTS.mkdir(parents=True, exist_ok=True)
        lines = [f"# {self.title}", "", f"Reproduces: {self.reproduces}", "",
                 "| " + " | ".join(self.header) + " |", "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        if self.extra:
            lines += ["", self.extra]
        lines += ["", "## What the runs show", ""] + [f"- {f}" for f in self.findings]
        if self.notes:
            lines += ["", "## Notes", ""] + [f"- {n}" for n in self.notes]
        lines += ["", "## Provenance", "",
                  f"- command: `{command()}` (or `bash benchmarks/paper_tables/run_all.sh` for all tables)",
                  f"- commit: {git_commit()}",
                  f"- machine: {machine()}",
                  f"- budget: {BUDGET.describe()}",
                  f"- wall time of this script: {time.perf_counter() - started:.0f} s "
                  "(training runs and evaluations shared with other tables are counted where first computed)",
                  f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}",
                  f"- raw numbers: `{self.name}.json`", ""]
        path = RESULTS / f"{self.name}.md"
        path.write_text("\n".join(lines))
        (RESULTS / f"{self.name}.json").write_text(json.dumps({"budget": asdict(BUDGET), **data}, indent=2) + "\n")
        log(f"wrote {path}")
        return path


def command() -> str:
    prefix = "PAKHSH_BENCH=smoke " if SMOKE else ""
    return prefix + "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])


def plot_path(name: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    return RESULTS / f"{name}.png"


def fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def setup() -> float:
    """Common start of every script: threads from OMP_NUM_THREADS (default 1: scripts run two side by side)."""
    import warnings

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    # Known and documented in the tables: KID subsets are the sample count; smoke budgets have tiny sets.
    warnings.filterwarnings("ignore", message="KID subset size clipped")
    warnings.filterwarnings("ignore", message="only .* samples for")
    import matplotlib

    matplotlib.use("Agg")
    return time.perf_counter()


__all__ = ["BUDGET", "Budget", "Job", "Table", "checkpoints", "ensure_run", "fmt", "log", "nll_job", "num_params",
           "plot_path", "run_config", "run_dir", "run_jobs", "sample_job", "scaling_runs", "setup", "step_counts",
           "train_info", "training_flops"]
