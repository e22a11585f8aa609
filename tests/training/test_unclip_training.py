"""unCLIP training runs (`pakhsh train unclip_clip / unclip_prior / unclip_decoder`, shrunk by --set): the CLIP
learns (its contrastive loss falls on a fixed set, retrieval beats chance), the prior and the decoder train with
finite losses and carry the frozen CLIP (clip.safetensors + its fingerprint) in every checkpoint, resume is exact
(with the CLIP the checkpoint holds), condition dropout gives exactly each condition's null, and mismatched
configs are one-line errors naming the key.

The tiny runs come from tests/unclip_fixtures.py (built once per pytest session)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pakhsh.conditioning.text import TextEncoder
from pakhsh.data import build_dataset
from pakhsh.metrics.retrieval import retrieval_recall
from pakhsh.nets.clip import scale_embedding
from pakhsh.training.checkpoint import CheckpointError, read_config
from pakhsh.training.ema import rate_name
from pakhsh.training.experiment import load_experiment
from pakhsh.training.unclip import CLIP_FILE, clip_fingerprint, load_clip, start_unclip_system
from tests.conftest import run_cli
from tests.training.test_autoencoder_training import one_line, tensors_equal, train
from tests.unclip_fixtures import (  # noqa: F401 (fixtures: pytest finds them by name here)
    CLIP_STEPS,
    EMBED_DIM,
    STEPS,
    _caption_cache,
    _one_thread,
    clip_b_run,
    clip_run,
    clip_sets,
    decoder_run,
    decoder_sets,
    last_checkpoint,
    prior_run,
    prior_sets,
)

EMA_FILE = f"{rate_name(0.999)}.safetensors"  # the unclip configs: ema_rates [0.999]


def log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------ the CLIP
def test_clip_loss_falls_on_a_fixed_set(clip_run: Path) -> None:
    """Batch = the whole 16-scene set every step: the logged loss is the contrastive loss of that set."""
    losses = [r["loss"] for r in log(clip_run)]
    assert len(losses) == CLIP_STEPS and all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    assert losses[-1] < 0.5 * math.log(16)  # below the loss of embeddings that tell nothing apart


def test_clip_retrieves_its_training_pairs_above_chance(clip_run: Path) -> None:
    clip, cfg, _ = load_clip(clip_run)
    ds = build_dataset(cfg.data)
    images = torch.stack([ds[i]["image"] for i in range(len(ds))])
    enc = TextEncoder(cfg.condition.text)
    emb = enc.encode([ds[i]["caption"] for i in range(len(ds))])
    with torch.no_grad():
        r = retrieval_recall(clip.encode_image(images), clip.encode_text(emb.tokens, emb.mask), ks=(1, 5))
    assert r["t2i_R@5"] > 0.6 and r["i2t_R@5"] > 0.6  # chance: 5 / 16


def test_load_clip_gives_the_ema_weights_and_refuses_other_models(clip_run: Path, prior_run: Path,
                                                                   tmp_path: Path) -> None:
    clip, cfg, folder = load_clip(clip_run)
    assert folder == last_checkpoint(clip_run, CLIP_STEPS) and cfg.objective == "clip"
    assert tensors_equal(clip.state_dict(), load_file(str(folder / EMA_FILE)))
    assert not clip.training
    with pytest.raises(CheckpointError, match="is not a CLIP"):
        load_clip(prior_run)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_clip(tmp_path / "nope")


def test_fingerprint_is_the_weights(clip_run: Path, clip_b_run: Path) -> None:
    a, _, _ = load_clip(clip_run)
    again, _, _ = load_clip(clip_run)
    b, _, _ = load_clip(clip_b_run)
    assert clip_fingerprint(a) == clip_fingerprint(again)
    assert clip_fingerprint(a) != clip_fingerprint(b)
    with torch.no_grad():
        a.log_scale.add_(1e-3)  # any weight
    assert clip_fingerprint(a) != clip_fingerprint(again)
    assert len(clip_fingerprint(a)) == 16


# ------------------------------------------------------------------------------------------------ prior and decoder
@pytest.mark.parametrize("which", ["prior", "decoder"])
def test_runs_train_and_carry_the_clip_in_every_checkpoint(which: str, request, clip_run: Path) -> None:
    run = request.getfixturevalue(f"{which}_run")
    records = log(run)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in records)
    clip, clip_cfg, _ = load_clip(clip_run)
    ckpts = sorted((run / "checkpoints").glob("step_*"))
    assert [p.name for p in ckpts] == ["step_0000002", "step_0000004"]
    for folder in ckpts:
        assert tensors_equal(load_file(str(folder / CLIP_FILE)), clip.state_dict())
        trained = load_file(str(folder / "model.safetensors"))
        assert not any(k.startswith(("image.", "text.", "log_scale")) for k in trained)  # the trained net alone
        uc = read_config(folder).unclip
        assert uc.clip_fingerprint == clip_fingerprint(clip)
        assert uc.clip_config == clip.cfg and uc.text == clip_cfg.condition.text
    assert json.loads((run / "config.json").read_text())["unclip"]["clip_fingerprint"] == clip_fingerprint(clip)


def test_the_clip_run_itself_has_no_frozen_clip(clip_run: Path) -> None:
    folder = last_checkpoint(clip_run, CLIP_STEPS)
    assert not (folder / CLIP_FILE).exists()
    assert read_config(folder).unclip is None


@pytest.mark.parametrize("which", ["decoder", "prior"])
def test_resume_is_exact_with_the_checkpoints_clip(which: str, request, clip_run: Path, tmp_path: Path) -> None:
    """2 steps, then --resume to 4 == 4 straight steps; the resumed run reads the CLIP from its checkpoint: the
    CLIP folder it was started with is gone by then."""
    straight = request.getfixturevalue(f"{which}_run")
    sets = decoder_sets if which == "decoder" else prior_sets
    clip_copy = tmp_path / "clip_copy"
    shutil.copytree(clip_run, clip_copy)
    run = tmp_path / "split"
    assert train(f"unclip_{which}", run, sets(clip_copy, "train.steps=2")) == 0
    shutil.rmtree(clip_copy)
    assert train(f"unclip_{which}", run, sets(clip_copy, f"train.steps={STEPS}"), "--resume") == 0
    for name in ("model.safetensors", EMA_FILE, CLIP_FILE):
        a = load_file(str(last_checkpoint(straight) / name))
        b = load_file(str(last_checkpoint(run) / name))
        assert tensors_equal(a, b), name
    assert [r["loss"] for r in log(run)] == [r["loss"] for r in log(straight)]


# ------------------------------------------------------------------------------------------------ condition dropout
def _system(run: Path, step: int = STEPS):
    """The run's frozen parts and caches as its checkpoint at `step` rebuilds them, and its dataset."""
    cfg = read_config(last_checkpoint(run, step))
    ds = build_dataset(cfg.data)
    return start_unclip_system(cfg, ds, torch.device("cpu"), last_checkpoint(run, step), progress=False)[0], ds


