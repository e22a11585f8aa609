"""The pakhsh command as people use it: progress that moves, notices instead of silence, class names, seeds that
do not depend on batching, output formats, pipes, Ctrl-C, threads and --version. Tiny random models (8 px, T=50)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import pakhsh
import pakhsh.cli as cli
from pakhsh.cli import main
from pakhsh.config import from_dict, to_dict
from pakhsh.nets.unet import UNet
from pakhsh.pipelines import ImagePipeline, SampleSettings
from pakhsh.threads import MAX_AUTO_THREADS, choose_threads
from pakhsh.training.experiment import ExperimentConfig
from tests.conftest import tiny_experiment

SHAPE_NAMES = ["circle", "square", "triangle", "star", "diamond", "cross"]


def model_folder(folder: Path, **model: object) -> Path:
    """An exported model folder (config.json + model.safetensors) with small random weights."""
    cfg = from_dict(ExperimentConfig, tiny_experiment(model={"dropout": 0.0, **model}))
    net = UNet(cfg.model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(to_dict(cfg)))
    return folder


@pytest.fixture(scope="module")
def uncond(tmp_path_factory) -> Path:
    return model_folder(tmp_path_factory.mktemp("u") / "m")


@pytest.fixture(scope="module")
def cond(tmp_path_factory) -> Path:
    return model_folder(tmp_path_factory.mktemp("c") / "m", num_classes=6)  # trained on shapes: 6 named classes


# ---------------------------------------------------------------------------------------------- 5. npz
def test_npz_is_what_improved_diffusion_writes(cond: Path, tmp_path: Path) -> None:
    out = tmp_path / "samples.npz"
    assert main(["sample", "-m", str(cond), "-n", "3", "--steps", "2", "--label", "star", "--npz", str(out),
                 "-o", str(tmp_path / "g.png"), "-q"]) == 0
    data = np.load(out)
    assert sorted(data.files) == ["arr_0", "arr_1"]
    assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (3, 8, 8, 3)  # NHWC
    assert data["arr_1"].tolist() == [3, 3, 3]


def test_npz_of_an_unconditional_model_has_no_labels(uncond: Path, tmp_path: Path) -> None:
    out = tmp_path / "u.npz"
    assert main(["sample", "-m", str(uncond), "-n", "2", "--steps", "2", "--npz", str(out),
                 "-o", str(tmp_path / "g.png"), "-q"]) == 0
    assert np.load(out).files == ["arr_0"]


# ---------------------------------------------------------------------------------------------- 7. progress
def bar_text(err: str) -> str:
    return err.replace("\r", "\n")


def test_sample_progress_counts_denoising_steps(uncond: Path, tmp_path: Path, capsys) -> None:
    assert main(["sample", "-m", str(uncond), "-n", "3", "--batch-size", "2", "--steps", "4",
                 "-o", str(tmp_path / "s.png")]) == 0
    err = bar_text(capsys.readouterr().err)
    assert "0/8" in err and "8/8" in err and "step/s" in err  # counts 2 batches x 4 steps, not 3 images


@pytest.mark.parametrize("argv, total", [
    # 5 steps of 50 are 0, 12, 25, 37, 49: t=40 restarts at 37, so 4 steps per decode
    (["vary", "data:0", "--t", "40", "--count", "2", "--steps", "5"], "4/4"),
    (["interpolate", "data:0", "data:1", "--t", "40", "--lambdas", "0,1", "--steps", "5"], "8/8"),  # per row
    (["nll", "--max-images", "1", "--batch-size", "1"], "50/50"),  # T=50 timesteps per batch
])  # fmt: skip
def test_long_commands_show_progress_and_quiet_silences(uncond, tmp_path, capsys, argv, total) -> None:
    out = [] if argv[0] == "nll" else ["-o", str(tmp_path / "o.png")]
    assert main([argv[0], "-m", str(uncond), *argv[1:], *out]) == 0
    assert total in bar_text(capsys.readouterr().err)
    assert main([argv[0], "-m", str(uncond), *argv[1:], *out, "-q"]) == 0
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------------------------------- 8. guidance, labels
def test_guidance_on_an_unconditional_model_is_a_notice(uncond: Path, tmp_path: Path) -> None:
    # cli.main prints warnings as `pakhsh sample: notice: ...`; pytest records them instead
    with pytest.warns(UserWarning, match="--guidance 3 is ignored: this model is unconditional") as seen:
        assert main(["sample", "-m", str(uncond), "-n", "1", "--steps", "2", "--guidance", "3",
                     "-o", str(tmp_path / "s.png"), "-q"]) == 0
    assert len(seen) == 1  # said once, not again by the pipeline


def test_labels_by_name_and_for_vary_and_interpolate(cond: Path, tmp_path: Path, capsys) -> None:
    pipe = ImagePipeline.from_pretrained(cond, device="cpu")
    assert pipe.class_names == SHAPE_NAMES and pipe.label_index("Star") == 3 and pipe.label_index("6") == 6
    a = pipe.generate(2, SampleSettings("ddim", 2), labels="star", progress=False)
    b = pipe.generate(2, SampleSettings("ddim", 2), labels=3, progress=False)
    assert torch.equal(a, b)
    for argv in (["vary", "data:0", "--t", "30", "--count", "2"], ["interpolate", "data:0", "data:1", "--t", "30"]):
        assert main([argv[0], "-m", str(cond), *argv[1:], "--steps", "3", "--label", "square",
                     "-o", str(tmp_path / "o.png"), "-q"]) == 0
    v1 = pipe.vary(a[:1], 30, 2, steps=3, label="circle")
    v2 = pipe.vary(a[:1], 30, 2, steps=3, label="cross")
    assert not torch.equal(v1, v2)  # the label reaches the network
    assert main(["sample", "-m", str(cond), "--steps", "2", "--label", "dog", "-q", "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "--label dog" in err and "0=circle" in err


def test_class_names_from_the_folder(tmp_path: Path) -> None:
    folder = model_folder(tmp_path / "m", num_classes=2)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["data"]["name"] = "folder"  # no built-in names: numbers only ...
    (folder / "config.json").write_text(json.dumps(cfg))
    pipe = ImagePipeline.from_pretrained(folder, device="cpu")
    assert pipe.class_names is None and pipe.label_index(1) == 1
    with pytest.raises(ValueError, match="stores no class names"):
        pipe.label_index("cat")
    (folder / "class_names.json").write_text(json.dumps(["cat", "dog"]))  # ... unless the folder names them
    assert ImagePipeline.from_pretrained(folder, device="cpu").label_index("dog") == 1


def test_unconditional_models_refuse_labels(uncond: Path, tmp_path: Path, capsys) -> None:
    assert main(["vary", "-m", str(uncond), "data:0", "--t", "10", "--label", "1", "-q",
                 "-o", str(tmp_path / "v.png")]) == 2
    assert "unconditional" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- 9. seeds per image
class PerImage(torch.nn.Module):
    """A network whose output for one image depends on that image alone and is computed elementwise, so batching
    cannot change a single bit: any difference would come from the noise."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return torch.tanh(x * 0.5 + t.float().view(-1, 1, 1, 1) / 1000)


