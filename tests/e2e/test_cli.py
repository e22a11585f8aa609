"""The pakhsh command end to end on a tiny run: train, sample, interpolate, vary, nll, info, export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pakhsh.cli import main
from pakhsh.pipelines import ImagePipeline, SampleSettings, shipped_models
from pakhsh.pipelines.base import model_kind
from tests.conftest import tiny_experiment

TINY = tiny_experiment(
    data={"length": 32},
    model={"dropout": 0.0},
    train={"steps": 2, "save_every": 2, "sample_every": 2, "num_preview": 4, "preview_steps": 3, "ema_rates": [0.9]},
)

@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cli")
    cfg = d / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    assert main(["train", str(cfg), "--out", str(d / "run"), "-q"]) == 0
    return d / "run"


def test_train_outputs(run):
    assert (run / "checkpoints" / "LATEST").read_text().strip() == "step_0000002"
    assert (run / "samples" / "step_0000002.png").is_file()
    assert json.loads((run / "config.json").read_text())["model"]["model_channels"] == 16


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++2m"])
def test_sample_writes_grid_and_singles(run, tmp_path, sampler):
    out = tmp_path / "grid.png"
    assert main(["sample", "-m", str(run), "-n", "5", "--steps", "4", "--sampler", sampler, "-o", str(out),
                 "--singles", str(tmp_path / "singles"), "--scale", "1", "-q"]) == 0
    grid = np.asarray(Image.open(out))
    assert grid.shape == (2 * 10 + 2, 3 * 10 + 2, 3)  # 3 columns x 2 rows of 8x8 with 2 px padding
    assert len(list((tmp_path / "singles").glob("*.png"))) == 5


def test_sampling_is_deterministic_under_seed(run):
    pipe = ImagePipeline.from_pretrained(run)
    s = SampleSettings("ddpm", 5)
    a, b = pipe.generate(3, s, seed=4, progress=False), pipe.generate(3, s, seed=4, progress=False)
    c = pipe.generate(3, s, seed=5, progress=False)
    assert (a == b).all() and not (a == c).all()


def test_spacing_reaches_the_sampler(run, tmp_path):
    # sde-dpm++2m walks noise-dense steps unless told otherwise; --spacing uniform gives improved-diffusion's "N"
    pipe = ImagePipeline.from_pretrained(run)
    out = {sp: pipe.generate(2, SampleSettings("sde-dpm++2m", 4, spacing=sp), seed=3, progress=False)
           for sp in ("auto", "noise-dense", "uniform")}
    assert torch.equal(out["auto"], out["noise-dense"]) and not torch.allclose(out["auto"], out["uniform"])
    ddpm = {sp: pipe.generate(2, SampleSettings("ddpm", 4, spacing=sp), seed=3, progress=False)
            for sp in ("auto", "uniform")}
    assert torch.equal(ddpm["auto"], ddpm["uniform"])  # the other samplers keep uniform steps
    for spacing in ("uniform", "noise-dense"):
        assert main(["sample", "-m", str(run), "-n", "2", "--steps", "4", "--sampler", "sde-dpm++2m", "--spacing",
                     spacing, "-o", str(tmp_path / f"{spacing}.png"), "--npz", str(tmp_path / f"{spacing}.npz"),
                     "--seed", "3", "-q"]) == 0
        want = ((out[spacing].permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
        assert np.abs(np.load(tmp_path / f"{spacing}.npz")["arr_0"].astype(int) - want.astype(int)).max() <= 1
    with pytest.raises(SystemExit):
        main(["sample", "-m", str(run), "--spacing", "karras"])


def test_interpolate_vary_nll_info_export(run, tmp_path, capsys):
    assert main(["interpolate", "-m", str(run), "data:0", "data:1", "--lambdas", "0,0.5,1", "--t", "30",
                 "--steps", "5", "-o", str(tmp_path / "i.png"), "--scale", "1", "-q"]) == 0
    assert Image.open(tmp_path / "i.png").size == (5 * 10 + 2, 12)
    assert main(["vary", "-m", str(run), "data:2", "--t", "40", "--count", "3", "--steps", "5",
                 "-o", str(tmp_path / "v.png"), "--scale", "1", "-q"]) == 0
    assert Image.open(tmp_path / "v.png").size == (4 * 10 + 2, 12)
    assert main(["nll", "-m", str(run), "--max-images", "4", "--batch-size", "4", "-q",
                 "--json", str(tmp_path / "nll.json")]) == 0
    rep = json.loads((tmp_path / "nll.json").read_text())
    assert rep["num_images"] == 4 and len(rep["terms_bpd"]) == 50 and rep["bpd"] > 0
    assert main(["info", str(run)]) == 0
    assert "parameters:" in capsys.readouterr().out
    assert main(["export", str(run), str(tmp_path / "exp")]) == 0
    assert sorted(p.name for p in (tmp_path / "exp").iterdir()) == ["config.json", "model.safetensors"]
    # the exported model samples exactly like the EMA weights of the run
    s = SampleSettings("ddim", 3)
    a = ImagePipeline.from_pretrained(run).generate(2, s, progress=False)
    b = ImagePipeline.from_pretrained(tmp_path / "exp").generate(2, s, progress=False)
    assert (a == b).all()


def test_bad_input_errors_are_clear(run, tmp_path, capsys):
    assert main(["sample", "-m", str(tmp_path / "nope"), "-q"]) == 2
    assert "no model at" in capsys.readouterr().err
    assert main(["train", "--set", "train.not_a_key=1"]) == 2
    assert "not_a_key" in capsys.readouterr().err
    assert main(["vary", "-m", str(run), str(tmp_path / "missing.png"), "-q"]) == 2
    assert "missing.png" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["interpolate", "-m", str(run), "a", "b", "--lambdas", "0,2"])


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ["train", "sample", "interpolate", "vary", "nll", "info", "export"]:
        assert cmd in out


@pytest.mark.skipif(not shipped_models(), reason="no shipped model in this checkout")
def test_shipped_models_sample(tmp_path):
    for name in shipped_models():
        if model_kind(name) != "image":  # Palette, latent and autoencoder models have their own shipped tests
            continue
        out = tmp_path / f"{name}.png"
        assert main(["sample", "-m", name, "-n", "4", "--steps", "10", "-o", str(out), "-q"]) == 0
        assert out.is_file()