@pytest.fixture(scope="module")
def prior_system(prior_run: Path):
    return _system(prior_run)


@pytest.fixture(scope="module")
def decoder_system(decoder_run: Path):
    return _system(decoder_run)


def test_prior_dropout_gives_the_empty_captions_tokens_and_text_embedding(prior_system, clip_run: Path) -> None:
    system, ds = prior_system
    p = system.cfg.unclip.text_dropout
    assert 0 < p < 0.999
    idx = [0, 1, 2]
    u = torch.tensor([[0.0, 0.999, 0.999], [0.999, 0.0, 0.0], [p, 0.5, 0.5]])  # drop; keep; at the threshold: keep
    cond = system.conditions({"index": torch.tensor(idx)}, u)
    assert set(cond) == {"context", "context_mask", "text_embed"}

    clip, _, _ = load_clip(clip_run)  # built here, not taken from the system
    enc = TextEncoder(system.cfg.unclip.text)
    null = enc.encode([""])
    with torch.no_grad():
        null_embed = scale_embedding(clip.encode_text(null.tokens.float(), null.mask))
    assert torch.equal(cond["context"][0], null.tokens[0].float())
    assert torch.equal(cond["context_mask"][0], null.mask[0])
    torch.testing.assert_close(cond["text_embed"][0], null_embed[0], rtol=0, atol=1e-6)

    kept = [1, 2]
    own = enc.encode([ds[i]["caption"] for i in kept])
    assert torch.equal(cond["context_mask"][kept], own.mask)
    torch.testing.assert_close(cond["context"][kept], own.tokens.float(), rtol=2e-3, atol=2e-3)  # fp16 cache
    with torch.no_grad():
        own_embed = scale_embedding(clip.encode_text(cond["context"][kept], cond["context_mask"][kept]))
    torch.testing.assert_close(cond["text_embed"][kept], own_embed, rtol=0, atol=1e-5)
    torch.testing.assert_close(cond["text_embed"].norm(dim=-1), torch.full((3,), EMBED_DIM ** 0.5))
    assert (cond["text_embed"][1] - null_embed[0]).abs().max() > 1e-3

    # x_0 of the prior: the scaled CLIP image embeddings of the training images
    x0 = system.latents({"index": torch.tensor(idx), "image": torch.zeros(3, 3, 16, 16)})
    with torch.no_grad():
        want = scale_embedding(clip.encode_image(torch.stack([ds[i]["image"] for i in idx])))
    torch.testing.assert_close(x0, want, rtol=0, atol=1e-5)


