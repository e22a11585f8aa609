"""Super-resolution through PalettePipeline and `pakhsh restore` on a tiny upsampler (8 -> 16 px, T = 50) trained
for two steps by the real trainer: the input is the low-resolution image, the condition is the training one,
outputs are at the model's size, the task is inferred from the model, and wrong sizes and tasks are named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pakhsh.cli import main
from pakhsh.data.builtin.shapes import ShapesDataset
from pakhsh.pipelines import SampleSettings
from pakhsh.pipelines.palette import PalettePipeline
from pakhsh.tasks import area_downsample, superres_condition
from tests.conftest import run_cli
from tests.e2e.test_restore_cli import notices_on_stderr  # warnings as the CLI prints them
from tests.pipelines.test_palette_pipeline import palette_run

SIZE, SCALE, LOW = 16, 2, 8
PAD = 2  # save_grid's padding


def superres_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder of a tiny superres model, trained through `pakhsh train` once per session."""
    root = tmp_path_factory.getbasetemp() / "superres_runs"
    run = root / "superres"
    if (run / "checkpoints" / "LATEST").is_file():
        return run
    root.mkdir(parents=True, exist_ok=True)
    cfg = {
        "name": "tiny_superres",
        "data": {"name": "shapes", "image_size": SIZE, "length": 64},
        "model": {"image_size": SIZE, "in_channels": 3, "out_channels": 3, "cond_channels": 4, "model_channels": 16,
                  "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [], "dropout": 0.0,
                  "num_groups": 8, "num_classes": None},
        "diffusion": {"num_steps": 50, "schedule": "cosine", "model_output": "v"},
        "task": {"name": "superres", "scale": SCALE, "blur_sigma": [0.0, 0.6], "cond_noise": [0.0, 0.1],
                 "aug_prob": 0.5},
        "train": {"steps": 2, "batch_size": 8, "log_every": 1, "save_every": 2, "sample_every": 2,
                  "mixed_precision": "no", "device": "cpu", "num_preview": 2, "preview_steps": 2},
    }
    (root / "superres.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(root / "superres.yaml"), "--out", str(run), "-q"]) == 0
    assert (run / "checkpoints" / "LATEST").is_file() and list((run / "samples").glob("*.png"))  # preview too
    return run


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return superres_run(tmp_path_factory)


@pytest.fixture(scope="module")
def pipe(run) -> PalettePipeline:
    return PalettePipeline.from_pretrained(run, device="cpu")


@pytest.fixture(scope="module")
def full() -> torch.Tensor:
    ds = ShapesDataset(split="test", size=SIZE)
    return torch.stack([ds[i]["image"] for i in range(3)])  # (3, 3, 16, 16) in [-1, 1]


@pytest.fixture(autouse=True)
def _one_thread(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # a default output must never land in the repository
    torch.set_num_threads(1)


def fast() -> SampleSettings:
    return SampleSettings("ddim", steps=2)


# ---------------------------------------------------------------------------------------------- the pipeline
def test_the_model_is_an_upsampler(pipe) -> None:
    assert (pipe.trained_task, pipe.default_task, pipe.num_classes) == ("superres", "superres", None)
    assert (pipe.size, pipe.scale, pipe.input_size("superres")) == (SIZE, SCALE, LOW)


def test_prepare_takes_the_low_res_image_and_builds_the_training_condition(pipe, full) -> None:
    low = pipe.low_res(full)
    assert torch.equal(low, area_downsample(full, SCALE)) and low.shape == (3, 3, LOW, LOW)
    cond = pipe.prepare(low, "superres")
    assert set(cond) == {"cond_image", "mask"}  # a single-task model: no label
    want, mask = superres_condition(low, SCALE, (SIZE, SIZE))
    assert torch.equal(cond["cond_image"], want) and torch.equal(cond["mask"], mask)
    blurred = pipe.prepare(low, "superres", blur_sigma=0.5)["cond_image"]
    assert torch.equal(blurred, superres_condition(low, SCALE, blur_sigma=0.5)[0])
    # evaluation's conditions: the model's own augmentation, seeded
    a, b = pipe.degrade(full, "superres", seed=1), pipe.degrade(full, "superres", seed=1)
    assert a["cond_image"].shape == (3, 3, SIZE, SIZE) and torch.equal(a["cond_image"], b["cond_image"])


def test_restore_outputs_the_high_resolution(pipe, full) -> None:
    cond = pipe.prepare(pipe.low_res(full[:2]), "superres")
    out = pipe.restore(cond, fast(), samples=2, seed=0, progress=False)
    assert out.shape == (4, 3, SIZE, SIZE) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and out.abs().max() <= 1
    assert torch.equal(out, pipe.restore(cond, fast(), samples=2, seed=0, batch_size=3, progress=False))
    assert not torch.equal(out[0], out[1])  # two samples of one input


def test_an_input_at_the_wrong_size_is_named(pipe, full) -> None:
    with pytest.raises(ValueError, match=r"a 16x16 \(W x H\) low-res input upsampled 2x is 32x32, not the requested "
                                         r"16x16; give a 8x8 input"):
        pipe.prepare(full, "superres")


def test_tasks_the_upsampler_does_not_do(pipe, tmp_path_factory, full) -> None:
    with pytest.raises(ValueError, match="trained for superres, not colorize \\(--task colorize\\)"):
        pipe.check_task("colorize")
    multi = PalettePipeline.from_pretrained(palette_run(tmp_path_factory, "multi"), device="cpu")
    with pytest.raises(ValueError, match="trained for multi, not superres \\(--task superres\\); give a superres "
                                         "model with -m$"):
        multi.prepare(full, "superres")
    assert multi.default_task is None and multi.scale == 1 and multi.input_size("colorize") == SIZE


# ---------------------------------------------------------------------------------------------- pakhsh restore
def _png(path: Path, image: torch.Tensor) -> Path:
    arr = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _tile(grid: np.ndarray, col: int, scale: int, side: int = SIZE) -> np.ndarray:
    small = grid[::scale, ::scale]
    left = PAD + col * (side + PAD)
    return small[PAD : PAD + side, left : left + side]


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def test_restore_a_low_res_file_task_from_the_model(run, full, tmp_path, capsys) -> None:
    low = area_downsample(full[:1], SCALE)[0]
    src = _png(tmp_path / "low.png", low)
    out = tmp_path / "up.png"
    assert main(["restore", str(src), "-m", str(run), "--steps", "2", "-q", "--scale", "1", "-o", str(out)]) == 0
    assert "wrote the superres input and 1 output(s)" in capsys.readouterr().out
    grid = _read(out)
    assert grid.shape[:2] == (SIZE + 2 * PAD, 2 * (SIZE + PAD) + PAD)  # [input | output] at the model's 16 px
    shown = _tile(grid, 0, 1)
    assert (shown[::SCALE, ::SCALE] == _read(src)).all()  # the low-res pixels, each a 2 x 2 block
    assert (shown[1::SCALE, 1::SCALE] == _read(src)).all()


def test_restore_a_folder_and_a_dataset_image(run, full, tmp_path, capsys) -> None:
    for i in range(2):
        _png(tmp_path / "lows" / f"s{i}.png", area_downsample(full[i : i + 1], SCALE)[0])
    assert main(["restore", str(tmp_path / "lows"), "--task", "superres", "-m", str(run), "--steps", "1", "-q",
                 "-o", str(tmp_path / "ups")]) == 0
    assert _read(tmp_path / "ups" / "s0.png").shape == (SIZE, SIZE, 3)  # each output at the high resolution
    # data:0 is a full-size test image: its downsample is the input
    assert main(["restore", "data:0", "-m", str(run), "--steps", "1", "-q", "--scale", "1", "--blur", "0",
                 "-o", str(tmp_path / "d.png")]) == 0
    shown = _tile(_read(tmp_path / "d.png"), 0, 1)
    want = ((area_downsample(full[:1], SCALE)[0] + 1) * 127.5).round().permute(1, 2, 0).numpy()
    assert np.abs(shown[::SCALE, ::SCALE].astype(float) - want).max() <= 1


def test_a_full_size_file_is_shrunk_with_a_notice(run, full, tmp_path, capsys) -> None:
    src = _png(tmp_path / "big.png", full[0])
    with notices_on_stderr():
        code = main(["restore", str(src), "-m", str(run), "--steps", "1", "-q", "--scale", "1",
                     "-o", str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert code == 0, err
    assert ("big.png is 16x16: resized to 8x8, the low-resolution input of this 2x upsampler (the output is 16x16)"
            in err)


def test_restore_errors(run, tmp_path_factory, tmp_path, capsys) -> None:
    src = _png(tmp_path / "p.png", torch.zeros(3, LOW, LOW))
    code, err = run_cli(["restore", str(src), "--blur", "-1", "-m", str(run)], capsys)
    assert code == 2 and "argument --blur: -1 is out of range; a blur sigma is in [0, 8]" in err
    multi = str(palette_run(tmp_path_factory, "multi"))
    code, err = run_cli(["restore", str(src), "-m", multi, "--steps", "1", "-q"], capsys)
    assert code == 2
    assert f"{multi} is a multi-task model (colorize, inpaint, uncrop, jpeg): choose one with --task" in err
    code, err = run_cli(["restore", str(src), "--task", "superres", "-m", multi, "--steps", "1", "-q"], capsys)
    assert code == 2 and "trained for multi, not superres" in err
    with notices_on_stderr():
        code, err = run_cli(["restore", str(src), "--task", "colorize", "--blur", "1", "-m", str(run), "-q"], capsys)
    assert code == 2 and "--blur is for --task superres; ignored for --task colorize" in err
    assert "trained for superres, not colorize" in err
    assert not list(tmp_path.glob("restored*"))
