"""`pakhsh unclip` on the tiny runs of tests/unclip_fixtures.py as a user meets it: captions, --variations (a test
scene or an image file) and --interpolate write grids of the right size holding what the pipeline makes; bad
inputs are one line on stderr and exit code 2 (no traceback), before any model loads where they can be."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from pakhsh.cli import main
from pakhsh.data import DataConfig, build_dataset
from pakhsh.pipelines.palette import read_input
from pakhsh.pipelines.unclip import UnclipPipeline, UnclipSettings
from pakhsh.training.ema import rate_name
from pakhsh.training.unclip import CLIP_FILE
from tests.conftest import run_cli
from tests.e2e.test_latent_cli import grid, grid_shape, tile, to_uint8  # the same 16 px grids
from tests.unclip_fixtures import (  # noqa: F401 (fixtures: pytest finds them by name here)
    SIZE,
    _caption_cache,
    _one_thread,
    clip_b_run,
    clip_run,
    decoder_run,
    last_checkpoint,
    prior_b_run,
    prior_run,
)

EMA_FILE = f"{rate_name(0.999)}.safetensors"
STEPS = ["--prior-steps", "2", "--decoder-steps", "2"]
# the CLI's settings with the steps above (its defaults otherwise: guidance 2 / 3, 2 candidates, DDIM)
SETTINGS = UnclipSettings(prior_steps=2, decoder_steps=2)


def jittered_copy(run: Path, folder: Path, std: float, seed: int) -> Path:
    """A copy of the run's last checkpoint with seeded noise on its (EMA) weights, so that every condition visibly
    changes the images of a 4-step run (see tests/unclip_fixtures.jitter)."""
    shutil.copytree(last_checkpoint(run), folder)
    ema = load_file(str(folder / EMA_FILE))
    g = torch.Generator().manual_seed(seed)
    ema = {k: v + torch.randn(v.shape, generator=g) * std if v.is_floating_point() else v
           for k, v in sorted(ema.items())}
    save_file(ema, str(folder / EMA_FILE))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest[EMA_FILE] = (folder / EMA_FILE).stat().st_size
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.fixture(scope="module")
def parts(prior_run: Path, decoder_run: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("unclip_parts")
    return (jittered_copy(prior_run, base / "prior" / "step_0000004", 0.3, 1),
            jittered_copy(decoder_run, base / "decoder" / "step_0000004", 0.1, 0))


@pytest.fixture(scope="module")
def pipe(parts: tuple[Path, Path]) -> UnclipPipeline:
    return UnclipPipeline.from_pretrained(parts[0], parts[1], None, device="cpu")


@pytest.fixture(scope="module")
def scenes() -> list[torch.Tensor]:
    ds = build_dataset(DataConfig(name="shapes", split="test", image_size=SIZE, length=2))
    return [ds[0]["image"][None], ds[1]["image"][None]]


def cli(*args: str) -> int:
    return main(["--threads", "1", *args])


def same(a: np.ndarray, b: np.ndarray, tol: int = 1) -> bool:
    return int(np.abs(a - b).max()) <= tol


# ------------------------------------------------------------------------------------------------ captions
def test_captions_write_a_row_of_images_each(parts, pipe: UnclipPipeline, tmp_path: Path, capsys) -> None:
    out = tmp_path / "g.png"
    captions = ["a large red circle at the top left", "a small blue square at the bottom right"]
    assert cli("unclip", *captions, "--prior", str(parts[0]), "--decoder", str(parts[1]), "--upsampler", "none",
               *STEPS, "-n", "2", "--seed", "3", "--scale", "1", "-q", "-o", str(out)) == 0
    assert "wrote 4 image(s) (2 caption(s) x 2, 16x16)" in capsys.readouterr().out
    g = grid(out)
    assert g.shape == grid_shape(2, 2)  # a row per caption, -n images per row
    x = pipe.generate([captions[0]] * 2 + [captions[1]] * 2, SETTINGS, seed=3, progress=False)
    for i, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        assert same(tile(g, r, c), to_uint8(x[i])), i
    assert not same(tile(g, 0, 0), tile(g, 0, 1), 5)  # each image its own noise
    assert not same(tile(g, 0, 0), tile(g, 1, 0), 5)  # each row its own caption


def test_default_scale_doubles_the_grid(parts, tmp_path: Path) -> None:
    out = tmp_path / "g.png"
    assert cli("unclip", "a red circle", "--prior", str(parts[0]), "--decoder", str(parts[1]), "--upsampler",
               "none", *STEPS, "-n", "1", "-q", "-o", str(out)) == 0
    assert grid(out).shape == grid_shape(1, 1, scale=2)


# ------------------------------------------------------------------------------------------------ images in
def test_variations_of_a_test_scene(parts, pipe: UnclipPipeline, scenes, tmp_path: Path, capsys) -> None:
    out = tmp_path / "v.png"
    assert cli("unclip", "--variations", "data:0", "--decoder", str(parts[1]), "--upsampler", "none", *STEPS,
               "-n", "3", "--scale", "1", "-q", "-o", str(out)) == 0
    assert "wrote [image | 3 variations]" in capsys.readouterr().out
    g = grid(out)
    assert g.shape == grid_shape(1, 4)
    assert same(tile(g, 0, 0), to_uint8(scenes[0][0]))  # the image itself first
    x = pipe.variations(scenes[0], 3, SETTINGS, seed=0)
    for i in range(3):
        assert same(tile(g, 0, i + 1), to_uint8(x[i])), i
    assert not same(tile(g, 0, 1), tile(g, 0, 2), 5)


def test_variations_of_an_image_file(parts, pipe: UnclipPipeline, scenes, tmp_path: Path, capsys) -> None:
    png = tmp_path / "scene.png"
    Image.fromarray(to_uint8(scenes[1][0]).astype(np.uint8)).resize((32, 32), Image.NEAREST).save(png)
    out = tmp_path / "v.png"
    with pytest.warns(UserWarning, match="scene.png is 32x32: resized to 16x16"):  # the CLIP's size
        code, err = run_cli(["--threads", "1", "unclip", "--variations", str(png), "--decoder", str(parts[1]),
                             "--upsampler", "none", *STEPS, "-n", "2", "--scale", "1", "-q", "-o", str(out)], capsys)
    assert code == 0, err
    g = grid(out)
    assert g.shape == grid_shape(1, 3)
    with pytest.warns(UserWarning, match="resized"):
        image = read_input(png, SIZE)
    assert same(tile(g, 0, 0), to_uint8(image[0]))
    x = pipe.variations(image, 2, SETTINGS, seed=0)
    for i in range(2):
        assert same(tile(g, 0, i + 1), to_uint8(x[i])), i


def test_interpolate_two_scenes(parts, pipe: UnclipPipeline, scenes, tmp_path: Path, capsys) -> None:
    out = tmp_path / "i.png"
    assert cli("unclip", "--interpolate", "data:0", "data:1", "--decoder", str(parts[1]), "--upsampler", "none",
               *STEPS, "-n", "3", "--seed", "1", "--scale", "1", "-q", "-o", str(out)) == 0
    assert "wrote [A | 3 interpolations | B]" in capsys.readouterr().out
    g = grid(out)
    assert g.shape == grid_shape(1, 5)
    assert same(tile(g, 0, 0), to_uint8(scenes[0][0])) and same(tile(g, 0, 4), to_uint8(scenes[1][0]))
    x = pipe.interpolate(scenes[0], scenes[1], 3, SETTINGS, seed=1)
    for i in range(3):
        assert same(tile(g, 0, i + 1), to_uint8(x[i])), i
    assert not same(tile(g, 0, 1), tile(g, 0, 3), 5)  # the ends differ


# ------------------------------------------------------------------------------------------------ bad inputs
def err_line(capsys, *args: str, needles: tuple[str, ...] = ()) -> str:
    """Run `pakhsh unclip ARGS`: exit 2 and one line on stderr (no traceback) holding every needle."""
    code, err = run_cli(["--threads", "1", "unclip", *args], capsys)
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("pakhsh unclip: error: "), lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def test_bad_inputs_fail_before_loading_a_model(tmp_path: Path, capsys, monkeypatch) -> None:
    """Checked when parsed: the pipeline is never built (it would fail the test if it were)."""
    def never(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(UnclipPipeline, "from_pretrained", never)
    folder = tmp_path / "folder.png"
    folder.mkdir()
    dec = str(tmp_path)  # exists: the checks below are about the other arguments
    out = ["-o", str(tmp_path / "o.png"), "--upsampler", "none"]
    err_line(capsys, "", "--decoder", dec, "--prior", dec, *out, needles=("caption 1 is empty",))
    err_line(capsys, "a red circle", "  ", "--decoder", dec, "--prior", dec, *out, needles=("caption 2 is empty",))
    err_line(capsys, "a red circle", "--variations", "data:0", "--decoder", dec, *out,
             needles=("exactly one of them",))
    err_line(capsys, "--variations", "data:0", "--interpolate", "data:0", "data:1", "--decoder", dec, *out,
             needles=("exactly one of them",))
    err_line(capsys, "--decoder", dec, *out, needles=("exactly one of them",))
    err_line(capsys, "--variations", str(folder), "--decoder", dec, *out, needles=("is a folder", str(folder)))
    err_line(capsys, "--variations", str(tmp_path / "none.png"), "--decoder", dec, *out,
             needles=("not found", "none.png"))
    err_line(capsys, "--variations", "data:x", "--decoder", dec, *out, needles=("data:x", "whole number"))
    err_line(capsys, "--interpolate", "data:0", "data:1", "-n", "1", "--decoder", dec, *out,
             needles=("--num 1", "at least 2"))
    err_line(capsys, "--variations", "data:0", "--decoder", str(tmp_path / "nope"), *out,
             needles=("--decoder", "nope", "no such folder"))
    err_line(capsys, "a red circle", "--prior", str(tmp_path / "nope"), "--decoder", dec, *out,
             needles=("--prior", "nope", "no such folder"))
    err_line(capsys, "--variations", "data:0", "--decoder", dec, "--upsampler", str(tmp_path / "nope"),
             "-o", str(tmp_path / "o.png"), needles=("--upsampler", "nope"))
    err_line(capsys, "--variations", "data:0", "--decoder", dec, "--upsampler", "none", "-o",
             str(tmp_path / "o.xyz"), needles=("--out", "unknown image type"))
    assert not (tmp_path / "o.png").exists()


def test_variations_and_interpolations_need_no_prior(parts, tmp_path: Path) -> None:
    """The default --prior (the shipped name) is not looked at without captions."""
    out = tmp_path / "v.png"
    assert cli("unclip", "--variations", "data:0", "--prior", str(tmp_path / "nope"), "--decoder", str(parts[1]),
               "--upsampler", "none", *STEPS, "-n", "1", "-q", "-o", str(out)) == 0
    assert out.is_file()


def test_a_file_that_is_not_an_image_fails_before_loading_a_model(tmp_path: Path, capsys, monkeypatch) -> None:
    def never(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(UnclipPipeline, "from_pretrained", never)
    fake = tmp_path / "notes.png"
    fake.write_text("not an image, just text renamed .png\n")
    common = ["--decoder", str(tmp_path), "--upsampler", "none", "-o", str(tmp_path / "o.png")]
    err_line(capsys, "--variations", str(fake), *common, needles=("notes.png", "not a readable image"))
    err_line(capsys, "--interpolate", "data:0", str(fake), *common, needles=("notes.png", "not a readable image"))
    truncated = tmp_path / "cut.png"
    Image.new("RGB", (16, 16), (200, 10, 10)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:40])
    err_line(capsys, "--variations", str(truncated), *common, needles=("cut.png", "not a readable image"))
    assert not (tmp_path / "o.png").exists()


def test_mismatched_prior_and_decoder(prior_b_run: Path, decoder_run: Path, tmp_path: Path, capsys) -> None:
    err_line(capsys, "a red circle", "--prior", str(prior_b_run), "--decoder", str(decoder_run), "--upsampler",
             "none", *STEPS, "-o", str(tmp_path / "o.png"),
             needles=("different CLIPs", str(prior_b_run), str(decoder_run)))


def test_a_damaged_clip_file(decoder_run: Path, clip_b_run: Path, tmp_path: Path, capsys) -> None:
    common = ["--variations", "data:0", "--upsampler", "none", *STEPS, "-o", str(tmp_path / "o.png")]
    damaged = tmp_path / "damaged" / "step_0000004"
    shutil.copytree(last_checkpoint(decoder_run), damaged)
    (damaged / CLIP_FILE).write_bytes(b"\0" * 100)
    err_line(capsys, *common, "--decoder", str(damaged), needles=(CLIP_FILE,))
    # another CLIP's weights in its place (the same size: the manifest cannot tell)
    swapped = tmp_path / "swapped" / "step_0000004"
    shutil.copytree(last_checkpoint(decoder_run), swapped)
    other = load_file(str(last_checkpoint(clip_b_run, 2) / EMA_FILE))
    save_file(other, str(swapped / CLIP_FILE))
    err_line(capsys, *common, "--decoder", str(swapped), needles=(CLIP_FILE, "fingerprint"))
    assert not (tmp_path / "o.png").exists()
