"""CPU thread count vs speed: one batch-1 forward of a model, a short in-process sample, and the `pakhsh sample`
command (process start included), at 1 thread, 2 threads, pakhsh's automatic choice (usable cores less the
load average) and torch's own default (every core).

    python benchmarks/threads.py                      # shapes model, 7 runs each
    python benchmarks/threads.py -m fashion_mnist --runs 5 --json threads.json

Prints median times per setting (min-max with --json). On a busy or CPU-limited machine torch's default (every
core) oversubscribes the cores this process can actually get, and its threads spin waiting for each other; that
is why `pakhsh --threads` defaults to the idle usable cores. Run it idle and under load (e.g. beside another
`pakhsh sample`) to see both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from pakhsh.threads import choose_threads
from pakhsh.pipelines import ImagePipeline, SampleSettings


def timed(fn: Callable[[], object], runs: int, warmup: int = 1) -> list[float]:
    """Wall seconds of `runs` calls of fn after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def torch_default_threads() -> int:
    """What torch would use without pakhsh: measured in a fresh process (this one's count is changed below)."""
    code = "import torch; print(torch.get_num_threads())"
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env).stdout)


def settings() -> dict[str, int]:
    """Label -> thread count: 1, 2, pakhsh's automatic choice and torch's default."""
    auto, _ = choose_threads(None, {})
    default = torch_default_threads()
    return {"1": 1, "2": 2, f"auto ({auto})": auto, f"torch default ({default})": default}


def bench_forward(pipe: ImagePipeline, runs: int) -> list[float]:
    c, h, w = pipe.image_shape
    x, t = torch.randn(1, c, h, w), torch.tensor([500])
    with torch.no_grad():
        return timed(lambda: pipe.model(x, t), runs, warmup=3)


def bench_sample(pipe: ImagePipeline, args: argparse.Namespace) -> list[float]:
    s = SampleSettings("ddpm", args.steps)
    return timed(lambda: pipe.generate(args.num, s, batch_size=args.num, progress=False), max(3, args.runs // 2))


def bench_cli(threads: int, args: argparse.Namespace) -> list[float]:
    """The whole command in a fresh process, as a user runs it."""
    out = Path(args.tmp) / "threads_bench.png"
    cmd = [sys.executable, "-m", "pakhsh.cli", "--threads", str(threads), "sample", "-m", args.model, "-n",
           str(args.num), "--steps", str(args.steps), "-o", str(out), "-q"]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    return timed(lambda: subprocess.run(cmd, check=True, env=env, capture_output=True), max(3, args.runs // 2),
                 warmup=0)


def summary(times: list[float]) -> dict[str, float]:
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "runs": len(times)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", "-m", default="shapes", help="model to time (default: %(default)s)")
    p.add_argument("--runs", type=int, default=7, help="timed runs per setting (default: %(default)s)")
    p.add_argument("--num", type=int, default=4, help="images of the short sample (default: %(default)s)")
    p.add_argument("--steps", type=int, default=10, help="steps of the short sample (default: %(default)s)")
    p.add_argument("--no-cli", action="store_true", help="skip the subprocess `pakhsh sample` timing")
    p.add_argument("--tmp", default="/tmp", help="where the CLI run writes its grid")
    p.add_argument("--json", help="also write the figures as JSON here")
    args = p.parse_args()

    pipe = ImagePipeline.from_pretrained(args.model, device="cpu")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"model {args.model}; {cores} usable core(s) of {os.cpu_count()}; load {load:.1f}; torch {torch.__version__}")
    print(f"{'threads':<22} {'forward b=1 (ms)':>18} {f'sample n={args.num} x{args.steps} (s)':>22} "
          f"{'pakhsh sample (s)':>18}")
    results = {}
    for name, n in settings().items():
        torch.set_num_threads(n)
        row = {"threads": n, "forward": summary(bench_forward(pipe, args.runs)),
               "sample": summary(bench_sample(pipe, args))}
        if not args.no_cli:
            row["cli"] = summary(bench_cli(n, args))
        results[name] = row
        cli = f"{row['cli']['median']:>18.2f}" if "cli" in row else f"{'-':>18}"
        print(f"{name:<22} {row['forward']['median'] * 1000:>18.1f} {row['sample']['median']:>22.2f} {cli}")
    print("medians; min-max per cell are in --json")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "cores": cores, "results": results}, indent=2))


if __name__ == "__main__":
    main()
