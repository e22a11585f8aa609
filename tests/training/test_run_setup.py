"""How a run is set up before its first step: mixed precision auto, shipped configs by name, run names and folders,
class names recorded from the data, and what every run leaves to look at. Tiny configs, in-process."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import pakhsh.training.precision as precision
from pakhsh.config import ConfigError
from pakhsh.training import Trainer, TrainConfig, TrainingError, load_experiment, shipped_configs
from pakhsh.training.precision import choose_precision
from tests.conftest import tiny_experiment


def _cpuinfo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flags: str) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu sse2 avx2 {flags}\n\nprocessor\t: 1\n")
    monkeypatch.setattr(precision, "CPUINFO", info)
    monkeypatch.setattr(precision.sys, "platform", "linux")
    for cap in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):  # a cap in the caller's environment would override flags
        monkeypatch.delenv(cap, raising=False)


# ---------------------------------------------------------------------------------------------- precision
@pytest.mark.parametrize("flags, expect", [("avx512f avx512_bf16", "bf16"), ("amx_tile amx_bf16", "bf16"),
                                           ("avx512f avx512bw", "no"), ("", "no")])
def test_auto_precision_is_bf16_only_on_cpus_with_native_bf16(tmp_path, monkeypatch, flags, expect):
    _cpuinfo(tmp_path, monkeypatch, flags)
    chosen, why = choose_precision("auto", "cpu")
    assert chosen == expect
    assert why == ("CPU has AMX/AVX-512 BF16" if expect == "bf16"
                   else "this CPU has no native bf16: bf16 autocast would be ~9x slower")


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_on_a_gpu_asks_cuda(tmp_path, monkeypatch, native):
    _cpuinfo(tmp_path, monkeypatch, "amx_bf16")  # the CPU's answer must not decide for a GPU run
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: native)
    for device in ("auto", "cuda", "cuda:1"):
        assert choose_precision("auto", device)[0] == ("bf16" if native else "no")
    assert choose_precision("auto", "cpu")[0] == "bf16"  # train.device=cpu trains on the CPU whatever GPU is there
    assert choose_precision("fp16", "cuda") == ("fp16", "train.mixed_precision=fp16")  # explicit: as given


def test_auto_is_the_default_of_the_config_and_the_shipped_configs():
    assert TrainConfig().mixed_precision == "auto"
    assert set(shipped_configs()) >= {"shapes", "fashion_mnist", "cifar_iddpm"}
    for name in shipped_configs():
        assert load_experiment(name).train.mixed_precision == "auto", name


def test_resume_compares_auto_by_what_it_chooses(tiny_yaml, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    monkeypatch.setattr(precision, "cpu_bf16_features", lambda: [])  # auto = no on this "CPU"
    cfg = load_experiment(tiny_yaml, [f"train.out_dir={run}", "train.steps=1", "train.mixed_precision=auto"])
    Trainer(cfg, progress=False).fit()
    assert "mixed precision: no (this CPU has no native bf16" in capsys.readouterr().out
    assert json.loads((run / "config.json").read_text())["train"]["mixed_precision"] == "auto"  # not resolved
    # the run said auto: resuming with auto or with what auto chose is the same run
    for setting in ("auto", "no"):
        cfg = load_experiment(tiny_yaml, [f"train.out_dir={run}", "train.steps=2", f"train.mixed_precision={setting}"])
        Trainer(cfg, resume=True, progress=False).lock.release()
    # on a machine where auto means bf16, auto no longer continues the fp32 run: an error, not a silent change
    monkeypatch.setattr(precision, "cpu_bf16_features", lambda: ["amx_bf16"])
    cfg = load_experiment(tiny_yaml, [f"train.out_dir={run}", "train.steps=2", "train.mixed_precision=no"])
    with pytest.raises(TrainingError, match=r"train\.mixed_precision: 'bf16' != 'no' \(train\.mixed_precision=auto "
                                            r"is bf16 on this machine\)"):
        Trainer(cfg, resume=True, progress=False)


# ---------------------------------------------------------------------------------------------- configs
def test_shipped_configs_load_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_experiment("shapes").name == "shapes"
    assert load_experiment("fashion_mnist.yaml").model.in_channels == 1
    with pytest.raises(ConfigError, match=r"config nosuch: not found; .*shipped config name \(autoencoder_f4, .*cifar_iddpm, "):
        load_experiment("nosuch")
    # the repository layout older docs (and issues) use: configs/NAME.yaml is the shipped NAME when no such file exists
    assert load_experiment("configs/palette_jpeg.yaml").task.name == "jpeg"
    with pytest.raises(ConfigError, match=r"config elsewhere/shapes\.yaml: not found"):  # any other path is a path
        load_experiment("elsewhere/shapes.yaml")
    (tmp_path / "shapes").write_text(yaml.safe_dump({"name": "mine"}))  # a file in the way wins over the name
    assert load_experiment("shapes").name == "mine"


# ---------------------------------------------------------------------------------------------- names, folders
def test_default_run_folder_is_runs_name(tiny_yaml):
    assert load_experiment(tiny_yaml).train.out_dir == "runs/tiny"
    assert load_experiment(tiny_yaml, ["name=other"]).train.out_dir == "runs/other"
    assert load_experiment(tiny_yaml, ["train.out_dir=elsewhere"]).train.out_dir == "elsewhere"
    assert load_experiment(None).train.out_dir == "runs/experiment"


def test_a_run_on_a_folder_is_named_after_it(tiny_yaml, tmp_path):
    pets = ["data.name=folder", f"data.path={tmp_path / 'pets'}/"]
    assert load_experiment(None, pets).name == "pets"
    cfg = load_experiment(tiny_yaml, pets)  # a YAML written for shapes: its name would call this run "tiny"
    assert (cfg.name, cfg.train.out_dir) == ("pets", "runs/pets")
    assert load_experiment(tiny_yaml, [*pets, "name=mine"]).name == "mine"
    assert load_experiment("cifar_iddpm", pets[1:]).name == "iddpm_32"  # a folder config names its own runs


def _pets(root: Path) -> Path:
    for c in ("astro", "cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / c / f"{i}.png")
    return root


def test_the_classes_are_saved_and_said(tmp_path, monkeypatch, capsys):
    from pakhsh.pipelines import ImagePipeline

    monkeypatch.chdir(tmp_path)
    yml = tmp_path / "tiny.yaml"
    yml.write_text(yaml.safe_dump(tiny_experiment(train={"steps": 1, "ema_rates": [0.9]})))
    cfg = load_experiment(yml, ["data.name=folder", f"data.path={_pets(tmp_path / 'pets')}", "data.length=null",
                                "model.num_classes=3"])
    Trainer(cfg, progress=False).fit()
    assert f"folder {tmp_path / 'pets'}: 9 images in 3 classes (astro, cat, dog)" in capsys.readouterr().out
    run = tmp_path / "runs" / "pets"  # named after the folder, under runs/ of the working directory
    assert json.loads((run / "config.json").read_text())["class_names"] == ["astro", "cat", "dog"]
    assert ImagePipeline.from_pretrained(run, device="cpu").label_index("cat") == 1


def test_built_in_datasets_are_described(tiny_yaml, tmp_path, capsys):
    Trainer(load_experiment(tiny_yaml, [f"train.out_dir={tmp_path / 'r'}"]), progress=False).lock.release()
    out = capsys.readouterr().out
    assert ("dataset shapes: 64 images in 6 classes (circle, square, triangle, star, diamond, cross); the model "
            "is unconditional (model.num_classes=6 would condition on them)") in out


# ---------------------------------------------------------------------------------------------- outputs
def test_every_run_ends_with_a_loss_curve_and_a_sample_grid(tiny_yaml, tmp_path, capsys):
    run = tmp_path / "run"
    cfg = load_experiment(tiny_yaml, [f"train.out_dir={run}", "train.steps=2", "train.log_every=50",
                                      "train.sample_every=0"])
    Trainer(cfg, progress=False).fit()
    grid = run / "samples" / "step_0000002.png"
    assert (run / "loss.png").is_file() and grid.is_file()
    assert Image.open(grid).size[0] > 8  # the num_preview=4 grid, not a single image
    assert f"wrote {run / 'loss.png'} and {grid}" in capsys.readouterr().out


@pytest.mark.parametrize("cap, native", [("AVX2", False), ("avx512_core", False), ("AVX512_CORE_AMX", True)])
def test_auto_precision_respects_a_onednn_isa_cap(monkeypatch, cap, native):
    from pakhsh.training import precision

    monkeypatch.setattr(precision, "_cpuinfo_flags", lambda text: {"amx_bf16", "avx512_bf16"})
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert (precision.choose_precision("auto", "cpu")[0] == "bf16") is native
