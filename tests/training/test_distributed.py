"""Two CPU processes (gloo, via torchrun) compute the same update as one process on the combined batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pakhsh.training import Trainer, TrainingError, latest_checkpoint, load_experiment

from .conftest import log_records


def _run(args: list[str]) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def _common(tiny_yaml: Path) -> list[str]:
    return ["train", str(tiny_yaml), "-q", "--set", "model.dropout=0.0", "--set", "train.steps=4"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    import yaml

    from tests.conftest import tiny_experiment

    d = tmp_path_factory.mktemp("one")
    (d / "tiny.yaml").write_text(yaml.safe_dump(tiny_experiment()))
    _run([sys.executable, "-m", "pakhsh.cli", *_common(d / "tiny.yaml"), "--out", str(d / "one")])
    return d / "one"


# "auto" is what people run: without a GPU it must still be one data-parallel run (gloo), never two trainers
@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_two_processes_equal_one_on_combined_batch(one_process, tiny_yaml, tmp_path, device):
    out = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "pakhsh.cli", *_common(tiny_yaml), "--set", f"train.device={device}", "--out", str(tmp_path / "two")])
    assert out.count("trained to step 4") == 1, out  # only the main process reports
    one = load_file(str(latest_checkpoint(one_process) / "model.safetensors"))
    two = load_file(str(latest_checkpoint(tmp_path / "two") / "model.safetensors"))
    for k in one:
        assert torch.allclose(one[k], two[k], atol=2e-6), (k, (one[k] - two[k]).abs().max())
    # one record per step, and the logged loss is the mean over both processes: the single process's numbers
    l1 = [r["loss"] for r in log_records(one_process)]
    l2 = [(r["step"], r["loss"]) for r in log_records(tmp_path / "two")]
    assert [s for s, _ in l2] == [1, 2, 3, 4]
    assert torch.allclose(torch.tensor(l1), torch.tensor([v for _, v in l2]), atol=1e-5)


def test_launched_processes_that_do_not_form_one_run_are_an_error(tiny_yaml, tmp_path, monkeypatch):
    from accelerate import PartialState

    PartialState(cpu=True)  # set up as one process (a no-op when already set up)...
    monkeypatch.setenv("WORLD_SIZE", "2")  # ...while the launcher says two were started
    cfg = load_experiment(tiny_yaml, [f"train.out_dir={tmp_path / 'run'}"])
    with pytest.raises(TrainingError, match=r"2 processes were launched \(WORLD_SIZE=2\) but accelerate set up 1 .*torchrun"):
        Trainer(cfg, progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("env", "exits"), [({"WORLD_SIZE": "2", "RANK": "1"}, True),
                                            ({"WORLD_SIZE": "2", "RANK": "0"}, False), ({}, False)])
def test_only_a_worker_rank_exits_at_once_after_training(env, exits):
    """A worker rank ends with os._exit (no interpreter teardown: atexit handlers do not run); the main rank and a
    single process go on to report."""
    code = ("import atexit, sys; from pakhsh.training.distributed import exit_worker_rank; "
            "atexit.register(lambda: print('teardown')); print('trained', flush=True); exit_worker_rank(0); "
            "print('reported')")
    base = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK")}
    res = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == (["trained"] if exits else ["trained", "reported", "teardown"])
