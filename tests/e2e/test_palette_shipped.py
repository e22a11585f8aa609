"""The shipped Palette models: they run from a fresh clone, and commands meant for other models say what to use."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pakhsh.cli import main
from pakhsh.pipelines import shipped_models


@pytest.mark.parametrize("model", ["palette", "palette_regression"])
def test_sampling_a_palette_model_points_to_restore(model, tmp_path, capsys) -> None:
    assert model in shipped_models()
    assert main(["sample", "-m", model, "-n", "2", "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "is an image-to-image (Palette, multi) model" in err and "pakhsh restore" in err
    assert not (tmp_path / "x.png").exists()


def test_info_names_the_task(capsys) -> None:
    assert main(["info", "palette_regression"]) == 0
    assert "task:       multi (regression baseline, one pass;" in capsys.readouterr().out


def test_shipped_regression_restores_known_pixels_exactly(tmp_path) -> None:
    out = tmp_path / "r.png"
    assert main(["restore", "data:5", "--task", "inpaint", "--mask", "center", "-m", "palette_regression",
                 "--scale", "1", "-q", "-o", str(out)]) == 0
    row = np.asarray(Image.open(out).convert("RGB"))  # [input | output] tiles of 32 with a 2-px frame
    given, made = row[2:34, 2:34], row[2:34, 36:68]
    keep = np.ones((32, 32), dtype=bool)
    keep[8:24, 8:24] = False  # the centre mask: half of each side
    assert (given[keep] == made[keep]).all() and not (made[~keep] == 128).all()


@pytest.mark.parametrize("model", ["palette", "palette_regression"])
def test_shipped_models_keep_the_colours_of_a_jpeg_input(model) -> None:
    """JPEG restoration must not re-colour the scene (an eps-trained palette did: see its model card)."""
    import torch

    from pakhsh.data.builtin.shapes import ShapesDataset
    from pakhsh.pipelines import SampleSettings
    from pakhsh.pipelines.palette import PalettePipeline

    torch.set_num_threads(1)
    pipe = PalettePipeline.from_pretrained(model, device="cpu")
    ds = ShapesDataset(split="test", size=32, length=8)
    x0 = torch.stack([ds[i]["image"] for i in range(8)])
    cond = pipe.prepare(x0, "jpeg", quality=10)
    out = pipe.restore(cond, SampleSettings("sde-dpm++2m", 10), progress=False)
    colour_error = (out.mean(dim=(2, 3)) - x0.mean(dim=(2, 3))).abs().mean()
    assert colour_error < 0.1, float(colour_error)  # v model 0.05; the eps-trained one of the model card 0.62
    assert (out - x0).abs().mean() < (cond["cond_image"] - x0).abs().mean() + 0.05