def test_decoder_dropout_gives_the_zero_embedding_and_the_empty_caption(decoder_system, clip_run: Path) -> None:
    system, ds = decoder_system
    uc = system.cfg.unclip
    assert uc.caption and 0 < uc.text_dropout < 0.999 and 0 < uc.embed_dropout < 0.999
    idx = [3, 4, 5, 6, 7]
    # row 0: caption dropped; 1: embedding dropped; 2: both; 3: neither; 4: both at their thresholds (kept)
    u = torch.tensor([[0.0, 0.999, 0.5], [0.999, 0.0, 0.5], [0.0, 0.0, 0.5], [0.999, 0.999, 0.5],
                      [uc.text_dropout, uc.embed_dropout, 0.5]])
    cond = system.conditions({"index": torch.tensor(idx)}, u)
    assert set(cond) == {"context", "context_mask", "image_embed"}

    clip, _, _ = load_clip(clip_run)
    with torch.no_grad():
        emb = scale_embedding(clip.encode_image(torch.stack([ds[i]["image"] for i in idx])))
    assert torch.equal(cond["image_embed"][[1, 2]], torch.zeros(2, EMBED_DIM))
    torch.testing.assert_close(cond["image_embed"][[0, 3, 4]], emb[[0, 3, 4]], rtol=0, atol=1e-5)

    enc = TextEncoder(uc.text)
    null = enc.encode([""])
    for r in (0, 2):
        assert torch.equal(cond["context"][r], null.tokens[0].float())
        assert torch.equal(cond["context_mask"][r], null.mask[0])
    own = enc.encode([ds[i]["caption"] for i in idx])
    for r in (1, 3, 4):
        torch.testing.assert_close(cond["context"][r], own.tokens[r].float(), rtol=2e-3, atol=2e-3)
        assert torch.equal(cond["context_mask"][r], own.mask[r])
        assert (cond["context"][r] - null.tokens[0]).abs().max() > 1e-2

    # x_0 of the decoder: the batch's images themselves
    images = torch.stack([ds[i]["image"] for i in idx])
    assert torch.equal(system.latents({"index": torch.tensor(idx), "image": images}), images)


