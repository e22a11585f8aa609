"""`pakhsh restore`: every task on a file and on a folder, panoramas, notices, and bad input (exit code 2, one line
naming the problem, nothing written). Uses the tiny Palette models of tests/pipelines/test_palette_pipeline.py
(16 px, T = 50, trained for two steps), each trained once per session."""

from __future__ import annotations

import contextlib
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pakhsh.cli import main
from pakhsh.data.builtin.shapes import ShapesDataset
from pakhsh.pipelines.palette import PalettePipeline
from tests.pipelines.test_palette_pipeline import palette_run
from tests.conftest import run_cli as run

SIZE = 16
PAD = 2  # make_grid's padding around and between tiles


@pytest.fixture(scope="module")
def multi(tmp_path_factory) -> Path:
    return palette_run(tmp_path_factory, "multi")


@pytest.fixture(scope="module")
def colorize_run(tmp_path_factory) -> Path:
    return palette_run(tmp_path_factory, "colorize")


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # a default output (restored.png, restored/) must never land in the repository
    torch.set_num_threads(1)  # tiny convolutions (conftest sets 2; the CLI sets OMP_NUM_THREADS' count)


@pytest.fixture
def no_model_load(monkeypatch):
    """Checks that must come before any work: loading a model fails the test."""

    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was noticed")

    monkeypatch.setattr(PalettePipeline, "from_pretrained", classmethod(fail))


SHAPES = ShapesDataset(split="test", size=SIZE)