@pytest.mark.parametrize("sampler", ["ddpm", "sde-dpm++2m"])
def test_images_depend_on_seed_and_index_only(sampler: str) -> None:
    from pakhsh.diffusion import DiffusionConfig
    from pakhsh.pipelines import ResolvedModel

    pipe = ImagePipeline(ResolvedModel(PerImage(), DiffusionConfig(num_steps=50, schedule="cosine"), (3, 8, 8),
                                       Path("."), "pakhsh"), device="cpu")
    s = SampleSettings(sampler, 6)
    four = pipe.generate(4, s, seed=11, batch_size=4, progress=False)
    assert torch.equal(pipe.generate(2, s, seed=11, batch_size=4, progress=False), four[:2])
    assert torch.equal(pipe.generate(4, s, seed=11, batch_size=1, progress=False), four)
    assert torch.equal(pipe.generate(3, s, seed=11, batch_size=2, progress=False), four[:3])
    assert not torch.equal(pipe.generate(2, s, seed=12, progress=False), four[:2])


@pytest.mark.parametrize("sampler", ["ddpm", "sde-dpm++2m"])
def test_unet_images_do_not_depend_on_batching(uncond: Path, sampler: str) -> None:
    pipe = ImagePipeline.from_pretrained(uncond, device="cpu")
    s = SampleSettings(sampler, 5)
    four = pipe.generate(4, s, seed=3, batch_size=4, progress=False)
    two = pipe.generate(2, s, seed=3, batch_size=1, progress=False)
    # the same noise; only the conv kernels' float rounding may differ between batch sizes
    torch.testing.assert_close(two, four[:2], rtol=0, atol=1e-3)


# ---------------------------------------------------------------------------------------------- 10. CLI hygiene
def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"pakhsh {pakhsh.__version__}"


def test_out_suffix_picks_the_format(uncond: Path, tmp_path: Path, capsys) -> None:
    for name, magic in (("g.jpg", b"\xff\xd8\xff"), ("g.webp", b"RIFF"), ("g.png", b"\x89PNG")):
        assert main(["sample", "-m", str(uncond), "-n", "1", "--steps", "1", "-o", str(tmp_path / name), "-q"]) == 0
        assert (tmp_path / name).read_bytes()[:len(magic)] == magic
    for name in ("g.xyz", "noext"):  # refused before any sampling (16 images x 100 steps would take a while)
        assert main(["sample", "-m", str(uncond), "-o", str(tmp_path / name), "-q"]) == 2
        err = capsys.readouterr().err
        assert "--out" in err and ".png" in err and len(err.strip().splitlines()) == 1


