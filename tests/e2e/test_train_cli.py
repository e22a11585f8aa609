"""`pakhsh train` as people run it: one writer per folder, no training over a run, signals, and one-line errors
(no traceback) for damaged checkpoints, full disks and unwritable folders."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from pakhsh.cli import main
from pakhsh.training import latest_checkpoint
from tests.conftest import tiny_experiment

TINY = tiny_experiment(data={"length": 32}, model={"dropout": 0.0}, train={"steps": 2, "save_every": 1, "ema_rates": [0.9]})


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(TINY))
    return p


def one_line_error(capsys: pytest.CaptureFixture, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("pakhsh "), lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def printed_checkpoint(out: str) -> Path:
    m = re.search(r"checkpoint: (\S+?);?(\s|$)", out)
    assert m, out
    return Path(m.group(1))


def spawn_train(cfg: Path, run: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="2")
    return subprocess.Popen([sys.executable, "-m", "pakhsh.cli", "train", str(cfg), "--out", str(run), "-q", *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_log(run: Path, proc: subprocess.Popen, lines: int = 1, timeout: float = 120) -> None:
    start = time.time()
    while time.time() - start < timeout:
        log = run / "log.jsonl"
        if log.is_file() and len(log.read_text().splitlines()) >= lines:
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError("training did not start in time")


def test_second_train_into_a_busy_folder_is_refused(cfg, tmp_path, capsys):
    run = tmp_path / "run"
    proc = spawn_train(cfg, run, "--set", "train.steps=1000", "--set", "train.save_every=1000")
    try:
        wait_for_log(run, proc)
        assert main(["train", str(cfg), "--out", str(run), "-q", "--overwrite"]) == 2
        one_line_error(capsys, "is in use by another `pakhsh train`", f"pid {proc.pid} on ")
    finally:
        proc.kill()
        proc.wait()
    # the kernel dropped the lock with the killed process: no stale lock to clean up by hand
    assert main(["train", str(cfg), "--out", str(run), "-q", "--overwrite", "--set", "train.steps=1"]) == 0


def test_sigterm_saves_a_checkpoint_and_exits_143(cfg, tmp_path, capsys):
    run = tmp_path / "run"
    proc = spawn_train(cfg, run, "--set", "train.steps=1000", "--set", "train.save_every=1000")
    wait_for_log(run, proc, lines=2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]  # 128 + SIGTERM, after saving
    ckpt = latest_checkpoint(run)
    step = int(ckpt.name.split("_")[1])
    assert 2 <= step < 1000 and printed_checkpoint(out) == ckpt
    assert "SIGTERM: saving a checkpoint" in out and "--resume" in out
    # after the checkpoint: something to look at, though sample_every=0 and the run stopped between log lines
    assert (run / "loss.png").is_file() and (run / "samples" / f"step_{step:07d}.png").is_file()
    assert main(["train", str(cfg), "--out", str(run), "-q", "--resume", "--set", f"train.steps={step + 1}"]) == 0
    assert latest_checkpoint(run).name == f"step_{step + 1:07d}"
    assert printed_checkpoint(capsys.readouterr().out) == latest_checkpoint(run)


def test_train_into_an_existing_run_is_refused_until_overwrite(cfg, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--out", str(run), "-q", "--set", "train.steps=3"]) == 0
    assert printed_checkpoint(capsys.readouterr().out) == run / "checkpoints" / "step_0000003"
    log = (run / "log.jsonl").read_text()
    assert main(["train", str(cfg), "--out", str(run), "-q"]) == 2
    one_line_error(capsys, f"{run} already holds a run", "--resume", "--overwrite", "new --out folder")
    assert (run / "log.jsonl").read_text() == log
    assert (run / "checkpoints" / "LATEST").read_text().strip() == "step_0000003"
    assert main(["train", str(cfg), "--out", str(run), "-q", "--overwrite"]) == 0
    path = printed_checkpoint(capsys.readouterr().out)
    assert path.is_dir() and path.name == "step_0000002"
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_0000001", "step_0000002"]
    assert len((run / "log.jsonl").read_text().splitlines()) == 2


@pytest.fixture
def damaged(cfg, tmp_path, capsys) -> Path:
    """A checkpoint folder whose model.safetensors was cut short."""
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--out", str(run), "-q", "--set", "train.steps=1"]) == 0
    capsys.readouterr()
    folder = run / "checkpoints" / "step_0000001"
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    return folder


@pytest.mark.parametrize("how", ["step_folder", "exported"])
def test_info_sample_export_on_a_truncated_checkpoint_are_one_line(damaged, tmp_path, capsys, how):
    if how == "exported":  # an inference folder: config.json + model.safetensors, no manifest to compare with
        (damaged / "manifest.json").unlink()
        expect = "is not a valid safetensors file: truncated or corrupt"
    else:
        expect = "model.safetensors is 200 bytes, expected"
    assert main(["info", str(damaged)]) == 2
    one_line_error(capsys, "pakhsh info: error:", expect)
    assert main(["sample", "-m", str(damaged), "-n", "1", "--steps", "2", "-q", "-o", str(tmp_path / "s.png")]) == 2
    one_line_error(capsys, "pakhsh sample: error:", expect)
    assert main(["export", str(damaged), str(tmp_path / "exp")]) == 2
    one_line_error(capsys, "pakhsh export: error:", expect)


def test_info_refuses_a_pickled_state(cfg, tmp_path, capsys):
    run = tmp_path / "run2"
    assert main(["train", str(cfg), "--out", str(run), "-q", "--set", "train.steps=1"]) == 0
    folder = run / "checkpoints" / "step_0000001"
    (folder / "manifest.json").unlink()
    torch.save({"step": 1, "path": Path("/")}, folder / "state.pt")
    assert main(["info", str(folder)]) == 2
    line = one_line_error(capsys, "state.pt is not a safe checkpoint file (it contains pickled code/objects")
    assert "weights_only" not in line


def test_disk_full_during_training_is_one_line_and_keeps_the_last_checkpoint(cfg, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    real_save = torch.save

    def fill_up_at_step_2(obj, f, *a, **k):
        if "step_0000002" in str(f):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 3904 vs 3796")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", fill_up_at_step_2)
    assert main(["train", str(cfg), "--out", str(run), "-q"]) == 2
    line = one_line_error(capsys, "disk full while writing", "step_0000001 is intact", "free space and --resume")
    assert "step_0000002/optimizer.pt" in line
    monkeypatch.undo()
    assert latest_checkpoint(run).name == "step_0000001"
    assert main(["train", str(cfg), "--out", str(run), "-q", "--resume"]) == 0


def test_unwritable_out_folder_is_one_line(cfg, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert main(["train", str(cfg), "--out", str(tmp_path / "file" / "run"), "-q"]) == 2
    one_line_error(capsys, "cannot write to the run folder", "choose a writable --out folder")


def test_config_errors_name_the_key(cfg, tmp_path, capsys):
    out = ["--out", str(tmp_path / "run"), "-q"]
    assert main(["train", str(cfg), *out, "--set", "train.lr=3e38"]) == 2
    one_line_error(capsys, "train.lr=3e+38 is out of range")
    assert main(["train", str(cfg), *out, "--set", "model.num_classes=3"]) == 2
    one_line_error(capsys, "model.num_classes=3 but dataset 'shapes' has 6 classes")


def test_resume_from_the_run_folder_alone(cfg, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--out", str(run), "-q"]) == 0
    capsys.readouterr()
    # no YAML, no --set repeated: the run's own config.json; a resumable train.* key extends the finished run
    assert main(["train", "--out", str(run), "--resume", "-q", "--set", "train.steps=3"]) == 0
    out = capsys.readouterr().out
    assert f"resuming from step 2 (checkpoint {run / 'checkpoints' / 'step_0000002'})" in out
    assert "extending the finished run from step 2 to 3" in out
    assert printed_checkpoint(out) == run / "checkpoints" / "step_0000003"
    assert main(["train", "--out", str(run), "--resume", "-q"]) == 0  # at train.steps already: says so
    out = capsys.readouterr().out
    assert "resuming from step 3" in out and "nothing to train: the run is at step 3 and train.steps=3" in out
    assert "extending" not in out
    assert main(["train", "--out", str(run), "--resume", "-q", "--set", "train.lr=0.01"]) == 2
    one_line_error(capsys, "--resume: the config differs from the checkpoint", "train.lr: 0.001 != 0.01")
    assert main(["train", "--resume", "-q"]) == 2
    one_line_error(capsys, "--resume without a config needs --out RUN")
    assert main(["train", "--out", str(tmp_path / "nothing"), "--resume", "-q"]) == 2
    one_line_error(capsys, "nothing does not exist; give the run's folder as --out, or its YAML config too")


@pytest.mark.parametrize("command", ["configs", "list"])
def test_configs_lists_the_shipped_configs_and_models(command, tmp_path, monkeypatch, capsys):
    from pakhsh.pipelines import shipped_models

    monkeypatch.chdir(tmp_path)
    assert main([command]) == 0
    out = capsys.readouterr().out
    assert "configs (pakhsh train NAME):" in out and "models (pakhsh sample -m NAME; Palette: pakhsh restore; text-to-image: pakhsh generate; autoencoders: pakhsh reconstruct):" in out
    assert re.search(r"^  shapes +The shipped `shapes` model: unconditional 32x32 RGB", out, re.M), out
    assert re.search(r"^  cifar_iddpm +Improved DDPM's CIFAR-10 model on any 32x32 image folder", out, re.M), out
    for name in shipped_models():
        assert re.search(rf"^  {name} +\S", out.split("models (")[1], re.M), out


def test_train_a_shipped_config_by_name_from_anywhere(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    small = ["data.image_size=8", "data.length=8", "model.image_size=8", "model.model_channels=16",
             "model.channel_mult=[1,2]", "model.num_res_blocks=1", "model.attention_resolutions=[4]",
             "model.num_groups=8", "diffusion.num_steps=20", "train.steps=1", "train.batch_size=4",
             "train.device=cpu", "train.num_preview=2", "train.preview_steps=2", "train.mixed_precision=no"]
    assert main(["train", "shapes", "-q", *[a for kv in small for a in ("--set", kv)]]) == 0
    assert printed_checkpoint(capsys.readouterr().out) == Path("runs/shapes/checkpoints/step_0000001")
    assert main(["train", "nosuch", "-q"]) == 2
    one_line_error(capsys, "pakhsh train: error: config nosuch: not found", "shapes, t2i, unclip_")
