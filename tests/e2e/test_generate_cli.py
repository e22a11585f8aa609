"""`pakhsh generate` on a local Stable Diffusion folder: the CLI writes what TextToImagePipeline makes, and bad
inputs are one line before any model loads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from pakhsh.cli import main  # noqa: E402
from pakhsh.pipelines import SampleSettings  # noqa: E402
from pakhsh.pipelines.text_to_image import TextToImagePipeline  # noqa: E402
from tests.interop.test_stable_diffusion import SD_DDIM, _pipeline  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    f = tmp_path_factory.mktemp("gen") / "tiny-sd"
    _pipeline(SD_DDIM).save_pretrained(str(f), safe_serialization=True)
    return f


def test_generate_writes_the_pipeline_images(folder: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    out = tmp_path / "g.png"
    assert main(["generate", "a red circle", "a blue square", "-m", str(folder), "-n", "2", "--steps", "3",
                 "--guidance", "3", "--seed", "5", "--scale", "1", "-q", "-o", str(out)]) == 0
    grid = np.asarray(Image.open(out).convert("RGB"))
    pipe = TextToImagePipeline.from_pretrained(folder, device="cpu")
    x = pipe.generate(["a red circle", "a red circle", "a blue square", "a blue square"], None,
                      SampleSettings("ddim", 3, guidance=3.0), seed=5, progress=False)
    h, w = x.shape[2:]
    assert grid.shape == (2 * (h + 2) + 2, 2 * (w + 2) + 2, 3)  # a row per prompt, --num images per row
    second_row_first = grid[h + 4 : 2 * h + 4, 2 : w + 2]
    want = ((x[2].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    assert np.abs(second_row_first.astype(int) - want.astype(int)).max() <= 1


def test_bad_inputs_are_one_line(tmp_path: Path, capsys) -> None:
    assert main(["generate", "x", "-m", str(tmp_path / "nope"), "-o", str(tmp_path / "a.png")]) == 2
    assert f"no model at {str(tmp_path / 'nope')!r}" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["generate", "x", "-m", str(tmp_path / "empty"), "-o", str(tmp_path / "a.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pakhsh generate: error:") and err.count("\n") == 1
    assert main(["generate", "x", "-m", str(tmp_path / "empty"), "-o", str(tmp_path / "a.xyz")]) == 2
    assert "unknown image type" in capsys.readouterr().err
    assert not list(tmp_path.glob("a.*"))
