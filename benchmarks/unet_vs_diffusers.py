"""Throughput and peak memory of the pakhsh ADM UNet vs diffusers' UNet2DModel at a matched parameter count.

Both networks get the same architecture on paper (32x32 RGB, widths C,2C,2C,2C, two ResBlocks per level,
attention at 16x16 and in the middle, scale-shift timestep injection, dropout 0) and the same inputs, batch,
thread count and machine, in one run.

Measured per (network, precision) pair; precision is fp32 (no autocast) or bf16 (torch.autocast around forward):
  train  - images/s of one step = forward + MSE loss + backward + AdamW step (model.train())
  sample - images/s of one forward under torch.no_grad() (model.eval())
  memory - of three training steps, each pair alone in a fresh subprocess (run one after another):
           CUDA: torch.cuda.max_memory_allocated() (tensors only).
           CPU:  process peak RSS (getrusage ru_maxrss) minus RSS after building the model and before the first
                 step: activations, gradients, AdamW state and allocator slack; a whole-process figure.
           Both: "saved-for-bwd", the distinct storages autograd keeps during one training forward
                 (counted with saved_tensors_hooks), which does not depend on the allocator.
Speed: every pair lives in one process and the pairs take turns step by step ("rounds"), so a burst of load
from elsewhere on the machine hits all pairs alike; we report medians over --repeats rounds after --warmup.

    python benchmarks/unet_vs_diffusers.py --device cpu --batch-size 16 --repeats 11
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
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
    saved_mb: float  # bytes autograd keeps for backward in one training forward (allocator-independent)


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


def _timed(step: Callable[[], None], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    step()
    _sync(device)
    return time.perf_counter() - t0


@dataclass
class Bench:
    """One network with its inputs, optimiser and the two steps we time."""

    net: str
    model: nn.Module
    sample_step: Callable[[str], None]  # argument: precision mode
    train_step: Callable[[str], None]


def make_bench(net: str, args: argparse.Namespace) -> Bench:
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = (build_pakhsh if net == "pakhsh" else build_diffusers)(args.width, args.head_dim).to(device)
    f = as_callable(net, model)
    b = args.batch_size
    x = torch.randn(b, 3, 32, 32, device=device)
    t = torch.randint(0, 1000, (b,), device=device)
    target = torch.randn_like(x)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def autocast(mode: str) -> torch.autocast:
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode == "bf16")

    def sample_step(mode: str) -> None:
        model.eval()
        with torch.no_grad(), autocast(mode):
            f(x, t)

    def train_step(mode: str) -> None:
        model.train()
        with autocast(mode):
            loss = F.mse_loss(f(x, t).float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return Bench(net, model, sample_step, train_step)


def time_all(args: argparse.Namespace) -> dict[tuple[str, str], tuple[float, float]]:
    """Median seconds (train, sample) per (net, mode), all pairs interleaved round by round.

    Interleaving means a burst of load from elsewhere on the machine slows every pair alike instead of
    whichever happened to run at that moment.
    """
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    benches = [make_bench(net, args) for net in NETS]
    pairs = [(b, m) for m in args.modes for b in benches]
    times: dict[tuple[str, str], tuple[list[float], list[float]]] = {(b.net, m): ([], []) for b, m in pairs}
    for r in range(args.warmup + args.repeats):
        for b, m in pairs:
            tr, sa = _timed(lambda: b.train_step(m), device), _timed(lambda: b.sample_step(m), device)
            if r >= args.warmup:
                times[(b.net, m)][0].append(tr)
                times[(b.net, m)][1].append(sa)
    return {k: (statistics.median(v[0]), statistics.median(v[1])) for k, v in times.items()}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def saved_for_backward_mb(bench: Bench, mode: str, args: argparse.Namespace) -> float:
    """MB of distinct tensor storages autograd saves during one training forward (activations, weight casts)."""
    sizes: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    device = torch.device(args.device)
    x = torch.randn(args.batch_size, 3, 32, 32, device=device)
    t = torch.randint(0, 1000, (args.batch_size,), device=device)
    bench.model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode == "bf16"):
            as_callable(bench.net, bench.model)(x, t)
    return sum(sizes.values()) / 2**20


def peak_train_memory(net: str, mode: str, args: argparse.Namespace) -> tuple[float, float]:
    """(peak MB of three training steps, MB saved for backward); run alone in a fresh process."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    bench = make_bench(net, args)
    # Baseline before the first step, so the figure includes gradients and AdamW state (created lazily).
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss0 = _rss_mb()
    for _ in range(3):
        bench.train_step(mode)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:  # ru_maxrss (KiB on Linux) is the process high-water mark; the steps cannot peak below rss0
        peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss0, 0.0)
    return peak, saved_for_backward_mb(bench, mode, args)


