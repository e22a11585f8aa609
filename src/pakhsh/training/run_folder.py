"""A run folder's contents as a whole: what shows an earlier run, removing one for --overwrite, and setting a
damaged checkpoint aside (the lock that keeps one writer per folder is lock.py)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .checkpoint import step_folders

# what a run writes into its folder (--overwrite removes exactly these; the lock file stays with its holder)
RUN_OUTPUTS = ("checkpoints", "samples", "tb", "log.jsonl", "loss.png", "config.json")


def run_contents(out: Path) -> list[str]:
    """What in `out` shows an earlier run: checkpoints or a training log."""
    found = []
    if step_folders(out) or (out / "checkpoints" / "LATEST").exists():
        found.append("checkpoints/")
    log = out / "log.jsonl"
    if log.is_file() and log.stat().st_size > 0:
        found.append("log.jsonl")
    return found


def remove_run(out: Path) -> None:
    for name in RUN_OUTPUTS:
        p = out / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def set_aside(folder: Path) -> None:
    """Rename a damaged checkpoint to `step_X.damaged` (kept for inspection; readers and pruning ignore it)."""
    target = folder.with_name(folder.name + ".damaged")
    n = 1
    while target.exists():
        target, n = folder.with_name(f"{folder.name}.damaged{n}"), n + 1
    os.replace(folder, target)
