"""The shipped `dreambooth_demo` (t2i fine-tuned on the built-in demo subject): it is a latent model on the shipped
t2i exactly as it is now (same fingerprint), and "a sks star" in a new context gives the two-tone star there, closer
to the subject than what the base draws for the same prompt without the identifier."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pakhsh.data.builtin.shapes import COLOR_NAMES, POSITIONS
from pakhsh.data.builtin.subject import DEMO_PLACES, demo_subject
from pakhsh.metrics.attributes import load_attribute_net, predict_attributes
from pakhsh.pipelines import SampleSettings, shipped_models
from pakhsh.pipelines.base import model_kind, resolve_model_path
from pakhsh.pipelines.text_to_image import TextToImagePipeline

pytestmark = pytest.mark.skipif("dreambooth_demo" not in shipped_models(), reason="dreambooth_demo not shipped")
PROMPT = "a sks star at the bottom right on a red background"


def _crops(x: torch.Tensor, cell: str) -> torch.Tensor:
    """32x32 around a grid cell of 64x64 images."""
    row, col = divmod(POSITIONS.index(cell), 3)
    cx, cy = (0.2, 0.5, 0.8)[col] * 64, (0.2, 0.5, 0.8)[row] * 64
    x0, y0 = int(min(max(round(cx - 16), 0), 32)), int(min(max(round(cy - 16), 0), 32))
    return x[:, :, y0:y0 + 32, x0:x0 + 32]


def test_shipped_demo_is_a_dreambooth_model_on_the_shipped_t2i() -> None:
    from pakhsh.training.checkpoint import load_model, read_tensors
    from pakhsh.training.dreambooth_base import base_folder, weights_fingerprint

    assert model_kind("dreambooth_demo") == "latent"
    cfg = load_model(resolve_model_path("dreambooth_demo")).config
    db = cfg.dreambooth
    assert (db.base, db.token, db.class_noun, db.token_pieces) == ("t2i", "sks", "star", ["sk", "##s"])
    folder = base_folder("t2i")
    base = load_model(folder).model.state_dict()
    assert db.base_fingerprint == weights_fingerprint(base, read_tensors(folder / "autoencoder.safetensors"))


def test_shipped_demo_draws_the_subject_in_a_new_context() -> None:
    from pakhsh.training.unclip import load_clip

    torch.set_num_threads(1)  # the machine is shared: two threads can run 40x slower than one here
    settings = SampleSettings("ddim", 25, guidance=3.0)
    tuned = TextToImagePipeline.from_pretrained("dreambooth_demo", device="cpu")
    base = TextToImagePipeline.from_pretrained("t2i", device="cpu")
    x = tuned.generate([PROMPT] * 4, None, settings, seed=0, progress=False)
    y = base.generate([PROMPT.replace("sks ", "")] * 4, None, settings, seed=0, progress=False)
    pred = predict_attributes(load_attribute_net(), x)
    assert (pred["position"] == POSITIONS.index("bottom right")).sum() >= 3
    assert (pred["background"] == COLOR_NAMES.index("red")).sum() >= 3
    clip, _, _ = load_clip("unclip_clip")
    real = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 127.5 - 1
                        for im, _ in demo_subject("sks", 64)])
    real_crops = torch.cat([_crops(real[i:i + 1], p) for i, (p, _) in enumerate(DEMO_PLACES)])
    with torch.no_grad():
        ref = F.normalize(clip.encode_image(real_crops), dim=-1)
        sim = [float((F.normalize(clip.encode_image(_crops(z, "bottom right")), dim=-1) @ ref.t()).mean())
               for z in (x, y)]
    assert sim[0] > sim[1] + 0.1, sim  # the fine-tuned star looks like the subject; the base's does not
