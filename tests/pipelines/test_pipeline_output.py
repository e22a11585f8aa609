"""Calling a pipeline returns PIL images (as diffusers pipelines do); `generate` keeps returning tensors."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from pakhsh.pipelines import ImagePipeline, PipelineOutput, SampleSettings


@pytest.fixture(scope="module")
def pipe() -> ImagePipeline:
    return ImagePipeline.from_pretrained("shapes", device="cpu")


def test_call_returns_pil_images_and_the_tensor(pipe: ImagePipeline) -> None:
    out = pipe(2, sampler="ddim", steps=2, seed=5, progress=False)
    assert isinstance(out, PipelineOutput) and len(out.images) == 2
    assert all(isinstance(im, Image.Image) and im.size == (32, 32) and im.mode == "RGB" for im in out.images)
    x = pipe.generate(2, SampleSettings("ddim", 2), seed=5, progress=False)
    assert isinstance(x, torch.Tensor) and torch.equal(out.tensors, x)
    pixel = ((x[0, :, 0, 0] + 1) * 127.5).round().to(torch.uint8).tolist()
    assert list(out.images[0].getpixel((0, 0))) == pixel


def test_call_takes_settings_or_their_fields(pipe: ImagePipeline) -> None:
    a = pipe(1, SampleSettings("dpm++2m", 3), progress=False).tensors
    b = pipe(1, sampler="dpm++2m", steps=3, progress=False).tensors
    assert torch.equal(a, b)
    with pytest.raises(TypeError, match="stepz"):
        pipe(1, stepz=3)


def test_grey_models_give_mode_l_images() -> None:
    from pakhsh.pipelines import shipped_models

    if "fashion_mnist" not in shipped_models():
        pytest.skip("no shipped fashion_mnist model")
    out = ImagePipeline.from_pretrained("fashion_mnist", device="cpu")(1, steps=1, progress=False)
    assert out.images[0].mode == "L" and out.labels is None


def test_a_pakhsh_folder_whose_path_contains_class_name_is_not_taken_for_diffusers(tmp_path):
    from pakhsh.pipelines import resolve_model_path
    from pakhsh.pipelines.base import detect_source
    from pakhsh.training import export_model

    out = export_model(resolve_model_path("shapes"), tmp_path / "my_class_name_model")
    cfg = out / "config.json"
    cfg.write_text(cfg.read_text().replace('"name": "shapes"', '"name": "has _class_name in it"'))
    assert detect_source(out) == "pakhsh"
