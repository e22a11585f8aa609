"""`pakhsh export RUN OUT --format diffusers`: a DDPMPipeline folder that diffusers loads and that samples exactly
what pakhsh samples (same starting noise, same steps), for the UNet configs UNet2DModel can express."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("diffusers")

from diffusers import DDPMPipeline, UNet2DModel  # noqa: E402

from pakhsh.cli import main  # noqa: E402
from pakhsh.config import from_dict, to_dict  # noqa: E402
from pakhsh.interop.diffusers import (  # noqa: E402
    UnmappableError,
    ddpm_timesteps,
    diffusers_unet_config,
    to_diffusers_state_dict,
)
from pakhsh.nets.unet import UNet, UNetConfig  # noqa: E402
from pakhsh.pipelines import ImagePipeline, SampleSettings, resolve_model  # noqa: E402
from pakhsh.samplers import ancestral_sample  # noqa: E402
from pakhsh.training.experiment import ExperimentConfig  # noqa: E402
from tests.conftest import tiny_experiment  # noqa: E402


def randomized(net: UNet, seed: int = 0) -> UNet:
    """Random non-zero weights everywhere: ADM's zero-initialised convs would make every block the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.15)
    return net.eval()


def model_folder(folder: Path, **sections: dict) -> Path:
    """An exported pakhsh model folder (config.json + model.safetensors) with random weights."""
    cfg = from_dict(ExperimentConfig, tiny_experiment(**{"model": {"dropout": 0.0}, **sections}))
    net = randomized(UNet(cfg.model))
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(to_dict(cfg)))
    return folder


TINY = dict(image_size=8, model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
            dropout=0.0, num_groups=8, num_heads=2)


@pytest.mark.parametrize("extra", [
    {}, {"resblock_updown": True}, {"use_scale_shift_norm": False}, {"num_classes": 3},
    {"learn_sigma": True, "num_res_blocks": 2, "channel_mult": (1, 2, 2), "image_size": 16,
     "attention_resolutions": (8, 4), "num_head_channels": 8},
])  # fmt: skip
def test_unet2dmodel_computes_our_unet(extra: dict) -> None:
    net = randomized(UNet(UNetConfig(**{**TINY, **extra})))
    unet = UNet2DModel(**diffusers_unet_config(net)).eval()
    unet.load_state_dict(to_diffusers_state_dict(net), strict=True)
    size = net.cfg.image_size
    x, t = torch.randn(2, 3, size, size), torch.tensor([3, 41])
    y = None if net.cfg.num_classes is None else torch.tensor([0, 3])
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, class_labels=y).sample, net(x, t, y), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("diffusion", [
    {"num_steps": 50, "schedule": "cosine"},
    {"num_steps": 50, "schedule": "linear", "model_output": "v", "variance": "learned_range"},
])  # fmt: skip
def test_exported_ddpm_pipeline_samples_what_pakhsh_samples(tmp_path: Path, diffusion: dict) -> None:
    learned = diffusion.get("variance") == "learned_range"
    src = model_folder(tmp_path / "model", diffusion=diffusion, model={"dropout": 0.0, "learn_sigma": learned})
    out = tmp_path / "diffusers"
    assert main(["export", str(src), str(out), "--format", "diffusers"]) == 0
    assert {p.name for p in out.iterdir()} >= {"model_index.json", "unet", "scheduler"}

    pipe = DDPMPipeline.from_pretrained(str(out), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    steps = 5
    theirs = pipe(batch_size=2, num_inference_steps=steps, generator=torch.Generator().manual_seed(7),
                  output_type="np").images  # (2, H, W, C) in [0, 1]

    ours_pipe = ImagePipeline.from_pretrained(src, device="cpu")
    chain = ours_pipe.diffusion.respace(ddpm_timesteps(50, steps))  # DDPMScheduler's "leading" steps
    g = torch.Generator().manual_seed(7)
    x_T = torch.randn(2, 3, 8, 8, generator=g)  # the draws DDPMPipeline makes, in its order
    ours = ancestral_sample(chain, ours_pipe.model, x_T, generator=g)
    ours01 = ((ours.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    assert abs(ours01 - theirs).max() < 1e-4
    assert ours01.std() > 0.05  # not a trivially constant image


def test_export_refuses_what_unet2dmodel_cannot_express(tmp_path: Path, capsys) -> None:
    # 2 heads at both attention levels: 8 channels per head at 16 wide, 16 per head at 32 wide
    net = UNet(UNetConfig(**{**TINY, "attention_resolutions": (8, 4)}))
    with pytest.raises(UnmappableError, match="attention_head_dim"):
        diffusers_unet_config(net)
    src = model_folder(tmp_path / "model", model={"dropout": 0.0, "attention_resolutions": [8, 4], "num_heads": 2})
    assert main(["export", str(src), str(tmp_path / "out"), "--format", "diffusers"]) == 2
    err = capsys.readouterr().err
    assert "attention_head_dim" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "model_index.json").exists()


def test_shipped_models_map_exactly() -> None:
    """The shipped unconditional configs are ADM defaults: they must export without refusal (Palette models are
    refused by name: test_conditioned_nets_are_refused_by_name)."""
    from pakhsh.pipelines import shipped_models
    from pakhsh.pipelines.base import model_kind

    for name in shipped_models():
        if model_kind(name) != "image":  # Palette / latent / autoencoder: refused by name
            continue
        net = resolve_model(name).model
        unet = UNet2DModel(**diffusers_unet_config(net)).eval()
        unet.load_state_dict(to_diffusers_state_dict(net), strict=True)
        c = net.cfg
        x, t = torch.randn(1, c.in_channels, c.image_size, c.image_size), torch.tensor([500])
        with torch.no_grad():
            torch.testing.assert_close(unet(x, t).sample, net(x, t), rtol=1e-4, atol=1e-4)


def test_exported_class_conditional_folder_reads_back_with_its_null_class(tmp_path: Path) -> None:
    src = model_folder(tmp_path / "model", model={"dropout": 0.0, "num_classes": 6})
    assert main(["export", str(src), str(tmp_path / "out"), "--format", "diffusers"]) == 0
    m = resolve_model(tmp_path / "out")
    assert m.kind == "diffusers" and m.num_classes == 6 and m.null_class == 6
    assert m.class_names == ["circle", "square", "triangle", "star", "diamond", "cross"]  # shapes' names
    pipe = ImagePipeline(m, device="cpu")
    x = pipe.generate(2, SampleSettings("ddim", 2, guidance=2.0), labels="star", progress=False)  # guided
    assert x.shape == (2, 3, 8, 8)


def test_conditioned_nets_are_refused_by_name() -> None:
    from pakhsh.interop.diffusers import UnmappableError, diffusers_unet_config
    from pakhsh.nets.unet import UNet, UNetConfig

    small = dict(image_size=8, model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
                 num_groups=8)
    with pytest.raises(UnmappableError, match="model.cond_channels=4"):
        diffusers_unet_config(UNet(UNetConfig(cond_channels=4, **small)))
    with pytest.raises(UnmappableError, match="model.context_dim=16"):
        diffusers_unet_config(UNet(UNetConfig(context_dim=16, **small)))
