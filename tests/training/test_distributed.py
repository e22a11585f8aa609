"""Two CPU processes (gloo, via torchrun) compute the same update as one process on the combined batch."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from pakhsh.training import latest_checkpoint

from .conftest import log_records


def _run(args: list[str]) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


def test_two_processes_equal_one_on_combined_batch(tiny_yaml, tmp_path):
    common = ["train", str(tiny_yaml), "-q", "--set", "model.dropout=0.0", "--set", "train.steps=4"]
    _run([sys.executable, "-m", "pakhsh.cli", *common, "--out", str(tmp_path / "one")])
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
          "-m", "pakhsh.cli", *common, "--out", str(tmp_path / "two")])
    one = load_file(str(latest_checkpoint(tmp_path / "one") / "model.safetensors"))
    two = load_file(str(latest_checkpoint(tmp_path / "two") / "model.safetensors"))
    for k in one:
        assert torch.allclose(one[k], two[k], atol=2e-6), (k, (one[k] - two[k]).abs().max())
    # the logged loss is the mean over both processes: the same numbers as the single process
    l1 = [r["loss"] for r in log_records(tmp_path / "one")]
    l2 = [r["loss"] for r in log_records(tmp_path / "two")]
    assert torch.allclose(torch.tensor(l1), torch.tensor(l2), atol=1e-5)
