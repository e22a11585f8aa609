"""The shipped unCLIP on a fresh clone: `pakhsh unclip` runs all three modes with its defaults, the embedding round
trip keeps what the CLIP saw (variations show the source image's attributes far above chance), and a caption
reaches the image through the prior."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pakhsh.metrics.attributes import ATTRIBUTES, attribute_accuracy, load_attribute_net, parse_caption, \
    render_one_object
from pakhsh.pipelines import shipped_models
from pakhsh.pipelines.base import model_kind
from pakhsh.pipelines.unclip import UnclipPipeline, UnclipSettings
from tests.conftest import run_cli

FAST = UnclipSettings(prior_steps=10, decoder_steps=10, upsampler_steps=10)


@pytest.fixture(scope="module")
def pipe() -> UnclipPipeline:
    torch.set_num_threads(2)
    return UnclipPipeline.from_pretrained(device="cpu", upsampler=None)


def test_shipped_unclip_parts_are_listed_by_kind() -> None:
    names = set(shipped_models())
    assert {"unclip_clip", "unclip_prior", "unclip_decoder", "unclip_upsampler"} <= names
    assert model_kind("unclip_prior") == model_kind("unclip_decoder") == model_kind("unclip_clip") == "unclip"
    assert model_kind("unclip_upsampler") == "palette"  # a super-resolution Palette model, usable by `restore`


@pytest.mark.parametrize("mode", [["a small blue star at the center on a white background"],
                                  ["--variations", "data:3"], ["--interpolate", "data:6", "data:7"]])
def test_unclip_runs_from_the_shipped_models(mode: list[str], tmp_path: Path, capsys) -> None:
    out = tmp_path / "u.png"
    code, err = run_cli(["unclip", *mode, "-n", "2", "--prior-steps", "5", "--decoder-steps", "5",
                         "--upsampler-steps", "5", "--scale", "1", "-q", "-o", str(out)], capsys)
    assert code == 0, err
    tiles = {"a": 2, "-": 3}[mode[0][0]] if mode[0] != "--interpolate" else 4  # + the inputs shown
    assert np.asarray(Image.open(out)).shape == (64 + 4, tiles * 64 + 2 * (tiles + 1), 3)


def test_variations_keep_the_source_images_attributes(pipe: UnclipPipeline) -> None:
    """Encode -> decode with new noise: background and position (what the CLIP sees best) are kept in most
    variations, far above chance (10% and 11%) and far above the control that compares with another image."""
    u8, target = render_one_object("test", 12, pipe.image_size)
    real = u8.float() / 127.5 - 1
    targets = [dict(zip(ATTRIBUTES, t.tolist())) for t in target]
    x = pipe.variations(real[:1], 1, FAST)  # warm-up shape check
    assert x.shape == (1, 3, pipe.image_size, pipe.image_size)
    x = pipe.decode(pipe.image_embeddings(real), None, FAST, seed=0, upsample=False)
    net = load_attribute_net()
    kept = attribute_accuracy(net, x, targets)
    other = attribute_accuracy(net, x, targets[1:] + targets[:1])
    assert kept["background"] >= 0.75 and kept["position"] >= 0.5, kept
    assert kept["mean"] > other["mean"] + 0.3, (kept, other)


def test_a_caption_reaches_the_image_through_the_prior(pipe: UnclipPipeline) -> None:
    caption = "a large red circle at the top left on a gray background"
    x = pipe.generate([caption] * 4, FAST, seed=0, upsample=False, progress=False)
    acc = attribute_accuracy(load_attribute_net(), x, [parse_caption(caption)] * 4)
    assert acc["background"] >= 0.75 and acc["position"] >= 0.5, acc


def test_bf16_sampling_stays_close_to_fp32(pipe: UnclipPipeline, tmp_path: Path, capsys) -> None:
    """`bf16=True` (`--bf16`) autocasts the prior and decoder: the results move (so autocast reached the networks)
    but stay within bf16 rounding of the fp32 ones; CLIP and the text encoder stay fp32."""
    half = UnclipPipeline(pipe.prior, pipe.decoder, None, "cpu", bf16=True)
    caps = ["a small blue star at the center on a white background", "a large red circle at the top left"]
    e32, e16 = pipe.sample_prior(caps, FAST), half.sample_prior(caps, FAST)
    assert e16.dtype == torch.float32 and not torch.equal(e16, e32)
    assert torch.nn.functional.cosine_similarity(e16, e32).min() > 0.999
    x32, x16 = pipe.decode(e32, caps, FAST), half.decode(e32, caps, FAST)
    assert x16.dtype == torch.float32 and not torch.equal(x16, x32)
    assert (x16 - x32).abs().mean() < 0.02  # measured 0.002 (AMX CPU)
    torch.testing.assert_close(half.text_embeddings(caps), pipe.text_embeddings(caps))
    code, err = run_cli(["unclip", "--variations", "data:3", "--bf16", "-n", "2", "--decoder-steps", "3",
                         "--upsampler", "none", "-q", "-o", str(tmp_path / "v.png")], capsys)
    assert code == 0, err