def test_set_without_equals_names_the_flag(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["train", "--set", "train.steps", "20"])
    assert e.value.code == 2
    assert "--set expects KEY=VALUE, got 'train.steps'" in capsys.readouterr().err


def test_ctrl_c_exits_130(uncond: Path, tmp_path: Path) -> None:
    """A real SIGINT while sampling: the shell sees 130 and one word, not a traceback."""
    # every training step for 20,000 images: far longer than the signal takes to arrive
    # a shell in the background (CI) starts children with SIGINT ignored; a terminal's Ctrl-C is what is tested
    code = (f"import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
            f"from pakhsh.cli import main; sys.exit(main(['sample', '-m', {str(uncond)!r}, '-n', '20000', "
            f"'--steps', '0', '-o', {str(tmp_path / 's.png')!r}]))")
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, stdout=subprocess.PIPE)
    seen = b""
    while b"sampling" not in seen and proc.poll() is None:  # wait for the progress bar: sampling has begun
        seen += proc.stderr.read(1)  # type: ignore[union-attr]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert (seen + err).decode().rstrip().endswith("interrupted") and b"Traceback" not in err


def test_closed_pipe_is_quiet(uncond: Path) -> None:
    """`pakhsh info ... | head -1`: the reader leaves early; no BrokenPipeError traceback."""
    code = f"import sys; sys.argv = ['pakhsh', 'info', {str(uncond)!r}]; from pakhsh.cli import main; sys.exit(main())"
    proc = subprocess.run(f"{sys.executable} -c \"{code}\" | head -n 1", shell=True, capture_output=True, text=True,
                          timeout=120)
    assert proc.stdout.startswith("checkpoint:")
    assert "Error" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


# ---------------------------------------------------------------------------------------------- 11. threads
def test_thread_choice(monkeypatch) -> None:
    monkeypatch.setattr(cli.os, "cpu_count", lambda: 8)
    assert choose_threads(3, {}, load=0.0)[0] == 3
    assert choose_threads(None, {"OMP_NUM_THREADS": "1"}, load=0.0) == (1, "OMP_NUM_THREADS")
    auto, why = choose_threads(None, {}, load=0.0, cores=8)  # an idle machine: every usable core
    assert auto == 8 and "8 usable core" in why
    assert choose_threads(None, {}, load=0.0, cores=64)[0] == MAX_AUTO_THREADS  # capped
    assert choose_threads(None, {}, load=4.0, cores=8)[0] == 4  # half the machine busy: half the cores
    assert choose_threads(None, {}, load=20.0, cores=8)[0] == 1  # all busy: one thread, never zero
    auto, _ = choose_threads(None, {}, load=0.0)  # this process: affinity mask and cgroup quota
    assert 1 <= auto <= len(cli.os.sched_getaffinity(0))


def test_threads_flag_is_applied_and_quiet_unless_verbose(uncond: Path, tmp_path: Path, capsys) -> None:
    args = ["sample", "-m", str(uncond), "-n", "1", "--steps", "1", "-o", str(tmp_path / "s.png"), "-q"]
    assert main(["--threads", "1", *args]) == 0
    assert torch.get_num_threads() == 1 and capsys.readouterr().err == ""
    assert main(["--threads", "2", "-v", *args]) == 0
    assert "using 2 CPU thread(s) (--threads)" in capsys.readouterr().err


def test_every_command_that_samples_on_a_device_offers_bf16() -> None:
    """--device and --bf16 go together: a command that runs a diffusion model on a chosen device offers bf16
    autocast too (unclip lacked it until the GPU smoke run asked for it). reconstruct, an autoencoder round trip
    without diffusion, is the one exception; training commands set train.mixed_precision instead."""
    import argparse

    from pakhsh.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    with_device = {name for name, p in sub.choices.items() if "--device" in p._option_string_actions}
    without_bf16 = {name for name in with_device if "--bf16" not in sub.choices[name]._option_string_actions}
    assert {"sample", "generate", "unclip", "restore", "eval"} <= with_device
    assert without_bf16 <= {"reconstruct"}, without_bf16


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_a_cpu_without_native_bf16_is_a_notice(uncond: Path, tmp_path: Path, monkeypatch,
                                                        native: bool) -> None:
    """--bf16 where oneDNN would emulate bf16 (an AVX2 CPU: several times slower than fp32) says so and still runs;
    on a CPU with AMX / AVX-512 BF16 it is silent."""
    import warnings

    import pakhsh.training.precision as precision

    monkeypatch.setattr(precision, "cpu_bf16_features", lambda: ["amx_bf16"] if native else [])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert main(["sample", "-m", str(uncond), "-n", "1", "--steps", "2", "--bf16", "--device", "cpu", "-q",
                     "-o", str(tmp_path / "s.png")]) == 0
    said = [w for w in seen if "--bf16: this CPU has no native bf16" in str(w.message)]
    assert len(said) == (0 if native else 1)
