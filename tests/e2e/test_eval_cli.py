"""`pakhsh eval` end to end: an image folder and a tiny checkpoint against built-in splits, offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from pakhsh.cli import main
from pakhsh.data import DataConfig, build_dataset
from pakhsh.imageio import save_images

pytestmark = pytest.mark.filterwarnings("ignore:only .* samples", "ignore:KID subset size", "ignore:IS.*splits")


@pytest.fixture
def folder(tmp_path) -> Path:
    ds = build_dataset(DataConfig(name="shapes", image_size=32, split="test", length=16))
    save_images(torch.stack([ds[i]["image"] for i in range(16)]), tmp_path / "imgs")
    return tmp_path / "imgs"


def eval_args(source: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["eval", str(source), "--dataset", "shapes", "--split", "test", "--num-real", "40",
            "--stats-dir", str(tmp_path / "stats"), "--json", str(tmp_path / "out" / "eval.json"),
            "--markdown", str(tmp_path / "out" / "eval.md"), "--device", "cpu", "-q", *extra]


def test_eval_folder_writes_json_and_markdown_and_reuses_stats(folder, tmp_path, capsys):
    assert main(eval_args(folder, tmp_path)) == 0
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert report["labels"]["fid"] == "FID[shapes-net]-16"
    assert report["report"]["n_real"] == 40 and report["report"]["fid"] >= 0
    assert report["stats_cached"] is False and report["extractor"] == "shapes-net"
    md = (tmp_path / "out" / "eval.md").read_text()
    assert "| FID[shapes-net]-16 |" in md and "| IS[shapes-net]-16 |" in md and "shapes test" in md
    assert "FID[shapes-net]-16" in capsys.readouterr().out
    stats = Path(report["stats_path"])
    stamp = stats.stat().st_mtime_ns
    assert main(eval_args(folder, tmp_path, "--metrics", "fid")) == 0
    again = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert again["stats_cached"] is True and stats.stat().st_mtime_ns == stamp
    assert again["report"]["kid_mean"] is None  # only FID asked for
    assert again["report"]["fid"] == pytest.approx(report["report"]["fid"])


def test_eval_size_mismatch_notice_and_strict_error(tmp_path, capsys):
    ds = build_dataset(DataConfig(name="shapes", image_size=28, split="test", length=12))
    save_images(torch.stack([ds[i]["image"] for i in range(12)]), tmp_path / "small")
    with pytest.warns(UserWarning, match="converted"):
        assert main(eval_args(tmp_path / "small", tmp_path, "--metrics", "fid")) == 0
    assert "converted to (3, 32, 32)" in (tmp_path / "out" / "eval.md").read_text()
    assert main(eval_args(tmp_path / "small", tmp_path, "--metrics", "fid", "--strict")) == 2
    err = capsys.readouterr().err
    assert "(3, 28, 28)" in err and "strict" in err


TINY = {
    "name": "tiny",
    "data": {"name": "shapes", "image_size": 8, "length": 16},
    "model": {"image_size": 8, "model_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1,
              "attention_resolutions": [], "dropout": 0.0, "num_groups": 4},
    "diffusion": {"num_steps": 10, "schedule": "cosine"},
    "train": {"steps": 1, "batch_size": 4, "log_every": 1, "save_every": 1, "sample_every": 0,
              "ema_rates": [0.9], "device": "cpu"},
}


def test_eval_checkpoint_samples_and_reports_bpd(tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    assert main(["train", str(cfg), "--out", str(tmp_path / "run"), "-q"]) == 0
    args = ["eval", str(tmp_path / "run"), "--num-real", "24", "-n", "12", "--sampler", "ddim", "--steps", "5",
            "--bpd", "--bpd-images", "4", "--stats-dir", str(tmp_path / "stats"), "--device", "cpu", "-q",
            "--json", str(tmp_path / "e.json"), "--markdown", str(tmp_path / "e.md")]
    with pytest.warns(UserWarning, match="resized"):  # the 8x8 samples go into the 32x32 shapes net
        assert main(args) == 0
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["kind"] == "checkpoint" and report["dataset"] == "shapes" and report["extractor"] == "shapes-net"
    assert report["sampling"] == {"sampler": "ddim", "steps": 5, "seed": 0, "spacing": "uniform", "eta": 0.0}
    assert report["bpd"] > 0 and report["bpd_images"] == 4
    assert "bits/dim (test, 4 images)" in (tmp_path / "e.md").read_text()
