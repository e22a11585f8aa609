"""Bad input to the pakhsh command: one line naming the problem, exit code 2, no traceback, no wasted work.

Runs on the shipped 'shapes' model (32 px, T = 1000) with tiny counts, so every case takes about a second.
"""

from __future__ import annotations

import errno
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pakhsh.cli as cli
from pakhsh.cli import main
from pakhsh.evaluation import FEATNETS
from pakhsh.pipelines import ImagePipeline
from tests.conftest import run_cli as run

pytestmark = pytest.mark.filterwarnings("ignore:only .* samples", "ignore:KID subset size", "ignore:IS.*splits")


def one_line(err: str) -> bool:
    lines = [ln for ln in err.strip().splitlines() if "notice:" not in ln]
    return len(lines) == 1


def png_header(path: Path, width: int, height: int) -> Path:
    """A valid PNG whose header declares width x height (grey) but holds almost no data: a cheap bomb."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


def rgb_png(path: Path, size: int = 32, seed: int = 0) -> Path:
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return path


@pytest.fixture
def no_model_load(monkeypatch):
    """Checks that must come before any work: loading a model fails the test."""

    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad flag was noticed")

    monkeypatch.setattr(ImagePipeline, "from_pretrained", classmethod(fail))


def eval_args(source: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["eval", str(source), "--stats-dir", str(tmp_path / "stats"), "--json", str(tmp_path / "e.json"),
            "--markdown", str(tmp_path / "e.md"), "--device", "cpu", "-q", *extra]


# ----------------------------------------------------------------------------- tracebacks -> messages


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_corrupt_inception_weights_are_named(tmp_path, capsys, suffix):
    (tmp_path / "imgs").mkdir()
    rgb_png(tmp_path / "imgs" / "a.png")
    bad = tmp_path / f"inception{suffix}"
    bad.write_bytes(b"\x50\x4b\x03\x04 cut short")
    code, err = run(eval_args(tmp_path / "imgs", tmp_path, "--dataset", "shapes", "--inception-weights", str(bad)),
                    capsys)
    assert code == 2 and str(bad) in err and "truncated or corrupt" in err and one_line(err)


def test_truncated_feature_net_is_named(tmp_path, capsys):
    net = tmp_path / "net"
    shutil.copytree(FEATNETS / "shapes", net)
    weights = net / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    (tmp_path / "imgs").mkdir()
    rgb_png(tmp_path / "imgs" / "a.png")
    code, err = run(eval_args(tmp_path / "imgs", tmp_path, "--dataset", "shapes", "--feature-net", str(net)), capsys)
    assert code == 2 and str(weights) in err and "truncated or corrupt" in err and one_line(err)


@pytest.mark.parametrize("side, size_text", [(40_000, "1600000000 pixels"), (10_000, "10000x10000")])
def test_image_bombs_are_refused_before_decoding(tmp_path, capsys, side, size_text):
    bomb = png_header(tmp_path / "bomb.png", side, side)
    code, err = run(["vary", str(bomb), "--count", "1", "-o", str(tmp_path / "v.png"), "-q"], capsys)
    assert code == 2 and str(bomb) in err and size_text in err and one_line(err)
    code, err = run(["interpolate", "data:0", str(bomb), "-o", str(tmp_path / "i.png"), "-q"], capsys)
    assert code == 2 and str(bomb) in err and size_text in err


@pytest.mark.parametrize("spec, problem", [("data:99999999", "index out of range"), ("data:abc", "whole number")])
def test_bad_data_index_names_spec_and_range(tmp_path, capsys, spec, problem):
    code, err = run(["vary", spec, "--count", "1", "-o", str(tmp_path / "v.png"), "-q"], capsys)
    assert code == 2 and spec in err and problem in err and one_line(err)
    if problem != "whole number":  # the range needs the model; a malformed index is refused before loading it
        assert "data:0 .. data:9999" in err


def test_data_path_that_is_a_file(tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    rgb_png(tmp_path / "imgs" / "a.png")
    afile = tmp_path / "images.zip"
    afile.write_bytes(b"PK")
    code, err = run(eval_args(tmp_path / "imgs", tmp_path, "--dataset", "folder", "--data-path", str(afile),
                              "--feature-net", "shapes"), capsys)
    assert code == 2 and str(afile) in err and "is a file, not a folder" in err


def test_unwritable_outputs_fail_before_any_work(tmp_path, capsys, no_model_load):
    afile = tmp_path / "somefile.txt"
    afile.write_text("x")
    cases = [
        (["sample", "-o", str(afile / "out.png")], "--out"),
        (["sample", "-o", str(tmp_path / "g.png"), "--singles", str(afile / "singles")], "--singles"),
        (["sample", "--singles", str(afile)], "--singles"),
        (["vary", "data:0", "-o", "/proc/pakhsh-test/v.png"], "--out"),
        (["interpolate", "data:0", "data:1", "-o", str(afile / "i.png")], "--out"),
        (["nll", "--json", str(afile / "nll.json")], "--json"),
        (["eval", "shapes", "--json", str(afile / "e.json")], "--json"),
        (["eval", "shapes", "--json", str(tmp_path / "e.json"), "--markdown", "/proc/e.md"], "--markdown"),
        (["export", "shapes", str(afile / "exported")], "OUT"),
    ]
    for argv, flag in cases:
        code, err = run([*argv, "-q"] if argv[0] != "export" else argv, capsys)
        assert code == 2, argv
        assert f"{flag} " in err and one_line(err), err


def test_nll_max_images_zero_is_a_parse_error(capsys, no_model_load):
    code, err = run(["nll", "--max-images", "0", "-q"], capsys)
    assert code == 2 and "--max-images" in err and ">= 1" in err and one_line(err)


def test_unexpected_errors_are_one_line_unless_debugging(capsys, monkeypatch):
    def boom(args):
        raise KeyError("boom")

    monkeypatch.setattr(cli, "cmd_info", boom)
    monkeypatch.delenv("PAKHSH_DEBUG", raising=False)
    code, err = run(["info"], capsys)
    assert code == 1 and one_line(err)
    assert "pakhsh info: internal error: KeyError: 'boom'" in err and "PAKHSH_DEBUG=1" in err
    monkeypatch.setenv("PAKHSH_DEBUG", "1")
    with pytest.raises(KeyError):
        main(["info"])


def test_os_errors_name_the_file(capsys, monkeypatch):
    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/out/samples.png")

    monkeypatch.setattr(cli, "cmd_info", full)
    monkeypatch.delenv("PAKHSH_DEBUG", raising=False)
    code, err = run(["info"], capsys)
    assert code == 2 and "/data/out/samples.png: No space left on device" in err and one_line(err)


def test_keyboard_interrupt_is_130(capsys, monkeypatch):
    def stop(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_info", stop)
    assert run(["info"], capsys)[0] == 130


# ----------------------------------------------------------------------------- silently accepted -> refused


@pytest.mark.parametrize("argv, flag", [
    (["sample", "-n", "0"], "--num/-n"),
    (["sample", "-n", "-1"], "--num/-n"),
    (["sample", "--batch-size", "0"], "--batch-size"),
    (["sample", "--scale", "0"], "--scale"),
    (["sample", "--steps", "-3"], "--steps"),
    (["sample", "--eta", "1.5"], "--eta"),
    (["sample", "--eta", "nan"], "--eta"),
    (["sample", "--guidance", "-1"], "--guidance"),
    (["sample", "--threshold", "0"], "--threshold"),
    (["sample", "--threshold", "1.5"], "--threshold"),
    (["vary", "data:0", "--count", "0"], "--count"),
    (["vary", "data:0", "--t", "-1"], "--t"),
    (["interpolate", "data:0", "data:1", "--scale", "0"], "--scale"),
    (["nll", "--batch-size", "0"], "--batch-size"),
    (["eval", "shapes", "-n", "0"], "--num-samples/-n"),
    (["eval", "shapes", "--num-real", "0"], "--num-real"),
    (["eval", "shapes", "--batch-size", "0"], "--batch-size"),
    (["eval", "shapes", "--threshold", "2"], "--threshold"),
])
def test_out_of_range_flags_are_parse_errors(capsys, no_model_load, argv, flag):
    code, err = run([*argv, "-q"], capsys)
    assert code == 2 and f"argument {flag}:" in err and one_line(err)


@pytest.mark.parametrize("argv, text", [
    (["sample", "--steps", "5000"], "--steps 5000: this model has T=1000"),
    (["vary", "data:0", "--t", "5000"], "--t 5000: must be a training step in 0..999"),
    (["interpolate", "data:0", "data:1", "--t", "1000"], "--t 1000: must be a training step in 0..999"),
    (["vary", "data:0", "--steps", "1001"], "--steps 1001"),
])
def test_model_dependent_ranges_fail_before_sampling(tmp_path, capsys, monkeypatch, argv, text):
    def no_sampling(*args, **kwargs):
        raise AssertionError("sampling started")

    for name in ("generate", "vary", "interpolate"):
        monkeypatch.setattr(ImagePipeline, name, no_sampling)
    code, err = run([*argv, "-o", str(tmp_path / "o.png"), "-q"], capsys)
    assert code == 2 and text in err and one_line(err)


def test_eval_steps_beyond_T(tmp_path, capsys):
    code, err = run(eval_args(Path("shapes"), tmp_path, "--steps", "5000", "-n", "2"), capsys)
    assert code == 2 and "steps 5000" in err and "T=1000" in err
    assert not (tmp_path / "stats").exists()  # refused before any reference work


def test_eval_passes_threshold_to_sampling(tmp_path, capsys):
    import json

    args = eval_args(Path("shapes"), tmp_path, "-n", "4", "--steps", "2", "--num-real", "8", "--metrics", "fid",
                     "--threshold", "0.9")
    assert run(args, capsys)[0] == 0
    assert json.loads((tmp_path / "e.json").read_text())["sampling"]["threshold"] == 0.9
    assert "threshold=0.9" in (tmp_path / "e.md").read_text()


def test_small_input_image_is_named(tmp_path, capsys):
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (1, 1), (200, 30, 30)).save(tiny)
    with pytest.warns(UserWarning, match=r"tiny\.png is 1x1: upscaled to 32x32"):
        code, _ = run(["vary", str(tiny), "--t", "5", "--count", "1", "--steps", "2",
                       "-o", str(tmp_path / "v.png"), "-q"], capsys)
    assert code == 0


# ----------------------------------------------------------------------------- devices


def test_cuda_without_cuda_is_a_clear_error(capsys, monkeypatch, no_model_load):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, err = run(["sample", "--device", "cuda", "-q"], capsys)
    assert code == 2 and one_line(err)
    assert "--device cuda:" in err and "torch.cuda.is_available() is False" in err and "--device cpu or auto" in err
    code, err = run(["eval", "shapes", "--device", "cuda:0", "-q"], capsys)
    assert code == 2 and "--device cuda:0" in err


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "cpu:0:1"])
def test_malformed_device_is_a_clear_error(capsys, no_model_load, spec):
    code, err = run(["sample", "--device", spec, "-q"], capsys)
    assert code == 2 and f"--device {spec}: not a device" in err and one_line(err)
