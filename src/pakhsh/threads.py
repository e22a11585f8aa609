"""How many CPU threads pakhsh's commands use when --threads is not given (see `choose_threads`)."""

from __future__ import annotations

import math
import os
from pathlib import Path

# Auto thread count cap: past ~16 threads the small convolutions of these models stop scaling and the threads'
# spinning slows everything else on the machine.
MAX_AUTO_THREADS = 16


def usable_cores() -> tuple[int, str]:
    """(cores this process can get, how that was found): its affinity mask (which `taskset` and cpuset
    containers narrow), further capped by a cgroup CPU quota (Docker --cpus, Kubernetes limits), which leaves
    the mask at every core of the host."""
    try:
        cores, how = len(os.sched_getaffinity(0)), "affinity"
    except (AttributeError, OSError):  # not Linux
        cores, how = os.cpu_count() or 1, "cpu_count"
    quota = _cgroup_cpu_quota()
    if quota is not None and quota < cores:
        cores, how = max(1, math.ceil(quota)), "cgroup quota"
    return cores, how


def _cgroup_cpu_quota() -> float | None:
    """CPUs allowed by the cgroup (v2 cpu.max, v1 cfs quota / period), None when unlimited or unknown."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return quota_us / period_us if quota_us > 0 and period_us > 0 else None
    except (OSError, ValueError):
        return None


def choose_threads(requested: int | None, environ: dict[str, str] | None = None, load: float | None = None,
                   cores: int | None = None) -> tuple[int, str]:
    """(thread count, why): --threads if given, else OMP_NUM_THREADS if the user set it, else the usable cores
    (`usable_cores`) that other processes leave idle, at least 1 and at most MAX_AUTO_THREADS.

    Idle cores are estimated from the 1-minute load average as a share of the whole machine (in a container the
    load average is the host's, so it is scaled by the host's core count, not subtracted from ours). torch's own
    default takes every core whatever else runs: when other processes hold them its threads wait for each other
    and a sample runs several times slower than on one thread (measured: 243 s vs 43 s). Fewer threads than idle
    cores costs at most their share; more costs far more."""
    env = os.environ if environ is None else environ
    if requested is not None:
        return requested, "--threads"
    omp = env.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        return int(omp), "OMP_NUM_THREADS"
    how = "given"
    if cores is None:
        cores, how = usable_cores()
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):
            load = 0.0
    busy = min(1.0, load / max(1, os.cpu_count() or cores))  # share of the machine's cores in use
    idle = max(1, min(cores, MAX_AUTO_THREADS, math.floor(cores * (1.0 - busy) + 0.5)))
    return idle, f"{cores} usable core(s) ({how}), machine load {load:.1f}, at most {MAX_AUTO_THREADS}"
