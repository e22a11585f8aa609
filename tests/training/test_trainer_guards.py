"""What the trainer refuses or survives: devices, locks, runs already in the folder, damaged checkpoints on resume,
divergence, class counts, EMA devices. In-process and a few steps each."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import pakhsh.training.lock as lock_mod
from pakhsh.training import EMA, Trainer, TrainingError, latest_checkpoint, load_experiment
from pakhsh.training.lock import RunFolderError, RunLock, RunLockedError

from .conftest import log_records


def _cfg(tiny_yaml: Path, out: Path, *extra: str):
    return load_experiment(tiny_yaml, [f"train.out_dir={out}", *extra])


def _train(tiny_yaml: Path, out: Path, *extra: str, resume: bool = False, **kw):
    return Trainer(_cfg(tiny_yaml, out, *extra), resume=resume, progress=False, **kw).fit()


# ---------------------------------------------------------------------------------------------- 1: EMA devices
def test_ema_follows_the_model_to_another_device():
    # accelerate moves the model (CPU -> GPU) after the EMA was built; meta stands in for the GPU here
    model = nn.Linear(3, 2)
    ema = EMA(model, [0.9])
    model.to("meta")
    ema.update(model, step=0)
    assert ema.shadows[0.9]["weight"].device.type == "meta"
    ema = EMA(nn.Linear(3, 2), [0.9])
    ema.load_state_dict(0.9, {k: torch.ones_like(v) for k, v in ema.shadows[0.9].items()})
    back = nn.Linear(3, 2).to(torch.float64)
    ema.copy_to(back, 0.9)  # dtype (and device) of the target parameters
    assert back.weight.dtype == torch.float64 and bool((back.weight == 1).all())


def test_trainer_keeps_ema_on_the_training_device(tiny_yaml, tmp_path):
    t = Trainer(_cfg(tiny_yaml, tmp_path / "run", "train.steps=1"), progress=False)
    assert {v.device for s in t.ema.shadows.values() for v in s.values()} == {t.acc.device}
    t.lock.release()


# ---------------------------------------------------------------------------------------------- 2: devices
@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "tpu", "cuda1"])
def test_device_strings_are_validated(tiny_yaml, tmp_path, bad):
    with pytest.raises(ValueError, match=r"train\.device=.* use auto, cpu, cuda or cuda:N"):
        _cfg(tiny_yaml, tmp_path, f"train.device={bad}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu_is_an_error_not_cpu_training(tiny_yaml, tmp_path, device):
    with pytest.raises(ValueError, match=rf"train\.device={device}: no CUDA GPU is visible"):
        Trainer(_cfg(tiny_yaml, tmp_path / "run", f"train.device={device}"), progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_index_out_of_range(tiny_yaml, tmp_path):
    with pytest.raises(ValueError, match=r"train\.device=cuda:99: there are \d+ CUDA device"):
        Trainer(_cfg(tiny_yaml, tmp_path / "run", "train.device=cuda:99"), progress=False)


# ---------------------------------------------------------------------------------------------- 3: the lock
def test_second_lock_on_a_run_folder_names_the_holder(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunLockedError, match=rf"in use by another `pakhsh train` \(pid {os.getpid()} on "):
            RunLock(tmp_path).acquire()
    RunLock(tmp_path).acquire()  # released: free again


def test_trainer_refuses_a_locked_folder_and_unlocks_after_fit(tiny_yaml, tmp_path):
    run = tmp_path / "run"
    holder = RunLock(run)
    holder.acquire()
    with pytest.raises(RunLockedError):
        Trainer(_cfg(tiny_yaml, run, "train.steps=1"), progress=False)
    assert not (run / "config.json").exists()
    holder.release()
    _train(tiny_yaml, run, "train.steps=1")
    RunLock(run).acquire()  # fit() let go of it


# ---------------------------------------------------------------------------------------------- 12: writability
def test_unwritable_out_dir_fails_before_any_work(tiny_yaml, tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(RunFolderError, match=r"cannot write to the run folder .*a_file/run .*choose a writable --out"):
        Trainer(_cfg(tiny_yaml, tmp_path / "a_file" / "run"), progress=False)


def test_read_only_out_dir_fails_before_any_work(tiny_yaml, tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    if os.geteuid() != 0:  # root writes into read-only folders: fake the refusal there
        run.chmod(0o555)
    else:
        def refuse(*a, **k):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(lock_mod.tempfile, "mkstemp", refuse)
        (run / "train.lock").write_text("")  # an old lock file opens read-write even in a read-only folder
    try:
        with pytest.raises(RunFolderError, match=rf"cannot write to the run folder {run} \(permission denied\)"):
            Trainer(_cfg(tiny_yaml, run), progress=False)
    finally:
        run.chmod(0o755)


# ---------------------------------------------------------------------------------------------- 4: existing runs
def test_a_run_in_the_folder_is_not_trained_over(tiny_yaml, tmp_path):
    run = tmp_path / "run"
    _train(tiny_yaml, run, "train.steps=2", "train.save_every=1")
    log_before = (run / "log.jsonl").read_text()
    with pytest.raises(TrainingError, match=r"already holds a run \(checkpoints/, log.jsonl\).*--resume.*--overwrite"):
        Trainer(_cfg(tiny_yaml, run, "train.steps=2"), progress=False)
    assert (run / "log.jsonl").read_text() == log_before
    with pytest.raises(ValueError, match="--resume .* --overwrite"):
        Trainer(_cfg(tiny_yaml, run), resume=True, overwrite=True, progress=False)
    res = _train(tiny_yaml, run, "train.steps=1", overwrite=True)
    assert res.checkpoint.is_dir() and res.checkpoint.name == "step_0000001"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["LATEST", "step_0000001"]
    assert [r["step"] for r in log_records(run)] == [1]


# ---------------------------------------------------------------------------------------------- 7: damaged checkpoints
@pytest.fixture(scope="module")
def three_steps(tmp_path_factory) -> Path:
    """A run saved at steps 1, 2, 3 (shared, copied per test)."""
    import yaml

    from tests.conftest import tiny_experiment

    d = tmp_path_factory.mktemp("three")
    (d / "tiny.yaml").write_text(yaml.safe_dump(tiny_experiment()))
    _train(d / "tiny.yaml", d / "run", "train.steps=3", "train.save_every=1")
    return d / "run"


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def _garble_same_size(path: Path) -> None:
    path.write_bytes(b"\x00" * path.stat().st_size)  # the manifest's sizes still match


def _pickle_in(path: Path) -> None:
    torch.save({"state": {}, "param_groups": [], "x": Path("/")}, path)  # a pickled object, not a plain state
    (path.parent / "manifest.json").unlink()  # legacy folder: only reading the file can tell


def _foreign_legacy(path: Path) -> None:
    save_file({"other.weight": torch.zeros(3)}, str(path))  # a valid file for another network
    (path.parent / "manifest.json").unlink()  # as written before manifests: only the contents can tell


def _missing(path: Path) -> None:
    path.unlink()


DAMAGE = {
    "truncated_model": ("model.safetensors", _truncate),
    "garbled_ema": ("ema_0.99.safetensors", _garble_same_size),
    "foreign_model": ("model.safetensors", _foreign_legacy),
    "pickled_optimizer": ("optimizer.pt", _pickle_in),
    "garbled_state": ("state.pt", _garble_same_size),
    "missing_state": ("state.pt", _missing),
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_resume_skips_a_damaged_newest_checkpoint(three_steps, tiny_yaml, tmp_path, capfd, kind):
    run = tmp_path / "run"
    shutil.copytree(three_steps, run)
    # cloned: safetensors maps the file, and the damage below rewrites it in place
    reference = {k: v.clone() for k, v in load_file(str(run / "checkpoints" / "step_0000003" / "model.safetensors")).items()}
    name, damage = DAMAGE[kind]
    damage(run / "checkpoints" / "step_0000003" / name)
    with open(run / "log.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 0.5')  # and the log's last line was torn by the crash
    res = _train(tiny_yaml, run, "train.steps=3", "train.save_every=1", resume=True)
    err = capfd.readouterr().err
    assert "checkpoint step_0000003 is damaged: " in err and name in err
    assert "resuming from" in err and "step_0000002 (step 2), the newest good checkpoint" in err
    assert (run / "checkpoints" / "step_0000003.damaged").is_dir()  # kept for inspection, out of the way
    # step 3 retrained from step 2 is exactly the step 3 that was lost
    assert res.checkpoint == run / "checkpoints" / "step_0000003"
    again = load_file(str(res.checkpoint / "model.safetensors"))
    assert all(torch.equal(reference[k], again[k]) for k in reference)
    assert [r["step"] for r in log_records(run)] == [1, 2, 3]


def test_resume_with_no_good_checkpoint_says_why(three_steps, tiny_yaml, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(three_steps, run)
    for folder in (run / "checkpoints").glob("step_*"):
        _truncate(folder / "model.safetensors")
    with pytest.raises(TrainingError, match=r"--resume: no usable checkpoint under .*model\.safetensors is \d+ bytes"):
        Trainer(_cfg(tiny_yaml, run), resume=True, progress=False)
    RunLock(run).acquire()  # the failed start let go of the folder


# ---------------------------------------------------------------------------------------------- 10: divergence
def test_lr_is_validated(tiny_yaml, tmp_path):
    for lr in ("3e38", "0", "-1e-4", "2"):
        with pytest.raises(ValueError, match=r"train\.lr=.* is out of range"):
            _cfg(tiny_yaml, tmp_path, f"train.lr={lr}")


def test_blown_up_weights_are_never_saved(three_steps, tiny_yaml, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(three_steps, run)
    t = Trainer(_cfg(tiny_yaml, run, "train.steps=6", "train.save_every=1"), resume=True, progress=False)
    t.cfg.train.lr = 1e20  # past the config check: what a diverging run does to the weights
    with pytest.raises(TrainingError, match=r"weights at step 4 blew up \(max \|w\| = .* not saving them\. "
                                            r"Last checkpoint with sane weights: .*step_0000003"):
        t.fit()
    assert latest_checkpoint(run).name == "step_0000003"
    for folder in (run / "checkpoints").glob("step_*"):
        w = load_file(str(folder / "model.safetensors"))
        assert max(float(v.abs().max()) for v in w.values()) < 1e6


def test_non_finite_gradient_stops_before_the_update(tiny_yaml, tmp_path):
    run = tmp_path / "run"
    t = Trainer(_cfg(tiny_yaml, run, "train.steps=3", "train.save_every=1", "train.grad_clip=0"), progress=False)
    p = next(t.net.parameters())
    before = p.detach().clone()
    p.register_hook(lambda g: g * float("inf"))  # a finite loss whose gradient overflows
    with pytest.raises(TrainingError, match=r"gradient norm became (inf|nan) at step 1; stopping before the update"):
        t.fit()
    assert torch.equal(p.detach(), before)


# ---------------------------------------------------------------------------------------------- 12: classes
def test_num_classes_must_match_the_dataset(tiny_yaml, tmp_path):
    with pytest.raises(ValueError, match=r"model\.num_classes=3 but dataset 'shapes' has 6 classes; set model\.num_classes=6"):
        Trainer(_cfg(tiny_yaml, tmp_path / "run", "model.num_classes=3"), progress=False)


class Labelled(torch.utils.data.Dataset):
    num_classes = 4

    def __init__(self, labels: list[int] | None) -> None:
        self.labels = labels
        if labels is None:
            self.num_classes = None

    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> dict:
        item = {"image": torch.zeros(3, 8, 8)}
        if self.labels is not None:
            item["label"] = self.labels[i % len(self.labels)]
        return item


def test_labels_must_fit_num_classes(tiny_yaml, tmp_path):
    cfg = _cfg(tiny_yaml, tmp_path / "a", "model.num_classes=4")
    with pytest.raises(ValueError, match=r"dataset 'shapes' has label 4, outside 0\.\.3 for model\.num_classes=4"):
        Trainer(cfg, progress=False, dataset=Labelled([0, 1, 2, 4])).fit()
    with pytest.raises(ValueError, match=r"model\.num_classes=4 but dataset 'shapes' has no labels"):
        Trainer(_cfg(tiny_yaml, tmp_path / "b", "model.num_classes=4"), progress=False, dataset=Labelled(None))


# ---------------------------------------------------------------------------------------------- 5: signals
def test_fit_restores_the_signal_handlers(tiny_yaml, tmp_path):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    _train(tiny_yaml, tmp_path / "run", "train.steps=1")
    assert {s: signal.getsignal(s) for s in before} == before


def test_checkpoint_manifest_lists_every_file(tiny_yaml, tmp_path):
    # checkpoints list every file they hold, with its size
    _train(tiny_yaml, tmp_path / "run", "train.steps=1")
    folder = latest_checkpoint(tmp_path / "run")
    sizes = json.loads((folder / "manifest.json").read_text())
    assert sorted(sizes) == sorted(p.name for p in folder.iterdir() if p.name != "manifest.json")


def test_two_trainers_with_different_precisions_in_one_process(tmp_path):
    """A notebook trains twice: accelerate's per-process state must not refuse the second precision."""
    from pakhsh.config import from_dict
    from pakhsh.training import ExperimentConfig, Trainer
    from tests.conftest import tiny_experiment

    for i, precision in enumerate(("no", "bf16")):
        cfg = from_dict(ExperimentConfig, tiny_experiment(train={"steps": 1, "mixed_precision": precision,
                                                                  "out_dir": str(tmp_path / f"r{i}")}))
        assert Trainer(cfg, progress=False).fit().step == 1
