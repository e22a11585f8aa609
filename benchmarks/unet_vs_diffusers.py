"""Throughput and peak memory of the pakhsh ADM UNet vs diffusers' UNet2DModel at a matched parameter count.

Both networks get the same architecture on paper (32x32 RGB, widths C,2C,2C,2C, two ResBlocks per level,
attention at 16x16 and in the middle, scale-shift timestep injection) and the same batch, thread count and
machine. Each (network, precision) pair runs in its own fresh subprocess so that peak memory is not polluted by
the other runs; the subprocesses run one after another, never concurrently.

Measured per pair:
  train  - one step = forward + MSE loss + backward + AdamW step (model.train()), images/s
  sample - one forward under torch.no_grad() (model.eval()), images/s
  memory - CUDA: torch.cuda.max_memory_allocated() during the timed train steps (tensors only).
           CPU:  peak resident set size of the process during the train steps minus its RSS right before them
                 (getrusage ru_maxrss; includes allocator slack, so an upper-bound-ish whole-process figure).
Figures are medians over --repeats timed steps after --warmup untimed ones.

    python benchmarks/unet_vs_diffusers.py --device cpu --batch-size 16 --repeats 7
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MODES = ("fp32", "bf16")  # fp32: no autocast; bf16: torch.autocast(device, dtype=bfloat16) around the forward
NETS = ("pakhsh", "diffusers")


@dataclass
class Result:
    """One (network, precision) measurement."""

    net: str
    mode: str
    params: int
    train_ips: float  # median images/s of full training steps
    sample_ips: float  # median images/s of no-grad forwards
    peak_mem_mb: float  # see module docstring for what this is on CPU vs CUDA


def build_pakhsh(width: int, heads_dim: int) -> nn.Module:
    from pakhsh.nets.unet import UNet, UNetConfig

    cfg = UNetConfig(image_size=32, in_channels=3, model_channels=width, out_channels=3, num_res_blocks=2,
                     attention_resolutions=(16,), channel_mult=(1, 2, 2, 2), dropout=0.0,
                     num_head_channels=heads_dim, use_scale_shift_norm=True)
    return UNet(cfg)


def build_diffusers(width: int, heads_dim: int) -> nn.Module:
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
        block_out_channels=(width, 2 * width, 2 * width, 2 * width),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=heads_dim, resnet_time_scale_shift="scale_shift", dropout=0.0,
    )


def as_callable(net: str, model: nn.Module) -> Callable[[Tensor, Tensor], Tensor]:
    """Both networks as `f(x, t) -> eps` (diffusers returns a dataclass; take `.sample`)."""
    if net == "diffusers":
        return lambda x, t: model(x, t).sample
    return lambda x, t: model(x, t)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time_steps(step: Callable[[], None], warmup: int, repeats: int, device: torch.device) -> float:
    """Median seconds of `repeats` calls of `step` after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def measure(net: str, mode: str, args: argparse.Namespace) -> Result:
    """Run in a fresh process: build `net`, time sampling then training, report peak memory of training."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = (build_pakhsh if net == "pakhsh" else build_diffusers)(args.width, args.head_dim).to(device)
    f = as_callable(net, model)
    b = args.batch_size
    x = torch.randn(b, 3, 32, 32, device=device)
    t = torch.randint(0, 1000, (b,), device=device)
    target = torch.randn_like(x)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode == "bf16")

    def sample_step() -> None:
        with torch.no_grad(), autocast:
            f(x, t)

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step() -> None:
        with autocast:
            loss = F.mse_loss(f(x, t).float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    model.eval()
    sample_s = _time_steps(sample_step, args.warmup, args.repeats, device)
    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss0 = _rss_mb()
    train_s = _time_steps(train_step, args.warmup, args.repeats, device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:  # ru_maxrss is in KiB on Linux; the process peak cannot be below the RSS we started from
        peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss0, 0.0)
    params = sum(p.numel() for p in model.parameters())
    return Result(net, mode, params, b / train_s, b / sample_s, peak)


def _child_argv(net: str, mode: str, args: argparse.Namespace) -> list[str]:
    return [sys.executable, __file__, "--child", f"{net}:{mode}", "--device", args.device,
            "--batch-size", str(args.batch_size), "--repeats", str(args.repeats), "--warmup", str(args.warmup),
            "--threads", str(args.threads), "--width", str(args.width), "--head-dim", str(args.head_dim)]


def run_all(args: argparse.Namespace) -> list[Result]:
    results = []
    for mode in args.modes:
        for net in NETS:
            out = subprocess.run(_child_argv(net, mode, args), capture_output=True, text=True)
            if out.returncode:
                raise RuntimeError(f"{net}/{mode} failed:\n{out.stderr}")
            results.append(Result(**json.loads(out.stdout.strip().splitlines()[-1])))
            print(f"  done {net:9s} {mode}", file=sys.stderr, flush=True)
    return results


def report(results: list[Result], args: argparse.Namespace) -> None:
    by = {(r.net, r.mode): r for r in results}
    mem = "peak CUDA alloc MB" if args.device.startswith("cuda") else "peak RSS delta MB"
    print(f"\ndevice={args.device} threads={args.threads} batch={args.batch_size} 32x32x3 "
          f"repeats={args.repeats} (median) warmup={args.warmup}")
    print(f"{'net':10s} {'mode':5s} {'params':>10s} {'train img/s':>12s} {'sample img/s':>13s} {mem:>19s}")
    for r in results:
        print(f"{r.net:10s} {r.mode:5s} {r.params:10,d} {r.train_ips:12.2f} {r.sample_ips:13.2f} "
              f"{r.peak_mem_mb:19.1f}")
    ref = by.get(("diffusers", "fp32"))
    if ref is None:
        return
    p, d = by[("pakhsh", "fp32")].params, ref.params
    print(f"\nparam count: pakhsh {p:,} vs diffusers {d:,} ({100 * (p / d - 1):+.1f}%)")
    print("ratios vs diffusers fp32 (train / sample):")
    for r in results:
        print(f"  {r.net:10s} {r.mode:5s} {r.train_ips / ref.train_ips:5.2f}x / {r.sample_ips / ref.sample_ips:5.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda (bf16 mode uses autocast on this device)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=7, help="timed steps per measurement (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps before timing")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads, same for both networks")
    ap.add_argument("--width", type=int, default=64, help="first-level channels C (widths C,2C,2C,2C)")
    ap.add_argument("--head-dim", type=int, default=64, help="channels per attention head")
    ap.add_argument("--modes", type=lambda s: s.split(","), default=list(MODES), help="comma list of fp32,bf16")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: NET:MODE, run one measurement
    args = ap.parse_args()
    if args.child:
        net, mode = args.child.split(":")
        print(json.dumps(asdict(measure(net, mode, args))))
        return
    report(run_all(args), args)


if __name__ == "__main__":
    main()
