"""Palette runs through the one trainer: degrade on the fly, masked loss, task labels, preview, exact resume,
the regression baseline, and config checks that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pakhsh.config import from_dict
from pakhsh.training.checkpoint import read_tensors
from pakhsh.training.experiment import ExperimentConfig
from pakhsh.training.objectives import palette_condition
from pakhsh.training.trainer import Trainer
from tests.conftest import tiny_experiment


def palette_config(out: Path, **extra) -> ExperimentConfig:
    d = tiny_experiment(model={"cond_channels": 4, "num_classes": 4, "dropout": 0.0},
                        train={"steps": 4, "save_every": 2, "out_dir": str(out), "sample_every": 2})
    d["task"] = {"name": "multi"}
    for key, value in extra.items():
        if isinstance(value, dict):
            d[key] = {**d.get(key, {}), **value}
        else:
            d[key] = value
    return from_dict(ExperimentConfig, d)


def test_palette_run_trains_saves_and_previews(tmp_path: Path) -> None:
    res = Trainer(palette_config(tmp_path / "run"), progress=False).fit()
    assert res.step == 4 and res.checkpoint is not None
    grids = sorted((tmp_path / "run" / "samples").glob("*.png"))
    assert [g.name for g in grids] == ["step_0000002.png", "step_0000004.png"]
    import json

    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["task"]["name"] == "multi" and saved["class_names"] == ["colorize", "inpaint", "uncrop", "jpeg"]


def test_palette_resume_is_exact(tmp_path: Path) -> None:
    Trainer(palette_config(tmp_path / "straight"), progress=False).fit()
    Trainer(palette_config(tmp_path / "split", train={"steps": 2}), progress=False).fit()
    Trainer(palette_config(tmp_path / "split"), resume=True, progress=False).fit()
    a = read_tensors(tmp_path / "straight" / "checkpoints" / "step_0000004" / "model.safetensors")
    b = read_tensors(tmp_path / "split" / "checkpoints" / "step_0000004" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_regression_baseline_trains(tmp_path: Path) -> None:
    cfg = palette_config(tmp_path / "reg", objective="regression", train={"sample_every": 0})
    res = Trainer(cfg, progress=False).fit()
    assert res.step == 4 and (tmp_path / "reg" / "samples" / "step_0000004.png").is_file()
    assert res.last_loss == res.last_loss and res.last_loss < 2.0  # finite and an MSE of [-1, 1] images


def test_condition_follows_the_config(tmp_path: Path) -> None:
    cfg = palette_config(tmp_path / "x", task={"name": "inpaint", "mask": "center"}, model={"num_classes": None})
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    cond = palette_condition(cfg, x0, torch.Generator().manual_seed(0))
    assert set(cond) == {"cond_image", "mask"}  # a single-task model takes no label
    known = cond["mask"].expand_as(x0) < 0.5
    assert torch.equal(cond["cond_image"][known], x0[known]) and (cond["mask"] == 1).any()


@pytest.mark.parametrize("change, message", [
    ({"model": {"cond_channels": 3}}, "model.cond_channels=4"),
    ({"model": {"num_classes": None}}, "model.num_classes=4"),
    ({"task": {"name": "colorize"}}, "num_classes=null"),
    ({"task": {"name": "paint"}}, "task.name: 'paint' is not one of"),
])
def test_config_errors_name_the_key(tmp_path: Path, change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        palette_config(tmp_path / "x", **change)


def test_regression_needs_a_task() -> None:
    d = tiny_experiment()
    d["objective"] = "regression"
    with pytest.raises(ValueError, match="objective=regression needs an image-to-image task"):
        from_dict(ExperimentConfig, d)


@pytest.mark.parametrize("loss, variance, learn_sigma", [("hybrid", "learned_range", True), ("l1", "fixed_small", False)])
def test_palette_objectives_train_and_restore(tmp_path: Path, loss: str, variance: str, learn_sigma: bool) -> None:
    """L_hybrid with a learned variance and L1 (the paper's objectives) through training and every-sampler restore."""
    from pakhsh.pipelines import SampleSettings
    from pakhsh.pipelines.palette import PalettePipeline

    cfg = palette_config(tmp_path / loss, model={"learn_sigma": learn_sigma}, train={"sample_every": 0},
                         diffusion={"loss": loss, "variance": variance})
    res = Trainer(cfg, progress=False).fit()
    assert res.step == 4 and res.last_loss == res.last_loss
    pipe = PalettePipeline.from_pretrained(str(tmp_path / loss), device="cpu")
    x0 = torch.rand(2, 3, 8, 8) * 2 - 1
    cond = pipe.prepare(x0, "inpaint", mask_kind="center")
    for sampler in ("ddpm", "ddim", "dpm++2m", "sde-dpm++2m"):
        out = pipe.restore(cond, SampleSettings(sampler, 3), progress=False)
        known = cond["mask"].expand_as(out) < 0.5
        assert torch.equal(out[known], x0[known]), sampler
