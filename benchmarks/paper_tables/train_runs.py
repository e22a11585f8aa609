"""Train (or find cached) the runs of all paper tables; `--lane i --lanes n` trains this lane's share, so that
n single-threaded processes train side by side (on 2 cores, two lanes beat one 2-thread process).

    python benchmarks/paper_tables/train_runs.py --lane 0 --lanes 2 & python ... --lane 1 --lanes 2
"""

from __future__ import annotations

import argparse

import common as c


def all_runs() -> list[str]:
    names = list(c.RUN_SPECS) + c.scaling_runs()
    return list(dict.fromkeys(names))  # shared runs once, order kept


def cost(name: str) -> float:
    """Relative training cost: width^2 (convolution FLOPs) x steps."""
    cfg = c.run_config(name)
    return cfg["model"]["model_channels"] ** 2 * cfg["train"]["steps"]


def lanes(names: list[str], n: int) -> list[list[str]]:
    """Longest-first greedy split into n lanes of similar total cost."""
    out: list[list[str]] = [[] for _ in range(n)]
    load = [0.0] * n
    for name in sorted(names, key=cost, reverse=True):
        i = load.index(min(load))
        out[i].append(name)
        load[i] += cost(name)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lane", type=int, default=0)
    p.add_argument("--lanes", type=int, default=1)
    p.add_argument("names", nargs="*", help="run names (default: every run of the tables, this lane's share)")
    args = p.parse_args()
    c.setup()
    names = args.names or lanes(all_runs(), args.lanes)[args.lane]
    for name in names:
        c.ensure_run(name)


if __name__ == "__main__":
    main()
