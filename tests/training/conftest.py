"""A tiny experiment (8x8 shapes, 2-level UNet) that trains a step in a fraction of a second."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import tiny_experiment

TINY = tiny_experiment()


@pytest.fixture
def tiny_yaml(tmp_path: Path) -> Path:
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(TINY))
    return p


def cli(*args: str, **popen) -> subprocess.Popen:
    # same thread count as the test process (conftest sets 2): float reductions then match bit for bit
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="2")
    return subprocess.Popen([sys.executable, "-m", "pakhsh.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def log_records(run: Path) -> list[dict]:
    p = run / "log.jsonl"
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    start = time.time()
    while time.time() - start < timeout:
        recs = log_records(run)
        if recs and recs[-1]["step"] >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError("training did not reach the step in time")
