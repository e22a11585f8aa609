"""The unCLIP pipeline (pipelines/unclip.py) on the tiny runs of tests/unclip_fixtures.py: decoding is a function
of (seed, image index) only (determinism, batch independence), classifier-free guidance at 1 / 0 is the
conditional / null model for the prior (empty caption) and the decoder (zero embedding + empty caption),
interpolations decode A's and B's own embeddings at their ends with one shared noise, and mismatched or damaged
checkpoint parts are refused by name."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

import pakhsh.pipelines.unclip as unclip_mod
from pakhsh.data import DataConfig, build_dataset
from pakhsh.diffusion import DiffusionConfig, GaussianDiffusion
from pakhsh.nets.clip import scale_embedding
from pakhsh.nets.unet import UNet, UNetConfig
from pakhsh.pipelines.unclip import UnclipPipeline, UnclipSettings, _check_upsampler, decode_embeddings
from pakhsh.training.checkpoint import CheckpointError, export_model
from pakhsh.training.unclip import CLIP_FILE, load_clip
from tests.unclip_fixtures import (  # noqa: F401 (fixtures: pytest finds them by name here)
    EMBED_DIM,
    SIZE,
    _caption_cache,
    _one_thread,
    clip_b_run,
    clip_run,
    decoder_run,
    jitter,
    last_checkpoint,
    prior_b_run,
    prior_run,
)

FAST = UnclipSettings(prior_steps=3, decoder_steps=3, prior_candidates=1)
CAPTIONS = ["a large red circle at the top left on a gray background", "a small blue square at the center",
            "a green triangle at the bottom right"]


@pytest.fixture(scope="module")
def pipe(prior_run: Path, decoder_run: Path) -> UnclipPipeline:
    """Prior + decoder (no upsampler) with seeded noise on both nets' weights: a 4-step run has barely moved its
    zero-initialised output layers, so its conditions would hardly show (the identities hold for any weights)."""
    p = UnclipPipeline.from_pretrained(prior_run, decoder_run, None, device="cpu")
    jitter(p.decoder_net, seed=0)
    jitter(p.prior_net, 0.3, seed=1)
    return p


@pytest.fixture(scope="module")
def scenes() -> torch.Tensor:
    ds = build_dataset(DataConfig(name="shapes", split="test", image_size=SIZE, length=2))
    return torch.stack([ds[0]["image"], ds[1]["image"]])


def embeddings(pipe: UnclipPipeline, n: int = 3) -> torch.Tensor:
    return pipe.text_embeddings(CAPTIONS[:n])  # any scaled embeddings do for the decoder


# ------------------------------------------------------------------------------------------------ loading
def test_pipeline_loads_the_decoders_clip_and_text_encoder(pipe: UnclipPipeline, clip_run: Path) -> None:
    clip, cfg, _ = load_clip(clip_run)
    own = pipe.clip.state_dict()
    assert all(torch.equal(own[k], v) for k, v in clip.state_dict().items())
    assert pipe.text_encoder.config == cfg.condition.text
    assert pipe.image_size == SIZE and pipe.decoder_captions
    images = torch.zeros(2, 3, SIZE, SIZE)
    torch.testing.assert_close(pipe.image_embeddings(images), scale_embedding(clip.encode_image(images)))
    with pytest.raises(ValueError, match=r"images must be \(N, C, 16, 16\)"):
        pipe.image_embeddings(torch.zeros(1, 3, 32, 32))


# ------------------------------------------------------------------------------------------------ decoding
def test_decoding_is_deterministic_under_a_seed(pipe: UnclipPipeline) -> None:
    emb = embeddings(pipe)
    a = pipe.decode(emb, CAPTIONS, FAST, seed=3)
    assert a.shape == (3, 3, SIZE, SIZE) and a.min() >= -1 and a.max() <= 1
    torch.testing.assert_close(pipe.decode(emb, CAPTIONS, FAST, seed=3), a, rtol=0, atol=0)
    assert (pipe.decode(emb, CAPTIONS, FAST, seed=4) - a).abs().max() > 1e-2
    assert (a[0] - a[1]).abs().max() > 1e-2


def test_an_image_does_not_depend_on_its_batch(pipe: UnclipPipeline) -> None:
    emb = embeddings(pipe)
    together = pipe.decode(emb, CAPTIONS, FAST, seed=5)
    for i in range(3):
        alone = pipe.decode(emb[i:i + 1], CAPTIONS[i:i + 1], FAST, seed=5, first_index=i)
        torch.testing.assert_close(alone[0], together[i], rtol=0, atol=1e-4)  # batched convs round differently
    # ... and the whole system: captions one per batch == all in one batch
    one = pipe.generate(CAPTIONS, FAST, seed=2, progress=False, batch_size=1)
    three = pipe.generate(CAPTIONS, FAST, seed=2, progress=False, batch_size=3)
    torch.testing.assert_close(one, three, rtol=0, atol=1e-4)  # the prior's batched matmuls round differently
    assert one.shape == (3, 3, SIZE, SIZE)


def test_the_embedding_and_the_caption_change_the_image(pipe: UnclipPipeline) -> None:
    emb = embeddings(pipe, 2)
    s1 = UnclipSettings(decoder_steps=3, decoder_guidance=1.0)
    base = pipe.decode(emb[:1], CAPTIONS[:1], s1, seed=1)
    assert (pipe.decode(emb[1:2], CAPTIONS[:1], s1, seed=1) - base).abs().max() > 1e-2
    assert (pipe.decode(emb[:1], CAPTIONS[1:2], s1, seed=1) - base).abs().max() > 1e-2


def test_decoder_guidance_one_and_zero(pipe: UnclipPipeline) -> None:
    """Guidance 0 is the null branch: the zero embedding and the empty caption; guidance 1 the conditional net
    alone (the same images as the decoding without a guidance wrapper)."""
    emb = embeddings(pipe, 2)
    g = lambda s: UnclipSettings(decoder_steps=3, decoder_guidance=s)  # noqa: E731
    null = pipe.decode(torch.zeros(2, EMBED_DIM), ["", ""], g(1.0), seed=7)
    cond = pipe.decode(emb, CAPTIONS[:2], g(1.0), seed=7)
    assert (cond - null).abs().max() > 1e-2
    torch.testing.assert_close(pipe.decode(emb, CAPTIONS[:2], g(0.0), seed=7), null, rtol=0, atol=1e-4)
    # guidance 1 by hand: DDIM (eta 0) over the respaced chain, the decoder called with the embedding and caption
    from pakhsh.samplers import SAMPLERS
    from pakhsh.samplers.common import ImageGenerators

    tokens, mask = pipe._text(CAPTIONS[:2])
    gens = ImageGenerators.for_images(7, range(2))
    x_T = gens.randn(3, SIZE, SIZE)
    d = unclip_mod.chain(pipe.decoder_diffusion, "ddim", 3)
    with torch.no_grad():
        want = SAMPLERS["ddim"](d, pipe.decoder_net, x_T, cond={"image_embed": emb, "context": tokens,
                                                                 "context_mask": mask},
                                generator=gens, clip_denoised=True, eta=0.0)
    torch.testing.assert_close(cond, want.clamp(-1, 1), rtol=0, atol=1e-5)


def test_a_caption_decoder_without_embedding_tokens_still_gets_its_caption() -> None:
    """decode_embeddings hands the caption to any decoder with cross-attention (embed_tokens=0: the embedding only
    shifts the time embedding, the caption is the whole context)."""
    torch.manual_seed(0)
    net = UNet(UNetConfig(image_size=8, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                          attention_resolutions=(4,), num_heads=2, num_groups=8, dropout=0.0, context_dim=12,
                          embed_dim=4, embed_tokens=0)).eval()
    jitter(net)
    d = GaussianDiffusion.from_config(DiffusionConfig(num_steps=20, schedule="cosine"))
    g = torch.Generator().manual_seed(0)
    tokens, mask = torch.randn(2, 3, 12, generator=g), torch.ones(2, 3, dtype=torch.bool)
    null = {"context": torch.zeros(1, 3, 12), "context_mask": torch.ones(1, 3, dtype=torch.bool)}
    emb = torch.randn(2, 4, generator=g)
    a = decode_embeddings(net, d, emb, steps=2, guidance=2.0, context=(tokens, mask), null_context=null)
    b = decode_embeddings(net, d, emb, steps=2, guidance=2.0, context=(tokens * 2, mask), null_context=null)
    assert a.shape == (2, 3, 8, 8) and (a - b).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------ the prior
def test_prior_guidance_one_and_zero(pipe: UnclipPipeline) -> None:
    """One candidate (no selection): guidance 0 on a caption is the prior on the empty caption (its tokens and
    its CLIP text embedding) at guidance 1."""
    g = lambda s: UnclipSettings(prior_steps=3, prior_guidance=s, prior_candidates=1)  # noqa: E731
    null = pipe.sample_prior(["", ""], g(1.0), seed=4)
    cond = pipe.sample_prior(CAPTIONS[:2], g(1.0), seed=4)
    assert cond.shape == (2, EMBED_DIM)
    torch.testing.assert_close(cond.norm(dim=-1), torch.full((2,), EMBED_DIM ** 0.5))
    assert (cond - null).abs().max() > 1e-2
    torch.testing.assert_close(pipe.sample_prior(CAPTIONS[:2], g(0.0), seed=4), null, rtol=0, atol=1e-4)
    mid = pipe.sample_prior(CAPTIONS[:2], g(2.0), seed=4)
    assert (mid - cond).abs().max() > 1e-3


def test_more_candidates_keep_the_one_nearest_the_caption(pipe: UnclipPipeline) -> None:
    """Candidate 0 draws the same noise whatever the count; of k candidates the one most similar to the caption's
    text embedding is kept, so it is at least as similar as candidate 0 alone."""
    s = lambda k: UnclipSettings(prior_steps=3, prior_candidates=k)  # noqa: E731
    one = pipe.sample_prior(CAPTIONS, s(1), seed=6)
    torch.testing.assert_close(pipe.sample_prior(CAPTIONS, s(1), seed=6), one, rtol=0, atol=0)
    four = pipe.sample_prior(CAPTIONS, s(4), seed=6)
    text = pipe.text_embeddings(CAPTIONS)
    assert bool(((four * text).sum(-1) >= (one * text).sum(-1) - 1e-5).all())
    assert (four - one).abs().max() > 1e-3  # some caption found a nearer candidate


def test_sample_prior_needs_a_prior(decoder_run: Path) -> None:
    p = UnclipPipeline.from_pretrained(None, decoder_run, None, device="cpu")
    with pytest.raises(ValueError, match="no prior loaded"):
        p.sample_prior(["a red circle"])


# ------------------------------------------------------------------------------------------------ images in
def test_variations_decode_one_embedding_with_new_noise(pipe: UnclipPipeline, scenes: torch.Tensor) -> None:
    x = pipe.variations(scenes[:1], 3, FAST, seed=0)
    assert x.shape == (3, 3, SIZE, SIZE)
    assert (x[0] - x[1]).abs().max() > 1e-2
    emb = pipe.image_embeddings(scenes[:1]).expand(3, -1)
    torch.testing.assert_close(x, pipe.decode(emb, None, FAST, seed=0), rtol=0, atol=1e-6)


def test_interpolation_ends_on_the_embeddings_of_a_and_b(pipe: UnclipPipeline, scenes: torch.Tensor,
                                                         monkeypatch) -> None:
    seen = {}
    real = unclip_mod.decode_embeddings

    def spy(net, diffusion, image_embed, **kw):
        seen["emb"], seen["x_T"] = image_embed.clone(), kw["x_T"].clone()
        return real(net, diffusion, image_embed, **kw)

    monkeypatch.setattr(unclip_mod, "decode_embeddings", spy)
    a, b = scenes[:1], scenes[1:]
    x = pipe.interpolate(a, b, 4, FAST, seed=2)
    assert x.shape == (4, 3, SIZE, SIZE)
    ea, eb = pipe.image_embeddings(a), pipe.image_embeddings(b)
    assert (ea - eb).abs().max() > 1e-2
    emb = seen["emb"]
    torch.testing.assert_close(emb[0], ea[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(emb[-1], eb[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(emb.norm(dim=-1), torch.full((4,), EMBED_DIM ** 0.5))
    # the middle is on the great circle between them, in order: similarity to A falls, to B rises
    cos_a = torch.nn.functional.cosine_similarity(emb, ea.expand(4, -1))
    cos_b = torch.nn.functional.cosine_similarity(emb, eb.expand(4, -1))
    assert bool((cos_a.diff() < 0).all()) and bool((cos_b.diff() > 0).all())
    assert all(torch.equal(seen["x_T"][0], seen["x_T"][i]) for i in range(4))  # one noise for every image
    monkeypatch.undo()
    # the ends are what decoding A's and B's embeddings from that noise gives
    ends = pipe.decode(torch.cat([ea, eb]), None, FAST, seed=2, x_T=seen["x_T"][:2])
    torch.testing.assert_close(x[[0, -1]], ends, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="at least 2 images"):
        pipe.interpolate(a, b, 1, FAST)


# ------------------------------------------------------------------------------------------------ mismatched parts
def test_a_prior_and_a_decoder_on_different_clips_are_refused(prior_b_run: Path, decoder_run: Path) -> None:
    with pytest.raises(ValueError) as info:
        UnclipPipeline.from_pretrained(prior_b_run, decoder_run, None, device="cpu")
    msg = str(info.value)
    assert "different CLIPs" in msg and str(prior_b_run) in msg and str(decoder_run) in msg and "\n" not in msg


def test_parts_in_the_wrong_role_are_refused(prior_run: Path, decoder_run: Path) -> None:
    with pytest.raises(ValueError, match="is not an unCLIP decoder"):
        UnclipPipeline.from_pretrained(None, prior_run, None, device="cpu")
    with pytest.raises(ValueError, match="is not an unCLIP prior"):
        UnclipPipeline.from_pretrained(decoder_run, decoder_run, None, device="cpu")
    with pytest.raises(ValueError, match="is not a super-resolution model"):
        UnclipPipeline.from_pretrained(None, decoder_run, prior_run, device="cpu")
    with pytest.raises(FileNotFoundError, match="--decoder .*nope: no such folder"):
        UnclipPipeline.from_pretrained(None, Path("/nonexistent/nope"), None, device="cpu")


@pytest.fixture
def decoder_copy(decoder_run: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "step_0000004"
    shutil.copytree(last_checkpoint(decoder_run), folder)
    return folder


def test_a_clip_file_from_another_clip_is_refused(decoder_copy: Path, clip_b_run: Path) -> None:
    other, _, _ = load_clip(clip_b_run)  # same shapes, other weights
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(decoder_copy / CLIP_FILE))
    with pytest.raises(ValueError, match="not the CLIP this model was trained on .*fingerprint"):
        UnclipPipeline.from_pretrained(None, decoder_copy, None, device="cpu")


def test_a_damaged_or_missing_clip_file_is_refused(decoder_copy: Path, decoder_run: Path, tmp_path: Path) -> None:
    # in a checkpoint folder the manifest already names the damaged file
    (decoder_copy / CLIP_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=f"incomplete checkpoint: .*{CLIP_FILE} is 22 bytes"):
        UnclipPipeline.from_pretrained(None, decoder_copy, None, device="cpu")
    # an exported model (no manifest) carries its CLIP too and works; damaged, of another shape or missing, the
    # CLIP file is refused by name
    exported = export_model(decoder_run, tmp_path / "exported")
    assert (exported / CLIP_FILE).is_file() and not (exported / "manifest.json").exists()
    UnclipPipeline.from_pretrained(None, exported, None, device="cpu")
    (exported / CLIP_FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=f"{CLIP_FILE} is not a valid safetensors file"):
        UnclipPipeline.from_pretrained(None, exported, None, device="cpu")
    save_file({"image.proj.weight": torch.zeros(2, 2)}, str(exported / CLIP_FILE))
    with pytest.raises(CheckpointError, match="does not fit .*missing keys"):
        UnclipPipeline.from_pretrained(None, exported, None, device="cpu")
    (exported / CLIP_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=f"no {CLIP_FILE} beside the weights"):
        UnclipPipeline.from_pretrained(None, exported, None, device="cpu")


def _part(path: str, image_size: int, task: object) -> SimpleNamespace:
    return SimpleNamespace(path=Path(path), config=SimpleNamespace(model=SimpleNamespace(image_size=image_size),
                                                                   task=task))


def test_upsampler_checks() -> None:
    decoder = _part("dec", 16, None)
    _check_upsampler(_part("up", 32, SimpleNamespace(name="superres", scale=2)), decoder)  # 16 -> 32: fits
    with pytest.raises(ValueError, match="up is not a super-resolution model .*task None"):
        _check_upsampler(_part("up", 32, None), decoder)
    with pytest.raises(ValueError, match="is not a super-resolution model .*task inpaint"):
        _check_upsampler(_part("up", 32, SimpleNamespace(name="inpaint", scale=2)), decoder)
    with pytest.raises(ValueError, match="takes 32x32 images but the decoder dec makes 16x16"):
        _check_upsampler(_part("up", 64, SimpleNamespace(name="superres", scale=2)), decoder)


@pytest.mark.parametrize(("change", "needle"), [
    ({"prior_steps": 0}, "prior-steps"), ({"prior_candidates": 0}, "--candidates"),
    ({"decoder_guidance": -1.0}, "decoder-guidance"), ({"sampler": "euler"}, "unknown sampler"),
])
def test_bad_settings(change: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        UnclipSettings(**change)