def shape_png(path: Path, index: int = 0) -> Path:
    """A test-split shapes image (RGB, 16 x 16) as a PNG."""
    arr = ((SHAPES[index]["image"].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def noise_png(path: Path, size: tuple[int, int], seed: int = 0) -> Path:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def mask_png(path: Path, size: tuple[int, int], box: tuple[int, int, int, int], grey: int | None = None) -> Path:
    """White box (left, top, right, bottom) on black; `grey` adds a soft (non-binary) edge."""
    arr = np.zeros((size[1], size[0]), dtype=np.uint8)
    left, top, right, bottom = box
    arr[top:bottom, left:right] = 255
    if grey is not None:
        arr[top:bottom, right : right + 1] = grey
    Image.fromarray(arr, mode="L").save(path)
    return path


def grid_size(rows: int, cols: int, scale: int, tile_w: int = SIZE) -> tuple[int, int]:
    """(W, H) of a save_grid image of rows x cols tiles."""
    return ((cols * (tile_w + PAD) + PAD) * scale, (rows * (SIZE + PAD) + PAD) * scale)


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.format == "PNG"
        img.verify()
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def tile(grid: np.ndarray, row: int, col: int, scale: int) -> np.ndarray:
    """One (SIZE, SIZE, 3) tile of a grid written at `scale` (nearest upscaling: every scale-th pixel)."""
    small = grid[::scale, ::scale]
    top, left = PAD + row * (SIZE + PAD), PAD + col * (SIZE + PAD)
    return small[top : top + SIZE, left : left + SIZE]


def error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if "notice:" not in ln]
    assert len(lines) == 1, err
    assert lines[0].startswith("pakhsh restore: error: ") or lines[0].startswith("pakhsh: error: "), err
    return lines[0]


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


@contextlib.contextmanager
def notices_on_stderr():
    """Let warnings reach stderr as the CLI formats them (`pakhsh restore: notice: ...`); pytest records them."""

    def show(message, category, filename, lineno, file=None, line=None):
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        yield


# ---------------------------------------------------------------------------------------------- a file
@pytest.mark.parametrize("task, extra, samples", [
    ("colorize", [], 1),
    ("inpaint", [], 2),
    ("inpaint", ["--mask", "boxes"], 1),
    ("uncrop", ["--side", "left", "--fraction", "0.5"], 1),
    ("jpeg", ["--quality", "5"], 1),
    ("jpeg", [], 1),
])  # fmt: skip
def test_each_task_on_a_file_writes_a_row(multi, tmp_path, capsys, task, extra, samples) -> None:
    src = shape_png(tmp_path / "in.png", 2)
    out = tmp_path / "res" / "row.png"
    code = main(["restore", str(src), "--task", task, "-m", str(multi), "--steps", "2", "-q", "--scale", "2",
                 "--samples", str(samples), "-o", str(out), *extra])
    assert code == 0
    assert f"to {out}" in capsys.readouterr().out
    grid = read_png(out)
    assert (grid.shape[1], grid.shape[0]) == grid_size(1, samples + 1, 2)  # [degraded input | K outputs]
    original = np.asarray(Image.open(src).convert("RGB"))
    shown, outputs = tile(grid, 0, 0, 2), [tile(grid, 0, 1 + k, 2) for k in range(samples)]
    if task == "colorize":
        assert (shown[..., 0] == shown[..., 1]).all() and (shown[..., 1] == shown[..., 2]).all()  # grey input
    if task == "inpaint" and not extra:  # the centre half is generated, the rest is the user's pixels exactly
        keep = np.ones((SIZE, SIZE), dtype=bool)
        keep[4:12, 4:12] = False
        for o in outputs:
            assert (o[keep] == original[keep]).all() and not (o[~keep] == original[~keep]).all()
        assert not (outputs[0] == outputs[1]).all()  # two different samples
    if task == "uncrop":  # the left half is generated; the image is squeezed into the right half
        assert (outputs[0][:, 8:] == shown[:, 8:]).all()
    if task == "jpeg":
        compressed_first = bool(extra)  # with --quality the input is compressed before restoring
        assert (shown == original).all() != compressed_first


def test_inpaint_with_a_mask_file(multi, tmp_path, capsys) -> None:
    src = noise_png(tmp_path / "photo.png", (SIZE, SIZE))
    mask = mask_png(tmp_path / "mask.png", (SIZE, SIZE), (2, 3, 9, 14))
    out = tmp_path / "filled.png"
    assert main(["restore", str(src), "--task", "inpaint", "--mask", str(mask), "-m", str(multi), "--steps", "2",
                 "--scale", "1", "-q", "-o", str(out)]) == 0
    grid = read_png(out)
    original, shown, filled = np.asarray(Image.open(src)), tile(grid, 0, 0, 1), tile(grid, 0, 1, 1)
    hole = np.zeros((SIZE, SIZE), dtype=bool)
    hole[3:14, 2:9] = True
    assert (filled[~hole] == original[~hole]).all()
    assert (shown[hole] == 128).all()  # the degraded input shows the hole as 0.0, mid grey
    assert not (filled[hole] == 128).all()


def test_panorama_writes_a_strip_of_the_width(multi, tmp_path, capsys) -> None:
    src = shape_png(tmp_path / "scene.png", 4)
    out = tmp_path / "pano.png"
    assert main(["restore", str(src), "--task", "panorama", "--width", "37", "--fraction", "0.25", "-m", str(multi),
                 "--steps", "2", "-q", "--scale", "2", "-o", str(out)]) == 0
    assert "wrote a 37x16 panorama" in capsys.readouterr().out
    grid = read_png(out)
    assert (grid.shape[1], grid.shape[0]) == grid_size(1, 1, 2, tile_w=37)
    strip = grid[::2, ::2][PAD : PAD + SIZE, PAD : PAD + 37]
    assert (strip[:, :SIZE] == np.asarray(Image.open(src).convert("RGB"))).all()  # starts with the input
    assert strip[:, SIZE:].std() > 0  # and goes on with generated columns

    # the default width is four model widths
    assert main(["restore", str(src), "--task", "panorama", "-m", str(multi), "--steps", "1", "-q", "--scale", "1",
                 "-o", str(tmp_path / "wide.png")]) == 0
    assert read_png(tmp_path / "wide.png").shape[:2] == (SIZE + 2 * PAD, 4 * SIZE + 2 * PAD)


# ---------------------------------------------------------------------------------------------- a folder
@pytest.mark.parametrize("samples", [1, 2])
def test_folder_writes_each_output_and_a_grid(multi, tmp_path, capsys, samples) -> None:
    folder = tmp_path / "photos"
    stems = ["apple", "boat", "cloud"]
    for i, stem in enumerate(stems):
        shape_png(folder / f"{stem}.png", i)
    out = tmp_path / "restored_photos"
    assert main(["restore", str(folder), "--task", "colorize", "-m", str(multi), "--steps", "2", "-q",
                 "--samples", str(samples), "--scale", "2", "-o", str(out)]) == 0
    assert f"wrote {3 * samples} outputs for 3 images" in capsys.readouterr().out
    names = [f"{s}.png" for s in stems] if samples == 1 else [f"{s}_{k}.png" for s in stems for k in range(samples)]
    assert {p.name for p in out.iterdir()} == {*names, "grid.png"}
    grid = read_png(out / "grid.png")
    assert (grid.shape[1], grid.shape[0]) == grid_size(3, samples + 1, 2)
    for r, stem in enumerate(stems):
        for k in range(samples):
            one = read_png(out / (f"{stem}.png" if samples == 1 else f"{stem}_{k}.png"))
            assert one.shape == (SIZE, SIZE, 3)  # each output at the model's size, unscaled
            assert (one == tile(grid, r, 1 + k, 2)).all()  # and the grid's row r shows them in order
    if samples == 2:
        assert not (read_png(out / "boat_0.png") == read_png(out / "boat_1.png")).all()


def test_folder_outputs_are_the_bare_images(multi, tmp_path) -> None:
    shape_png(tmp_path / "photos" / "apple.png", 0)
    out = tmp_path / "restored_photos"
    assert main(["restore", str(tmp_path / "photos"), "--task", "inpaint", "-m", str(multi), "--steps", "1", "-q",
                 "-o", str(out)]) == 0
    one = read_png(out / "apple.png")
    assert one.shape == (SIZE, SIZE, 3)
    original = np.asarray(Image.open(tmp_path / "photos" / "apple.png").convert("RGB"))
    assert (one[:4] == original[:4]).all()  # the known top rows are the input's pixels, not a white border


def test_folder_outputs_never_overwrite_each_other(multi, tmp_path, capsys) -> None:
    folder = tmp_path / "photos"
    shape_png(folder / "a" / "x.png", 0)
    shape_png(folder / "b" / "x.png", 1)
    shape_png(folder / "grid.png", 2)
    out = tmp_path / "out"
    assert main(["restore", str(folder), "--task", "colorize", "-m", str(multi), "--steps", "1", "-q",
                 "-o", str(out)]) == 0
    assert "wrote 3 outputs for 3 images" in capsys.readouterr().out
    singles = sorted(str(p.relative_to(out)) for p in files_under(out) if read_png(p).shape == (SIZE, SIZE, 3))
    assert singles == ["a/x.png", "b/x.png", "grid.png"]  # one file per input, as reported; the overview moved aside
    assert (out / "grid_1.png").is_file()


# ---------------------------------------------------------------------------------------------- notices
def test_a_non_binary_mask_is_thresholded_with_a_notice(multi, tmp_path, capsys) -> None:
    src = noise_png(tmp_path / "p.png", (SIZE, SIZE))
    mask = mask_png(tmp_path / "soft.png", (SIZE, SIZE), (4, 4, 10, 10), grey=200)
    out = tmp_path / "o.png"
    with notices_on_stderr():
        code = main(["restore", str(src), "--task", "inpaint", "--mask", str(mask), "-m", str(multi), "--steps", "2",
                     "--scale", "1", "-q", "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"pakhsh restore: notice: {mask} is not binary: thresholded at 128" in err
    filled, original = tile(read_png(out), 0, 1, 1), np.asarray(Image.open(src))
    keep = np.ones((SIZE, SIZE), dtype=bool)
    keep[4:10, 4:11] = False  # grey 200 >= 128: the soft column is generated too
    assert (filled[keep] == original[keep]).all() and not (filled[~keep] == original[~keep]).all()


@pytest.mark.parametrize("task", ["colorize", "inpaint"])
def test_an_input_of_another_size_is_cropped_and_resized_with_notices(multi, tmp_path, capsys, task) -> None:
    src = noise_png(tmp_path / "wide.png", (40, 24))
    extra = ["--mask", str(mask_png(tmp_path / "m.png", (40, 24), (12, 4, 28, 20)))] if task == "inpaint" else []
    out = tmp_path / "o.png"
    with notices_on_stderr():
        code = main(["restore", str(src), "--task", task, "-m", str(multi), "--steps", "2", "-q", "--scale", "1",
                     "-o", str(out), *extra])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "pakhsh restore: notice: wide.png is 40x24: centre-cropped to a square" in err
    assert "pakhsh restore: notice: wide.png is 40x24: resized to 16x16, the model's resolution" in err
    assert read_png(out).shape[:2] == grid_size(1, 2, 1)[::-1]  # tiles at the model's 16 px


# ---------------------------------------------------------------------------------------------- bad input
def test_mask_of_another_size(multi, tmp_path, capsys) -> None:
    src = noise_png(tmp_path / "p.png", (SIZE, SIZE))
    mask = mask_png(tmp_path / "big.png", (20, 12), (2, 2, 8, 8))
    before = files_under(tmp_path)
    code, err = run(["restore", str(src), "--task", "inpaint", "--mask", str(mask), "-m", str(multi),
                     "--steps", "2", "-q", "-o", str(tmp_path / "o.png")], capsys)
    line = error_line(err)
    assert code == 2 and "big.png is 20x12 but the image is 16x16" in line
    assert files_under(tmp_path) == before


def test_an_input_that_is_not_an_image(multi, tmp_path, capsys) -> None:
    src = tmp_path / "notes.png"
    src.write_text("these are not pixels\n")
    before = files_under(tmp_path)
    code, err = run(["restore", str(src), "--task", "colorize", "-m", str(multi), "--steps", "2", "-q"], capsys)
    line = error_line(err)
    assert code == 2 and f"cannot read image {src}" in line
    assert files_under(tmp_path) == before  # not even the default restored.png


@pytest.mark.parametrize("quality", ["0", "101", "ten"])
def test_jpeg_quality_out_of_range_is_a_parse_error(tmp_path, capsys, no_model_load, quality) -> None:
    src = noise_png(tmp_path / "p.png", (SIZE, SIZE))
    before = files_under(tmp_path)
    code, err = run(["restore", str(src), "--task", "jpeg", "--quality", quality, "-o", str(tmp_path / "o.png")],
                    capsys)
    line = error_line(err)
    assert code == 2 and line.startswith("pakhsh restore: error: argument --quality:") and "1..100" in line
    assert files_under(tmp_path) == before


def test_a_checkpoint_trained_for_another_task(colorize_run, tmp_path, capsys) -> None:
    src = noise_png(tmp_path / "p.png", (SIZE, SIZE))
    before = files_under(tmp_path)
    for task, needed in (("inpaint", "inpaint"), ("panorama", "uncrop")):
        code, err = run(["restore", str(src), "--task", task, "-m", str(colorize_run), "--steps", "2", "-q",
                         "-o", str(tmp_path / "o.png")], capsys)
        line = error_line(err)
        assert code == 2 and f"trained for colorize, not {needed} (--task {task})" in line
    assert files_under(tmp_path) == before


def test_a_model_that_is_not_a_palette_model(tmp_path, capsys) -> None:
    src = noise_png(tmp_path / "p.png", (SIZE, SIZE))
    before = files_under(tmp_path)
    code, err = run(["restore", str(src), "--task", "colorize", "-m", "shapes", "--steps", "2", "-q",
                     "-o", str(tmp_path / "o.png")], capsys)
    line = error_line(err)
    assert code == 2 and "is not an image-to-image (Palette) model" in line
    assert files_under(tmp_path) == before


@pytest.mark.parametrize("case", ["missing input", "panorama on a folder", "missing mask file", "folder to a file"])
def test_bad_paths_fail_before_loading_a_model(tmp_path, capsys, no_model_load, case) -> None:
    folder = tmp_path / "photos"
    shape_png(folder / "a.png")
    src = noise_png(tmp_path / "p.png", (SIZE, SIZE))
    argv, expect = {
        "missing input": (["restore", str(tmp_path / "nope.png"), "--task", "colorize"],
                          f"input {tmp_path / 'nope.png'}: not found"),
        "panorama on a folder": (["restore", str(folder), "--task", "panorama"],
                                 "--task panorama takes one image file, not a folder"),
        "missing mask file": (["restore", str(src), "--task", "inpaint", "--mask", "holes.png"],
                              "--mask holes.png: not a file"),
        "folder to a file": (["restore", str(folder), "--task", "colorize", "-o", str(tmp_path / "x.png")],
                             "--out must be a folder"),
    }[case]
    before = files_under(tmp_path)
    code, err = run(argv + ["-q"], capsys)
    line = error_line(err)
    assert code == 2 and expect in line, line
    assert files_under(tmp_path) == before