# ------------------------------------------------------------------------------------------------ config errors
def _value_error(config: str, overrides: list[str], *needles: str) -> str:
    with pytest.raises(ValueError) as info:
        load_experiment(config, overrides)
    msg = str(info.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


@pytest.mark.parametrize(("config", "overrides", "needles"), [
    ("unclip_prior", ["diffusion.model_output=eps"], ["objective=prior", "diffusion.model_output=x0"]),
    ("unclip_prior", ["diffusion.model_output=v"], ["diffusion.model_output=x0"]),
    ("unclip_prior", ["diffusion.variance=learned_range"], ["diffusion.variance=learned_range"]),
    ("unclip_prior", ["unclip=null"], ["objective=prior needs", "unclip: section"]),
    ("unclip_prior", ["clip.embed_dim=8"], ["a clip: section is only for objective=clip"]),
    ("unclip_decoder", ["model.embed_dim=null"], ["model.embed_dim"]),
    ("unclip_decoder", ["clip.embed_dim=8"], ["a clip: section is only for objective=clip"]),
    ("unclip_decoder", ["prior.width=16"], ["a prior: section is only for objective=prior"]),
    ("unclip_decoder", ["model.context_dim=null", "model.embed_tokens=0"],
     ["unclip.caption=true", "model.context_dim"]),
    ("unclip_decoder", ["unclip.embed_dropout=1"], ["unclip.embed_dropout"]),
    ("unclip_decoder", ["unclip.text_dropout=-0.1"], ["unclip.text_dropout"]),
    ("unclip_decoder", ["objective=regression"], ["unclip:", "objective=diffusion"]),
    ("unclip_clip", ["condition.text=null"], ["objective=clip needs condition.text"]),
    ("unclip_clip", ["clip=null"], ["objective=clip needs a clip: section"]),
    ("unclip_clip", ["unclip.clip=unclip_clip"], ["objective=clip trains the CLIP alone"]),
    ("unclip_clip", ["clip.max_text_tokens=16"], ["clip.max_text_tokens=16", "condition.text.max_length=32"]),
    ("shapes", ["prior.width=16"], ["a prior: section is only for objective=prior"]),
])
def test_config_errors_are_one_line_and_name_the_key(config: str, overrides: list[str], needles: list[str]) -> None:
    _value_error(config, overrides, *needles)


@pytest.mark.parametrize(("which", "overrides", "needles"), [
    ("decoder", ["data.image_size=32", "model.image_size=32", "model.attention_resolutions=[16]"],
     ["data.image_size=32", "set data.image_size=16"]),
    ("prior", ["data.image_size=32"], ["data.image_size=32", "set data.image_size=16"]),
    ("prior", ["prior.embed_dim=16"], ["prior.embed_dim=16", "set prior.embed_dim=8"]),
    ("decoder", ["model.embed_dim=16"], ["model.embed_dim=16", "set model.embed_dim=8"]),
    ("prior", ["prior.text_dim=100"], ["prior.text_dim=100", "set prior.text_dim=384"]),
    ("decoder", ["model.context_dim=100"], ["model.context_dim=100", "set model.context_dim=384"]),
    ("decoder", ["data.crop=random"], ["data.crop=center"]),
    ("prior", ["prior.max_text_tokens=4"], ["prior.max_text_tokens=4", "set prior.max_text_tokens=8"]),
    ("decoder", ["unclip.caption=false", "model.embed_tokens=0"], ["model.context_dim=384", "nothing is cross-att"]),
])
def test_runs_that_do_not_fit_their_clip_fail_in_one_line(which: str, overrides: list[str], needles: list[str],
                                                           clip_run: Path, tmp_path: Path, capsys) -> None:
    sets = (decoder_sets if which == "decoder" else prior_sets)(clip_run, "train.steps=1", *overrides)
    out = tmp_path / "r"
    code, err = run_cli(["--threads", "1", "train", f"unclip_{which}", "--out", str(out), "-q",
                         *[a for s in sets for a in ("--set", s)]], capsys)
    assert code == 2, err
    one_line(err, *needles)
    assert not (out / "checkpoints").exists()


@pytest.mark.parametrize("spec", ["prior", "missing"])
def test_unclip_clip_must_be_a_clip(spec: str, prior_run: Path, tmp_path: Path, capsys) -> None:
    target = prior_run if spec == "prior" else tmp_path / "nope"
    needle = "is not a CLIP" if spec == "prior" else "no such folder"
    code, err = run_cli(["--threads", "1", "train", "unclip_decoder", "--out", str(tmp_path / "r"), "-q",
                         *[a for s in decoder_sets(target, "train.steps=1") for a in ("--set", s)]], capsys)
    assert code == 2, err
    one_line(err, needle)


def test_clip_text_dim_must_fit_the_text_encoder(tmp_path: Path, capsys) -> None:
    code, err = run_cli(["--threads", "1", "train", "unclip_clip", "--out", str(tmp_path / "r"), "-q",
                         *[a for s in clip_sets("train.steps=1", "clip.text_dim=100") for a in ("--set", s)]], capsys)
    assert code == 2, err
    one_line(err, "clip.text_dim=100", "set clip.text_dim=384")


def test_clip_refuses_micro_batches(tmp_path: Path, capsys) -> None:
    """The contrastive loss takes the rest of the batch as negatives: accumulating micro-batches would change
    the objective, so it is refused before any work, not trained silently."""
    code, err = run_cli(["--threads", "1", "train", "unclip_clip", "--out", str(tmp_path / "r"), "-q",
                         *[a for s in clip_sets("train.steps=1", "train.grad_accum=2") for a in ("--set", s)]],
                        capsys)
    assert code == 2, err
    one_line(err, "objective=clip", "train.grad_accum=1", "negatives")
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_resume_refuses_a_checkpoint_whose_clip_was_replaced(prior_run: Path, clip_b_run: Path, tmp_path: Path,
                                                             capsys) -> None:
    """The resumed run reads the CLIP from its checkpoint: weights of another CLIP there (same shapes, so the
    manifest's sizes agree) would silently change the embedding space mid-run; the fingerprint refuses them."""
    from safetensors.torch import save_file

    run = tmp_path / "run"
    shutil.copytree(prior_run, run)
    (run / "train.lock").unlink(missing_ok=True)
    other, _, _ = load_clip(clip_b_run)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(last_checkpoint(run) / CLIP_FILE))
    code, err = run_cli(["--threads", "1", "train", "unclip_prior", "--out", str(run), "-q", "--resume",
                         *[a for s in prior_sets(clip_b_run, "train.steps=6") for a in ("--set", s)]], capsys)
    assert code == 2, err
    one_line(err, CLIP_FILE, "not the CLIP this model was trained on")


def test_a_decoder_on_the_embedding_alone(clip_run: Path, tmp_path: Path) -> None:
    """unclip.caption=false: the decoder reads the image embedding only (its tokens are the whole cross-attention
    context); its conditions hold no caption and the pipeline decodes it without one."""
    from pakhsh.pipelines.unclip import UnclipPipeline, UnclipSettings

    run = tmp_path / "dec"
    assert train("unclip_decoder", run, decoder_sets(clip_run, "train.steps=2", "unclip.caption=false")) == 0
    assert all(math.isfinite(r["loss"]) for r in log(run))
    system, _ = _system(run, 2)
    cond = system.conditions({"index": torch.tensor([0, 1])}, torch.tensor([[0.0, 0.0, 0.0], [0.999, 0.999, 0.0]]))
    assert set(cond) == {"image_embed"}
    assert not cond["image_embed"][0].any() and cond["image_embed"][1].any()
    pipe = UnclipPipeline.from_pretrained(None, run, None, device="cpu")
    assert not pipe.decoder_captions
    x = pipe.variations(torch.zeros(1, 3, 16, 16), 2, UnclipSettings(decoder_steps=2))
    assert x.shape == (2, 3, 16, 16) and torch.isfinite(x).all()
