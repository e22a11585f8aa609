"""Checkpoint files under crashes, full disks and hostile or damaged files (no training: fake states)."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

import pakhsh.training.checkpoint as ckpt_mod
from pakhsh.nets.unet import UNet
from pakhsh.training import CheckpointError, latest_checkpoint, load_experiment, load_model
from pakhsh.training.checkpoint import (
    DiskFullError,
    checkpoint_problem,
    load_state,
    read_resume_state,
    read_tensors,
    write_checkpoint,
)
from pakhsh.training.monitor import RunLog


class Crash(BaseException):
    """A kill at an exact point of write_checkpoint (BaseException: nothing may swallow it)."""


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    import yaml

    from tests.conftest import tiny_experiment

    p = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    p.write_text(yaml.safe_dump(tiny_experiment()))
    return load_experiment(p)


@pytest.fixture(scope="module")
def weights(cfg) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return UNet(cfg.model).state_dict()


def files(weights: dict[str, torch.Tensor], step: int) -> dict[str, Any]:
    params = {k: v + step for k, v in weights.items() if v.is_floating_point()}  # tells the steps apart
    return {"model.safetensors": {k: v + step if v.is_floating_point() else v for k, v in weights.items()},
            "optimizer.pt": {"state": {}, "param_groups": []}, "state.pt": {"step": step},
            "ema_0.9.safetensors": params, "ema_0.99.safetensors": params}


def make_run(run: Path, cfg, weights, steps: list[int], keep_last: int = 3) -> None:
    for s in steps:
        write_checkpoint(run, s, files(weights, s), cfg, keep_last)


def assert_recoverable(run: Path, allowed: set[int], *, latest_file_valid: bool = True) -> None:
    """The invariant: a complete checkpoint of an allowed step is found and loads; LATEST names a complete one."""
    found = latest_checkpoint(run)
    assert found is not None and checkpoint_problem(found) is None
    assert int(found.name.split("_")[1]) in allowed, found
    assert load_model(run).path == found
    if latest_file_valid:
        named = run / "checkpoints" / (run / "checkpoints" / "LATEST").read_text().strip()
        assert checkpoint_problem(named) is None, named
        load_model(named)


def crash_on_call(n: int, real: Callable, partial_rmtree: bool = False) -> Callable:
    calls = {"n": 0}

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == n:
            if partial_rmtree:  # a kill half-way through a delete: some files gone, the folder still there
                victim = next(Path(args[0]).glob("*.safetensors"), None)
                if victim is not None:
                    victim.unlink()
            raise Crash(f"killed at call {n}")
        return real(*args, **kwargs)

    wrapper.calls = calls  # type: ignore[attr-defined]
    return wrapper


SCENARIOS = {
    # name: (existing steps, step to write, keep_last, steps allowed afterwards)
    "resave_same_step": ([1], 1, 3, {1}),
    "prune_oldest": ([1, 2, 3], 4, 3, {3, 4}),
    "new_step_latest_write": ([1], 2, 3, {1, 2}),
}
TARGETS = ["os.replace", "shutil.rmtree", "_exchange", "_save_one"]


def _patch(monkeypatch: pytest.MonkeyPatch, target: str, n: int) -> Callable:
    if target == "os.replace":
        w = crash_on_call(n, os.replace)
        monkeypatch.setattr(ckpt_mod.os, "replace", w)
    elif target == "shutil.rmtree":
        w = crash_on_call(n, shutil.rmtree, partial_rmtree=True)
        monkeypatch.setattr(ckpt_mod.shutil, "rmtree", w)
    else:
        w = crash_on_call(n, getattr(ckpt_mod, target))
        monkeypatch.setattr(ckpt_mod, target, w)
    return w


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
@pytest.mark.parametrize("target", TARGETS)
def test_a_kill_at_any_point_leaves_a_complete_checkpoint(tmp_path, cfg, weights, scenario, target):
    existing, step, keep_last, allowed = SCENARIOS[scenario]
    for n in range(1, 30):
        run = tmp_path / f"{target}-{n}"
        make_run(run, cfg, weights, existing, keep_last)
        with pytest.MonkeyPatch.context() as mp:
            w = _patch(mp, target, n)
            try:
                write_checkpoint(run, step, files(weights, step), cfg, keep_last)
                crashed = False
            except Crash:
                crashed = True
        assert_recoverable(run, allowed)
        # the next save clears the debris and the run goes on
        final = write_checkpoint(run, step + 1, files(weights, step + 1), cfg, keep_last)
        assert latest_checkpoint(run) == final
        assert not [p for p in (run / "checkpoints").iterdir() if p.name.endswith((".tmp", ".trash"))]
        if not crashed:
            assert w.calls["n"] < n  # every call point up to the end has been killed once
            break
    else:
        pytest.fail("write_checkpoint never completed")


def test_resave_without_atomic_swap_falls_back_to_previous(tmp_path, cfg, weights, monkeypatch):
    """Where the OS cannot swap folders, a kill between the two renames leaves the previous checkpoint findable."""
    monkeypatch.setattr(ckpt_mod, "_exchange", lambda a, b: False)
    for n in range(1, 10):
        run = tmp_path / f"r{n}"
        make_run(run, cfg, weights, [1, 2])
        with pytest.MonkeyPatch.context() as mp:
            w = _patch(mp, "os.replace", n)
            try:
                write_checkpoint(run, 2, files(weights, 2), cfg, 3)
            except Crash:
                pass
        assert_recoverable(run, {1, 2}, latest_file_valid=False)
        if w.calls["n"] < n:
            break


def test_readers_ignore_debris_and_incomplete_folders(tmp_path, cfg, weights):
    run = tmp_path / "run"
    make_run(run, cfg, weights, [1, 2])
    root = run / "checkpoints"
    shutil.copytree(root / "step_0000002", root / "step_0000003.tmp")  # an unfinished write
    shutil.copytree(root / "step_0000002", root / "step_0000004.abc.trash")  # a delete in progress
    (root / "step_0000002" / "ema_0.99.safetensors").unlink()  # half-deleted by an old-style prune
    (root / "LATEST").write_text("step_0000002\n")
    assert latest_checkpoint(run) == root / "step_0000001"
    assert "ema_0.99.safetensors is missing" in checkpoint_problem(root / "step_0000002")


def test_pruning_never_removes_the_checkpoint_just_written(tmp_path, cfg, weights):
    # an older run's later steps in the folder: the new step_3 sorts first and used to be pruned at once
    run = tmp_path / "run"
    make_run(run, cfg, weights, [8, 9])
    final = write_checkpoint(run, 3, files(weights, 3), cfg, 2)
    assert final.is_dir() and latest_checkpoint(run) == final
    assert (run / "checkpoints" / "LATEST").read_text().strip() == final.name


DISK_FULL = {
    "safetensors": ("save_file", SafetensorError(
        'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')),
    "torch.save": ("torch.save", RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 3904 vs 3796")),
    "oserror": ("torch.save", OSError(errno.ENOSPC, "No space left on device")),
}


@pytest.mark.parametrize("kind", sorted(DISK_FULL))
def test_disk_full_is_one_clear_error_and_keeps_the_previous_checkpoint(tmp_path, cfg, weights, monkeypatch, kind):
    run = tmp_path / "run"
    make_run(run, cfg, weights, [1])
    target, error = DISK_FULL[kind]

    def full(*args: Any, **kwargs: Any) -> None:
        raise error

    if target == "save_file":
        monkeypatch.setattr(ckpt_mod, "save_file", full)
    else:
        monkeypatch.setattr(ckpt_mod.torch, "save", full)
    with pytest.raises(DiskFullError) as info:
        write_checkpoint(run, 2, files(weights, 2), cfg, 3)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("disk full while writing ")
    assert "step_0000002/" in msg and "step_0000001 is intact" in msg and "--resume" in msg
    monkeypatch.undo()
    assert [p.name for p in (run / "checkpoints").iterdir() if p.is_dir()] == ["step_0000001"]
    assert load_model(run).path.name == "step_0000001"


class Payload:
    """A pickle that runs code when loaded (here a harmless call that would leave a marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def test_pickled_state_is_refused_without_quoting_torch_advice(tmp_path):
    torch.save({"step": 1, "x": Payload(tmp_path / "ran")}, tmp_path / "state.pt")
    with pytest.raises(CheckpointError) as info:
        load_state(tmp_path, "state.pt")
    msg = str(info.value)
    assert "is not a safe checkpoint file (it contains pickled code/objects pakhsh will not execute)" in msg
    assert "weights_only" not in msg and "\n" not in msg
    assert not (tmp_path / "ran").exists()


def test_truncated_pt_and_safetensors_name_the_file(tmp_path):
    torch.save({"step": 1, "t": torch.zeros(100)}, tmp_path / "state.pt")
    data = (tmp_path / "state.pt").read_bytes()
    (tmp_path / "state.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"state\.pt is not a readable checkpoint file: truncated or corrupt"):
        load_state(tmp_path, "state.pt")
    save_file({"w": torch.zeros(100)}, str(tmp_path / "w.safetensors"))
    data = (tmp_path / "w.safetensors").read_bytes()
    for cut in (4, 20, len(data) - 10):
        (tmp_path / "w.safetensors").write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=r"w\.safetensors is not a valid safetensors file: truncated or corrupt"):
            read_tensors(tmp_path / "w.safetensors")


def test_full_resume_check_names_the_damaged_file(tmp_path, cfg, weights):
    run = tmp_path / "run"
    make_run(run, cfg, weights, [1])
    folder = latest_checkpoint(run)
    # same size, so the manifest cannot tell: the contents are checked when read
    path = folder / "ema_0.99.safetensors"
    path.write_bytes(b"\xff" * path.stat().st_size)
    with pytest.raises(CheckpointError, match=r"ema_0\.99\.safetensors is not a valid safetensors file"):
        read_resume_state(folder, (0.9, 0.99))


def test_torn_log_line_is_skipped_and_dropped_on_truncate(tmp_path):
    log = RunLog(tmp_path, tensorboard=False)
    for step in (1, 2, 3):
        log.write({"step": step, "loss": 1.0 / step})
    with open(log.path, "a") as f:
        f.write('{"step": 4, "loss": 0.2')  # the process died mid-write
    assert [r["step"] for r in log.records()] == [1, 2, 3]
    log.truncate_after(2)
    assert [json.loads(line)["step"] for line in log.path.read_text().splitlines()] == [1, 2]
