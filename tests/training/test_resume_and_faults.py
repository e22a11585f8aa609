"""Exact resume after SIGKILL, atomic checkpoints, Ctrl-C, NaN stops, config mismatches."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pakhsh.nets.unet import UNet, UNetConfig
from pakhsh.training import CheckpointError, Trainer, TrainingError, latest_checkpoint, load_experiment, load_model
from pakhsh.training.checkpoint import load_weights, write_checkpoint

from .conftest import cli, log_records, wait_for_step


def _train(tiny_yaml: Path, out: Path, *extra: str, resume: bool = False) -> None:
    cfg = load_experiment(tiny_yaml, [f"train.out_dir={out}", *extra])
    Trainer(cfg, resume=resume, progress=False).fit()


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    ckpt = latest_checkpoint(run)
    out = load_file(str(ckpt / "model.safetensors"))
    out.update({f"ema/{k}": v for k, v in load_file(str(ckpt / "ema_0.9.safetensors")).items()})
    return out


@pytest.mark.parametrize("kill_at", [4, 7])
def test_sigkill_then_resume_is_exact(tiny_yaml, tmp_path, kill_at):
    ref = tmp_path / "ref"
    _train(tiny_yaml, ref)
    run = tmp_path / "killed"
    proc = cli("train", str(tiny_yaml), "--out", str(run), "-q")
    wait_for_step(run, kill_at, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stopped = latest_checkpoint(run)
    assert stopped is not None and int(stopped.name.split("_")[1]) < 10
    _train(tiny_yaml, run, resume=True)
    ref_losses = [(r["step"], r["loss"]) for r in log_records(ref)]
    assert [(r["step"], r["loss"]) for r in log_records(run)] == ref_losses
    a, b = _final_weights(ref), _final_weights(run)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_ctrl_c_saves_a_checkpoint(tiny_yaml, tmp_path):
    run = tmp_path / "run"
    proc = cli("train", str(tiny_yaml), "--out", str(run), "--set", "train.steps=400", "--set", "train.save_every=1000")
    wait_for_step(run, 2, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]  # 128 + SIGINT, as a shell expects after Ctrl-C
    ckpt = latest_checkpoint(run)
    step = int(ckpt.name.split("_")[1])
    assert 2 <= step < 400
    assert "interrupted" in out + err
    assert load_model(run).model is not None


def test_crash_during_write_keeps_last_checkpoint(tiny_yaml, tmp_path):
    run = tmp_path / "run"
    _train(tiny_yaml, run, "train.steps=3")
    good = latest_checkpoint(run)
    cfg = load_experiment(tiny_yaml)
    # a write that fails half-way (a non-tensor in a safetensors file) must leave LATEST and its folder intact
    with pytest.raises(Exception):
        write_checkpoint(run, 4, {"model.safetensors": {"w": torch.zeros(2)}, "ema_0.9.safetensors": {"bad": "x"}}, cfg, 3)
    assert latest_checkpoint(run) == good
    assert not (run / "checkpoints" / "step_0000004.tmp").exists()  # the failed write cleaned up after itself
    assert load_model(run).path == good
    _train(tiny_yaml, run, "train.steps=5", resume=True)  # and training resumes past it
    assert latest_checkpoint(run).name == "step_0000005"


def test_keep_last_prunes(tiny_yaml, tmp_path):
    run = tmp_path / "run"
    _train(tiny_yaml, run, "train.save_every=1", "train.keep_last=2")
    kept = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert kept == ["step_0000009", "step_0000010"]
    assert (run / "loss.png").is_file()


class NaNData(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict:
        return {"image": torch.full((3, 8, 8), float("nan"))}


def test_nan_loss_stops_naming_step_and_checkpoint(tiny_yaml, tmp_path):
    run = tmp_path / "run"
    _train(tiny_yaml, run, "train.steps=3")
    before = load_file(str(latest_checkpoint(run) / "model.safetensors"))
    cfg = load_experiment(tiny_yaml, [f"train.out_dir={run}"])
    with pytest.raises(TrainingError, match=r"step 4.*step_0000003"):
        Trainer(cfg, resume=True, progress=False, dataset=NaNData()).fit()
    after = load_file(str(latest_checkpoint(run) / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_resume_with_changed_config_names_keys(tiny_yaml, tmp_path):
    run = tmp_path / "run"
    _train(tiny_yaml, run, "train.steps=3")
    cfg = load_experiment(tiny_yaml, [f"train.out_dir={run}", "model.model_channels=32", "train.lr=0.5"])
    with pytest.raises(TrainingError, match=r"model\.model_channels: 16 != 32.*train\.lr"):
        Trainer(cfg, resume=True, progress=False)
    # steps may change: continuing a finished run for longer is allowed
    _train(tiny_yaml, run, "train.steps=4", resume=True)


def test_weights_that_do_not_fit_name_the_keys(tmp_path, tiny_yaml):
    run = tmp_path / "run"
    _train(tiny_yaml, run, "train.steps=1")
    small = UNet(UNetConfig(image_size=8, model_channels=16, channel_mult=(1, 2), num_res_blocks=2,
                            attention_resolutions=(4,), num_groups=8))
    with pytest.raises(CheckpointError, match="missing keys: .*input_blocks|missing keys"):
        load_weights(small, latest_checkpoint(run) / "model.safetensors")
    wide = UNet(UNetConfig(image_size=8, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                           attention_resolutions=(4,), num_groups=8))
    with pytest.raises(CheckpointError, match=r"shape mismatches: .*checkpoint \(16"):
        load_weights(wide, latest_checkpoint(run) / "model.safetensors")


def test_checkpoint_files_need_no_pickle(tiny_yaml, tmp_path):
    run = tmp_path / "run"
    _train(tiny_yaml, run, "train.steps=1")
    ckpt = latest_checkpoint(run)
    for name in ("optimizer.pt", "state.pt"):
        torch.load(ckpt / name, weights_only=True)  # raises if anything but tensors/containers were pickled
