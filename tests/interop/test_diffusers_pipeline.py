"""diffusers in: a loaded UNet2DModel runs in every sampler, and a diffusers pipeline folder (model_index.json,
unet/, scheduler/) works with `-m` everywhere, its scheduler config giving the diffusion."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")

from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel  # noqa: E402

from pakhsh.cli import main  # noqa: E402
from pakhsh.diffusion import GaussianDiffusion, ModelOutput, VarianceType, cosine_betas  # noqa: E402
from pakhsh.interop.diffusers import DiffusersFormatError, load_diffusers_unet, scheduler_settings  # noqa: E402
from pakhsh.pipelines import ImagePipeline, SampleSettings, resolve_model  # noqa: E402
from pakhsh.samplers import SAMPLERS  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:only .* samples", "ignore:KID subset size", "ignore:IS.*splits")


def tiny_unet(out_channels: int = 3, num_class_embeds: int | None = None) -> UNet2DModel:
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=16, in_channels=3, out_channels=out_channels, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8, num_class_embeds=num_class_embeds,
    )
    with torch.no_grad():  # random, non-zero weights so outputs depend on every layer
        for p in unet.parameters():
            p.normal_(0, 0.05)
    return unet.eval()


def save_pipeline(folder: Path, scheduler: DDPMScheduler | None = None, out_channels: int = 3) -> Path:
    """A tiny DDPMPipeline folder: model_index.json, unet/, scheduler/ (T = 20, cosine)."""
    scheduler = scheduler or DDPMScheduler(num_train_timesteps=20, beta_schedule="squaredcos_cap_v2")
    DDPMPipeline(unet=tiny_unet(out_channels), scheduler=scheduler).save_pretrained(str(folder))
    return folder


@pytest.fixture
def pipeline_folder(tmp_path: Path) -> Path:
    return save_pipeline(tmp_path / "ddpm")


# ---------------------------------------------------------------------------------------------- 1. the UNet callable
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_loaded_unet_runs_in_every_sampler(tmp_path: Path, sampler: str) -> None:
    """The README example: load_diffusers_unet(folder) passed straight to a sampler (it used to return the raw
    UNet2DModel, whose UNet2DOutput has no .shape)."""
    tiny_unet().save_pretrained(tmp_path / "unet")
    model = load_diffusers_unet(tmp_path / "unet")
    diffusion = GaussianDiffusion(cosine_betas(1000)).respace("3")
    x = SAMPLERS[sampler](diffusion, model, torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)),
                          generator=torch.Generator().manual_seed(1))
    assert x.shape == (2, 3, 16, 16) and torch.isfinite(x).all()
    assert model.config.sample_size == 16 and isinstance(model.unet, UNet2DModel)


def test_loaded_unet_passes_labels(tmp_path: Path) -> None:
    unet = tiny_unet(num_class_embeds=3)
    unet.save_pretrained(tmp_path / "unet")
    model = load_diffusers_unet(tmp_path / "unet")
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([1, 900]), torch.tensor([0, 2])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y=y), unet(x, t, class_labels=y).sample, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- 2. scheduler settings
@pytest.mark.parametrize("kwargs, output, variance, clip", [
    ({"beta_schedule": "squaredcos_cap_v2"}, ModelOutput.EPS, VarianceType.FIXED_SMALL, True),
    ({"beta_schedule": "linear", "beta_start": 1e-3, "beta_end": 0.2, "prediction_type": "v_prediction",
      "variance_type": "fixed_large", "clip_sample": False}, ModelOutput.V, VarianceType.FIXED_LARGE, False),
    ({"beta_schedule": "scaled_linear", "beta_start": 1e-3, "beta_end": 0.1, "prediction_type": "sample"},
     ModelOutput.X0, VarianceType.FIXED_SMALL, True),
    ({"trained_betas": np.linspace(1e-3, 0.3, 20).tolist(), "variance_type": "learned_range"},
     ModelOutput.EPS, VarianceType.LEARNED_RANGE, True),
])  # fmt: skip
def test_scheduler_config_becomes_our_diffusion(tmp_path, kwargs, output, variance, clip) -> None:
    scheduler = DDPMScheduler(num_train_timesteps=20, **kwargs)
    folder = save_pipeline(tmp_path / "p", scheduler, out_channels=6 if variance == VarianceType.LEARNED_RANGE else 3)
    pipe = ImagePipeline.from_pretrained(folder, device="cpu")
    assert pipe.loaded.kind == "diffusers" and pipe.num_steps == 20
    assert pipe.diffusion.model_output == output and pipe.diffusion.variance == variance
    assert pipe.loaded.clip_denoised is clip
    theirs = scheduler.alphas_cumprod.numpy()  # float32
    np.testing.assert_allclose(pipe.diffusion.alphas_cumprod.numpy(), theirs, rtol=1e-4)
    x = pipe.generate(2, SampleSettings("ddpm", 3, clip_denoised=None), progress=False)
    assert x.shape == (2, 3, 16, 16)


@pytest.mark.parametrize("key, value", [
    ("beta_schedule", "sigmoid"), ("variance_type", "learned"), ("prediction_type", "flow"),
    ("thresholding", True), ("clip_sample_range", 2.0), ("rescale_betas_zero_snr", True), ("made_up_key", 1),
])  # fmt: skip
def test_unsupported_scheduler_setting_is_named(key, value) -> None:
    cfg = {"_class_name": "DDPMScheduler", "num_train_timesteps": 20, key: value}
    with pytest.raises(DiffusersFormatError, match=key):
        scheduler_settings(cfg, "scheduler/scheduler_config.json")


def test_step_choice_settings_are_ignored() -> None:
    cfg = {"_class_name": "DDIMScheduler", "num_train_timesteps": 20, "timestep_spacing": "trailing",
           "steps_offset": 1, "set_alpha_to_one": False, "beta_schedule": "squaredcos_cap_v2"}
    assert scheduler_settings(cfg).diffusion.schedule == "cosine"


def test_bad_pipeline_folders_are_named(pipeline_folder: Path, capsys) -> None:
    index = json.loads((pipeline_folder / "model_index.json").read_text())
    (pipeline_folder / "model_index.json").write_text(json.dumps({**index, "vqvae": ["diffusers", "VQModel"]}))
    assert main(["info", str(pipeline_folder)]) == 2
    assert "vqvae" in capsys.readouterr().err
    (pipeline_folder / "model_index.json").write_text(json.dumps(index))
    cfg_path = pipeline_folder / "scheduler" / "scheduler_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "beta_schedule": "sigmoid"}))
    assert main(["sample", "-m", str(pipeline_folder), "-q"]) == 2
    err = capsys.readouterr().err
    assert "scheduler_config.json" in err and "beta_schedule" in err and len(err.strip().splitlines()) == 1
    assert main(["sample", "-m", str(pipeline_folder / "unet"), "-q"]) == 2
    assert "model_index.json" in capsys.readouterr().err  # a component folder: give the pipeline folder


# ---------------------------------------------------------------------------------------------- 2. -m everywhere
def test_cli_commands_take_a_diffusers_folder(pipeline_folder: Path, tmp_path: Path, capsys) -> None:
    m = ["-m", str(pipeline_folder)]
    assert main(["info", str(pipeline_folder)]) == 0
    out = capsys.readouterr().out
    assert "format:     diffusers" in out and "T=20 cosine output=eps" in out
    assert main(["sample", *m, "-n", "2", "--steps", "2", "-o", str(tmp_path / "s.png"), "-q"]) == 0
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "in.png")
    assert main(["vary", *m, str(tmp_path / "in.png"), "--t", "10", "--count", "2", "--steps", "3",
                 "-o", str(tmp_path / "v.png"), "-q"]) == 0
    assert main(["interpolate", *m, str(tmp_path / "in.png"), str(tmp_path / "in.png"), "--t", "10",
                 "--lambdas", "0,1", "-o", str(tmp_path / "i.png"), "-q"]) == 0
    assert main(["nll", *m, "--dataset", "shapes", "--max-images", "2", "--batch-size", "2", "-q",
                 "--json", str(tmp_path / "nll.json")]) == 0
    assert len(json.loads((tmp_path / "nll.json").read_text())["terms_bpd"]) == 20
    assert main(["nll", *m, "-q"]) == 2  # no dataset recorded: say so
    assert "--dataset" in capsys.readouterr().err


def test_eval_takes_a_diffusers_folder(pipeline_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.warns(UserWarning):  # the 16 px samples are converted to the 32 px reference
        assert main(["eval", str(pipeline_folder), "--dataset", "shapes", "--split", "test", "--num-real", "16",
                     "--num-samples", "4", "--steps", "2", "--metrics", "fid", "--stats-dir", str(tmp_path / "st"),
                     "--json", str(out / "e.json"), "--markdown", str(out / "e.md"), "--device", "cpu", "-q"]) == 0
    report = json.loads((out / "e.json").read_text())
    assert report["kind"] == "checkpoint" and report["report"]["fid"] >= 0


def test_resolve_model_records_the_source(pipeline_folder: Path) -> None:
    m = resolve_model(pipeline_folder)
    assert m.kind == "diffusers" and m.image_shape == (3, 16, 16) and m.data is None and m.null_class is None
    with pytest.raises(ValueError, match="openai-flags"):
        resolve_model(pipeline_folder, openai_flags="--image_size 32")
