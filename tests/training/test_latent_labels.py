"""Class labels as a latent model's condition: trained with the null class dropped in, sampled with --label."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pakhsh.pipelines import SampleSettings
from pakhsh.pipelines.text_to_image import TextToImagePipeline
from tests.conftest import run_cli
from tests.training.test_autoencoder_training import tiny_autoencoder_run, train
from tests.training.test_latent_training import T2I_SETS, jitter_unet

LABEL_ONLY = ["condition=null", "model.context_dim=null", "model.cond_channels=0", "model.layout_classes=null",
              "model.num_classes=6", "train.steps=2"]


@pytest.fixture(scope="module")
def label_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    ae = tiny_autoencoder_run(tmp_path_factory)
    out = tmp_path_factory.mktemp("label_run")
    assert train("t2i", out, [*T2I_SETS, f"latent.autoencoder={ae}", *LABEL_ONLY], "--overwrite") == 0
    return out


def _pipe(run: Path) -> TextToImagePipeline:
    pipe = TextToImagePipeline.from_pretrained(run, device="cpu")
    jitter_unet(pipe.unet)  # a 2-step model barely reads its label; any weights show the plumbing
    return pipe


def test_labels_reach_the_model_and_guidance_zero_is_the_null_class(label_run: Path) -> None:
    pipe = _pipe(label_run)
    s = SampleSettings("ddim", 3, guidance=1.0)
    star = pipe.generate([""] * 2, None, s, labels=torch.tensor([3, 3]), progress=False)
    circle = pipe.generate([""] * 2, None, s, labels=torch.tensor([0, 0]), progress=False)
    null = pipe.generate([""] * 2, None, s, labels=torch.tensor([6, 6]), progress=False)
    assert (star - circle).abs().max() > 1e-3  # the label changes the image
    unguided = pipe.generate([""] * 2, None, SampleSettings("ddim", 3, guidance=0.0), labels=torch.tensor([3, 3]),
                             progress=False)
    torch.testing.assert_close(unguided, null, atol=1e-5, rtol=0)  # scale 0 = the null class alone
    default = pipe.generate([""] * 2, None, s, progress=False)
    torch.testing.assert_close(default, null, atol=1e-5, rtol=0)  # no label given = the null class


def test_label_flag_and_its_errors(label_run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "star.png"
    code, err = run_cli(["generate", "--label", "star", "-m", str(label_run), "--steps", "2", "-q", "-o", str(out)],
                        capsys)
    assert code == 0 and out.is_file(), err
    code, err = run_cli(["generate", "--label", "dog", "-m", str(label_run), "--steps", "2", "-q", "-o",
                         str(tmp_path / "x.png")], capsys)
    assert code == 2 and "--label dog: not a class of this model (circle, square" in err and err.count("\n") == 1
    code, err = run_cli(["generate", "a red circle", "-m", str(label_run), "--steps", "2", "-q", "-o",
                         str(tmp_path / "y.png")], capsys)
    assert code == 2 and "takes no text (it is conditioned on a class label)" in err