def _child_argv(net: str, mode: str, args: argparse.Namespace) -> list[str]:
    return [sys.executable, __file__, "--child", f"{net}:{mode}", "--device", args.device,
            "--batch-size", str(args.batch_size), "--threads", str(args.threads), "--width", str(args.width),
            "--head-dim", str(args.head_dim)]


def run_all(args: argparse.Namespace) -> list[Result]:
    """Memory: one fresh subprocess per pair, one after another. Speed: all pairs in this process."""
    mem = {}
    for mode in args.modes:
        for net in NETS:
            out = subprocess.run(_child_argv(net, mode, args), capture_output=True, text=True)
            if out.returncode:
                raise RuntimeError(f"{net}/{mode} memory run failed:\n{out.stderr}")
            peak, saved = out.stdout.strip().splitlines()[-1].split()
            mem[(net, mode)] = (float(peak), float(saved))
    print("memory measured; timing...", file=sys.stderr, flush=True)
    speed = time_all(args)
    params = {net: sum(p.numel() for p in (build_pakhsh if net == "pakhsh" else build_diffusers)(
        args.width, args.head_dim).parameters()) for net in NETS}
    b = args.batch_size
    return [Result(net, mode, params[net], b / speed[(net, mode)][0], b / speed[(net, mode)][1], *mem[(net, mode)])
            for mode in args.modes for net in NETS]


def report(results: list[Result], args: argparse.Namespace) -> None:
    by = {(r.net, r.mode): r for r in results}
    mem = "peak CUDA alloc MB" if args.device.startswith("cuda") else "peak RSS delta MB"
    print(f"\ndevice={args.device} threads={args.threads} batch={args.batch_size} 32x32x3 "
          f"repeats={args.repeats} (median) warmup={args.warmup}")
    print(f"{'net':10s} {'mode':5s} {'params':>10s} {'train img/s':>12s} {'sample img/s':>13s} {mem:>19s} "
          f"{'saved-for-bwd MB':>17s}")
    for r in results:
        print(f"{r.net:10s} {r.mode:5s} {r.params:10,d} {r.train_ips:12.2f} {r.sample_ips:13.2f} "
              f"{r.peak_mem_mb:19.1f} {r.saved_mb:17.1f}")
    ref = by.get(("diffusers", "fp32"))
    if ref is None:
        return
    p, d = by[("pakhsh", "fp32")].params, ref.params
    print(f"\nparam count: pakhsh {p:,} vs diffusers {d:,} ({100 * (p / d - 1):+.1f}%)")
    if abs(p / d - 1) > 0.05:
        print("WARNING: parameter counts differ by more than 5%; the comparison is not matched")
    print("ratios vs diffusers fp32 (train / sample):")
    for r in results:
        print(f"  {r.net:10s} {r.mode:5s} {r.train_ips / ref.train_ips:5.2f}x / {r.sample_ips / ref.sample_ips:5.2f}x")
    print("pakhsh vs diffusers at the same precision (train / sample):")
    for mode in args.modes:
        a, o = by[("pakhsh", mode)], by[("diffusers", mode)]
        print(f"  {mode:5s} {a.train_ips / o.train_ips:5.2f}x / {a.sample_ips / o.sample_ips:5.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda (bf16 mode uses autocast on this device)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=9, help="timed rounds (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds before timing")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads, same for both networks")
    ap.add_argument("--width", type=int, default=64, help="first-level channels C (widths C,2C,2C,2C)")
    ap.add_argument("--head-dim", type=int, default=64, help="channels per attention head")
    ap.add_argument("--modes", type=lambda s: s.split(","), default=list(MODES), help="comma list of fp32,bf16")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: NET:MODE, run one measurement
    args = ap.parse_args()
    if args.child:
        net, mode = args.child.split(":")
        print(*peak_train_memory(net, mode, args))
        return
    report(run_all(args), args)


if __name__ == "__main__":
    main()
