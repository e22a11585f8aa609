"""Tiny unCLIP runs shared by the unCLIP tests (tests/training/test_unclip_training.py,
tests/pipelines/test_unclip_pipeline.py, tests/e2e/test_unclip_cli.py): a CLIP, a prior and a decoder on 16x16
shapes scenes, each built once per pytest session (tests.training.test_autoencoder_training.shared_run) with the
shipped configs shrunk by `--set`, and never modified by a test.

- `tiny_clip_run`: 30 steps of `pakhsh train unclip_clip` on a fixed set of 16 captioned scenes (batch = the set);
- `tiny_clip_b_run`: another CLIP (another seed, 2 steps): a second embedding space;
- `tiny_prior_run` / `tiny_decoder_run`: 4 steps of `unclip_prior` / `unclip_decoder` on the first CLIP
  (checkpoints at steps 2 and 4; the decoder reads the caption too, as the shipped one does);
- `tiny_prior_b_run`: a 2-step prior on the second CLIP (the "mismatched parts" tests).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.training.test_autoencoder_training import shared_run, train
from tests.training.test_latent_training import _caption_cache  # noqa: F401 (re-exported: captions in the session cache)

COMMON = ["data.length=16", "data.image_size=16", "train.device=cpu", "train.mixed_precision=no",
          "train.log_every=1", "train.warmup_steps=1", "train.sample_every=0", "train.num_preview=2",
          "train.preview_steps=2"]
# a 2-stage conv image encoder (16 -> 8, flattened) and a 1-layer, 16-wide text head over 8 MiniLM tokens; 8-d space
CLIP_SETS = [*COMMON, "clip.image_size=16", "clip.widths=[8,16]", "clip.num_groups=4", "clip.embed_dim=8",
             "clip.text_width=16", "clip.text_layers=1", "clip.text_heads=2", "condition.text.max_length=8",
             "clip.max_text_tokens=8", "train.batch_size=16"]
CLIP_STEPS = 30
EMBED_DIM = 8
PRIOR_SETS = [*COMMON, "prior.embed_dim=8", "prior.width=16", "prior.depth=1", "prior.heads=2",
              "prior.max_text_tokens=8", "diffusion.num_steps=50", "train.batch_size=8", "train.save_every=2"]
# a 2-level 16-wide pixel UNet, cross-attention at 8x8 over the caption's 8 tokens + 2 embedding tokens
DECODER_SETS = [*COMMON, "model.image_size=16", "model.model_channels=16", "model.channel_mult=[1,2]",
                "model.attention_resolutions=[8]", "model.num_head_channels=16", "model.num_groups=8",
                "model.embed_dim=8", "model.embed_tokens=2", "diffusion.num_steps=50", "train.batch_size=8",
                "train.save_every=2"]
STEPS = 4  # prior and decoder
SIZE = 16


def clip_sets(*more: str) -> list[str]:
    return [*CLIP_SETS, *more]


def prior_sets(clip: Path, *more: str) -> list[str]:
    return [*PRIOR_SETS, f"unclip.clip={clip}", *more]


def decoder_sets(clip: Path, *more: str) -> list[str]:
    return [*DECODER_SETS, f"unclip.clip={clip}", *more]


def tiny_clip_run(factory: pytest.TempPathFactory) -> Path:
    def build(path: Path) -> None:
        assert train("unclip_clip", path, clip_sets(f"train.steps={CLIP_STEPS}", "train.save_every=15"),
                     "--overwrite") == 0

    return shared_run(factory, "unclip_clip", build)


def tiny_clip_b_run(factory: pytest.TempPathFactory) -> Path:
    def build(path: Path) -> None:
        assert train("unclip_clip", path, clip_sets("train.steps=2", "train.seed=1"), "--overwrite") == 0

    return shared_run(factory, "unclip_clip_b", build)


def tiny_prior_run(factory: pytest.TempPathFactory) -> Path:
    clip = tiny_clip_run(factory)

    def build(path: Path) -> None:
        assert train("unclip_prior", path, prior_sets(clip, f"train.steps={STEPS}"), "--overwrite") == 0

    return shared_run(factory, "unclip_prior", build)


def tiny_prior_b_run(factory: pytest.TempPathFactory) -> Path:
    clip = tiny_clip_b_run(factory)

    def build(path: Path) -> None:
        assert train("unclip_prior", path, prior_sets(clip, "train.steps=2"), "--overwrite") == 0

    return shared_run(factory, "unclip_prior_b", build)


def tiny_decoder_run(factory: pytest.TempPathFactory) -> Path:
    clip = tiny_clip_run(factory)

    def build(path: Path) -> None:
        assert train("unclip_decoder", path, decoder_sets(clip, f"train.steps={STEPS}"), "--overwrite") == 0

    return shared_run(factory, "unclip_decoder", build)


def last_checkpoint(run: Path, step: int = STEPS) -> Path:
    return run / "checkpoints" / f"step_{step:07d}"


def jitter(module: torch.nn.Module, std: float = 0.1, seed: int = 0) -> None:
    """Seeded noise on every weight, in place: a 4-step decoder has barely moved its zero-initialised output layer,
    so its embedding hardly changes the images; jittered, it does (the identities tested hold for any weights)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    """One torch thread (after conftest's two): the CPU is shared, and runs compared bit for bit use one."""
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_clip_run(tmp_path_factory)


@pytest.fixture(scope="module")
def clip_b_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_clip_b_run(tmp_path_factory)


@pytest.fixture(scope="module")
def prior_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_prior_run(tmp_path_factory)


@pytest.fixture(scope="module")
def prior_b_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_prior_b_run(tmp_path_factory)


@pytest.fixture(scope="module")
def decoder_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_decoder_run(tmp_path_factory)
