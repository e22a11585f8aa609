"""DreamBooth on the one trainer (training/dreambooth.py), on the tiny text + map + layout latent run of
test_latent_training as the base: the prior-preservation batch holds B subject and B class examples and its loss is
exactly L_subject + lambda L_prior, the run starts from the base's EMA weights, class images are cached, a token the
tokenizer splits into pieces works, prompts without the token are refused (captions) or noticed (generation), LoRA
adapters round-trip through diffusers' layout into a fresh base (and into diffusers' own UNet), and resume is exact.

`dreambooth_run` (full fine-tuning) and `lora_run` are built once per session (`shared_run`) and shared with
tests/e2e/test_dreambooth_cli.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pakhsh.cli import main
from pakhsh.conditioning.text import TextEncoder
from pakhsh.data.builtin.subject import DEMO_PLACES, demo_subject, write_demo_subject
from pakhsh.diffusion import training_losses
from pakhsh.training import Trainer
from pakhsh.training.checkpoint import load_model, read_config
from pakhsh.training.dreambooth import dreambooth_config, dreambooth_losses
from pakhsh.training.dreambooth_base import DreamBoothError, load_base_unet, load_lora
from pakhsh.training.dreambooth_data import class_images, token_notice
from pakhsh.training.experiment import DreamBoothConfig
from pakhsh.training.lora import LORA_FILE, is_lora_key
from pakhsh.training.loader import GlobalBatchSampler, make_loader
from pakhsh.training.objectives import Draws
from tests.conftest import run_cli
from tests.training.test_autoencoder_training import one_line, shared_run, tensors_equal
from tests.training.test_latent_training import (  # noqa: F401 (fixtures: pytest finds them by name here)
    _caption_cache,
    _one_thread,
    tiny_t2i_run,
)

TOKEN = "zwx"  # MiniLM splits it into three pieces: z ##w ##x
SIZE = 16  # the tiny base's images (4x4 latents)
RUN_SETS = ["train.device=cpu", "train.mixed_precision=no", "train.num_preview=1", "train.log_every=1",
            "train.save_every=2", "train.warmup_steps=1", "dreambooth.class_steps=2"]
EMA = "ema_0.99.safetensors"


def base_of(factory: pytest.TempPathFactory) -> Path:
    return tiny_t2i_run(factory) / "checkpoints" / "step_0000004"


def subject_of(factory: pytest.TempPathFactory, token: str = TOKEN) -> Path:
    path = factory.getbasetemp() / "pakhsh-shared-runs" / f"subject_{token}"
    if not path.is_dir():
        write_demo_subject(path, token, SIZE)
    return path


def dreambooth(base: Path, subject: Path, out: Path, *extra: str, steps: int = 4, token: str = TOKEN) -> int:
    """`pakhsh dreambooth` on the tiny base: 4 class images, batch 2."""
    argv = ["--threads", "1", "dreambooth", "--subject", str(subject), "--class-noun", "star", "--token", token,
            "-m", str(base), "--out", str(out), "--class-images", "4", "--batch-size", "2", "--steps", str(steps),
            "-q"]
    for s in RUN_SETS:
        argv += ["--set", s]
    return main([*argv, *extra])


def tiny_dreambooth_run(factory: pytest.TempPathFactory) -> Path:
    """Full fine-tuning with prior preservation and a learnt token embedding, 4 steps (checkpoints at 2 and 4); a
    large learning rate, so that the model moves away from the base."""
    base, subject = base_of(factory), subject_of(factory)
    return shared_run(factory, "dreambooth", lambda path: _ok(dreambooth(base, subject, path, "--overwrite",
                                                                         "--lr", "0.01", "--train-token")))


def tiny_lora_run(factory: pytest.TempPathFactory) -> Path:
    """LoRA rank 2 and the token's input embedding (a large learning rate, so both move), 2 steps, adapters and
    embedding in RUN/lora."""
    base, subject = base_of(factory), subject_of(factory)
    return shared_run(factory, "dreambooth_lora", lambda path: _ok(dreambooth(
        base, subject, path, "--overwrite", "--lora", "2", "--train-token", "--lr", "0.05", steps=2)))


def _ok(code: int) -> None:
    assert code == 0


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return base_of(tmp_path_factory)


@pytest.fixture(scope="module")
def subject(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return subject_of(tmp_path_factory)


@pytest.fixture(scope="module")
def dreambooth_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_dreambooth_run(tmp_path_factory)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_lora_run(tmp_path_factory)


def config(base: Path, subject: Path, out: Path, *more: str, prior_weight: float = 1.0, lora: int | None = None,
           batch_size: int = 2):
    db = DreamBoothConfig(base=str(base), token=TOKEN, class_noun="star", class_images=4 if prior_weight else 0,
                          prior_weight=prior_weight, lora_rank=lora)
    return dreambooth_config(str(base), subject, out, db, steps=4, batch_size=batch_size,
                             overrides=[*RUN_SETS, *more])


@pytest.fixture(scope="module")
def trainer(base: Path, subject: Path, tmp_path_factory: pytest.TempPathFactory) -> Trainer:
    """A DreamBooth trainer set up (frozen parts, encoded images, net at the base's weights) but not run."""
    t = Trainer(config(base, subject, tmp_path_factory.mktemp("db") / "run"), progress=False)
    t.lock.release()
    return t


def first_batches(t: Trainer, n: int) -> list[dict]:
    data = t.system.training_view(t.dataset)
    tc = t.cfg.train
    loader = make_loader(data, GlobalBatchSampler(len(data), tc.batch_size, 0, 1, tc.seed, 0), 0, torch.device("cpu"))
    it = iter(loader)
    return [next(it) for _ in range(n)]


# ------------------------------------------------------------------------------------------------ batches, loss
def test_every_batch_holds_b_subject_and_b_class_examples(trainer: Trainer) -> None:
    system, b = trainer.system, trainer.cfg.train.batch_size
    assert (system.num_subject, system.num_class, system.halves) == (4, 4, 2)
    n = system.items()
    assert n == 4  # lcm(4 subjects, 4 class images)
    epoch = first_batches(trainer, n // b)
    seen_s, seen_c = [], []
    for batch in epoch:
        assert tuple(batch["image"].shape) == (b, 2, 3, SIZE, SIZE)  # one subject and one class slot per item
        s, c = system.pair(batch["index"])
        seen_s += s.tolist()
        seen_c += c.tolist()
        z = system.latents(batch, torch.zeros(b, 2, 4, 4, 4))
        assert tuple(z.shape) == (b, 2, 4, 4, 4)
        mean_s = system._moments["subject"][s].chunk(2, 1)[0]
        mean_c = system._moments["class"][c].chunk(2, 1)[0]
        torch.testing.assert_close(z[:, 0], mean_s * system.scale)
        torch.testing.assert_close(z[:, 1], mean_c * system.scale)
        cond = system.conditions(batch, torch.ones(b, 3))  # u = 1: nothing dropped
        assert cond["context"].shape[0] == 2 * b and cond["concat"].abs().sum() == 0
        assert (cond["box_labels"] == -1).all()  # the base takes maps and layouts: they get their nulls
        subject_tokens, _ = system._tokens["subject"]
        class_tokens, _ = system._tokens["class"]
        assert torch.equal(cond["context"][:b], subject_tokens[s].float())
        assert torch.equal(cond["context"][b:], class_tokens[c].float())
        # class image k comes from subject prompt k mod S without the token: here each item's own context
        assert [system.class_prompts[i] for i in c] == [system.subject_prompts[i].replace(f"{TOKEN} ", "") for i in s]
    assert sorted(seen_s) == [0, 1, 2, 3] and sorted(seen_c) == [0, 1, 2, 3]  # each once per epoch


def _draws(b: int, seed: int = 0) -> Draws:
    g = torch.Generator().manual_seed(seed)
    return Draws(torch.randint(0, 1000, (b,), generator=g), torch.randn(b, 2, 4, 4, 4, generator=g),
                 torch.zeros(b, dtype=torch.bool), torch.Generator(), 0, torch.randn(b, 2, 4, 4, 4, generator=g),
                 torch.rand(b, 3, generator=g))


@pytest.mark.parametrize("lam", [1.0, 0.25, 3.0])
def test_loss_is_subject_plus_lambda_times_prior(trainer: Trainer, lam: float) -> None:
    from dataclasses import replace

    cfg = replace(trainer.cfg, dreambooth=replace(trainer.cfg.dreambooth, prior_weight=lam))
    batch = first_batches(trainer, 1)[0]
    d = _draws(2)
    net, diffusion = trainer.net.eval(), trainer.diffusion
    with torch.no_grad():
        terms = dreambooth_losses(cfg, net, diffusion, batch, d, trainer.system)
        z0 = trainer.system.latents(batch, d.latent_eps)
        cond = trainer.system.conditions(batch, d.u)
        half = {k: (v[:2], v[2:]) for k, v in cond.items()}
        t_class = (d.u[:, 2] * 1000).long()
        subject = training_losses(diffusion, net, z0[:, 0], d.t, noise=d.noise[:, 0],
                                  cond={k: v[0] for k, v in half.items()}, loss_type=cfg.diffusion.loss)
        prior = training_losses(diffusion, net, z0[:, 1], t_class, noise=d.noise[:, 1],
                                cond={k: v[1] for k, v in half.items()}, loss_type=cfg.diffusion.loss)
    torch.testing.assert_close(terms.loss, subject.loss + lam * prior.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms.parts["subject_loss"], subject.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms.parts["prior_loss"], prior.loss, rtol=1e-5, atol=1e-6)
    trainer.net.train()


def test_without_prior_the_batch_is_the_subject_alone(base: Path, subject: Path, tmp_path: Path) -> None:
    t = Trainer(config(base, subject, tmp_path / "run", prior_weight=0.0, batch_size=3), progress=False)
    t.lock.release()
    assert t.system.halves == 1 and t.system.num_class == 0 and not (tmp_path / "run" / "class_images.png").exists()
    batch = first_batches(t, 1)[0]
    assert tuple(batch["image"].shape) == (3, 1, 3, SIZE, SIZE)
    d = _draws(3)
    d = d._replace(noise=d.noise[:, :1], latent_eps=d.latent_eps[:, :1])
    with torch.no_grad():
        terms = dreambooth_losses(t.cfg, t.net, t.diffusion, batch, d, t.system)
        z0 = t.system.latents(batch, d.latent_eps)[:, 0]
        alone = training_losses(t.diffusion, t.net, z0, d.t, noise=d.noise[:, 0],
                                cond=t.system.conditions(batch, d.u), loss_type=t.cfg.diffusion.loss)
    torch.testing.assert_close(terms.loss, alone.loss)
    assert (terms.parts["prior_loss"] == 0).all()


def test_the_run_starts_from_the_bases_ema_weights(trainer: Trainer, base: Path) -> None:
    assert tensors_equal(trainer.net.state_dict(), load_base_unet(base))
    rate = trainer.cfg.train.ema_rates[0]
    assert tensors_equal(trainer.ema.state_dict(rate), dict(trainer.net.named_parameters()))


def test_lora_starts_as_the_base_and_trains_only_adapters(base: Path, subject: Path, tmp_path: Path) -> None:
    t = Trainer(config(base, subject, tmp_path / "run", lora=2), progress=False)
    t.lock.release()
    state, want = t.net.state_dict(), load_base_unet(base)
    trainable = [n for n, p in t.net.named_parameters() if p.requires_grad]
    assert trainable and all(is_lora_key(n) for n in trainable)
    assert all(torch.equal(v, want[k.replace(".base_layer.", ".")]) for k, v in state.items() if not is_lora_key(k))
    assert all(v.abs().sum() == 0 for k, v in state.items() if ".lora_B." in k)  # B = 0: the base exactly
    plain = load_model(base).model
    x, t_, kw = unet_inputs(0)
    with torch.no_grad():
        assert torch.equal(t.net.eval()(x, t_, **kw), plain(x, t_, **kw))


def unet_inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Inputs of the tiny base's UNet: 4x4 latents, 8 text tokens, a (zero) 7-class map."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 4, 4, generator=g), torch.tensor([3, 600]),
            {"context": torch.randn(2, 8, 384, generator=g), "concat": torch.rand(2, 7, 4, 4, generator=g)})


# ------------------------------------------------------------------------------------------------ the run
def test_run_records_token_pieces_logs_both_halves_and_caches_class_images(dreambooth_run: Path, base: Path) -> None:
    cfg = read_config(dreambooth_run / "checkpoints" / "step_0000004")
    db = cfg.dreambooth
    assert db.token_pieces == ["z", "##w", "##x"] and db.base == str(base) and len(db.base_fingerprint) == 16
    assert sorted(p.name for p in (dreambooth_run / "checkpoints").glob("step_*")) == ["step_0000002", "step_0000004"]
    assert {"model.safetensors", EMA, "autoencoder.safetensors"} <= {
        p.name for p in (dreambooth_run / "checkpoints" / "step_0000004").iterdir()}
    log = [json.loads(x) for x in (dreambooth_run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    for r in log:
        assert r["loss"] == pytest.approx(r["subject_loss"] + r["prior_loss"], rel=1e-5)
    assert (dreambooth_run / "class_images.png").is_file()
    # the cached class images are what the frozen base makes: regenerating one set gives the same pixels
    model = load_model(dreambooth_run).model
    assert not tensors_equal(model.state_dict(), load_base_unet(base))  # it trained
    assert (dreambooth_run / "subject").exists() is False  # a folder subject is read in place


def test_class_images_come_from_the_cache_the_second_time(trainer: Trainer, tmp_path: Path, monkeypatch) -> None:
    from pakhsh.pipelines.text_to_image import TextToImagePipeline

    db, system = trainer.cfg.dreambooth, trainer.system
    calls = []
    monkeypatch.setattr(TextToImagePipeline, "generate", lambda *a, **k: calls.append(1))
    prompts = db.class_prompts(system.subject_prompts)
    assert prompts == [p.replace(f"{TOKEN} ", "") for p in system.subject_prompts]
    images, cached = class_images(None, db, prompts, db.base_fingerprint, SIZE, torch.device("cpu"), progress=False)
    assert cached and not calls and torch.equal(images, system.class_images)


def test_a_split_token_encodes_differently_from_the_plain_class(trainer: Trainer) -> None:
    enc: TextEncoder = trainer.system.text_encoder
    assert enc.tokenizer.tokenize(TOKEN) == ["z", "##w", "##x"]
    with_token, plain = enc.encode([f"a {TOKEN} star", "a star"]).tokens
    assert (with_token - plain).abs().max() > 0.1
    assert trainer.system.subject_prompts[0].startswith(f"a {TOKEN} star")


def test_resume_is_exact(dreambooth_run: Path, base: Path, subject: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "split"
    assert dreambooth(base, subject, run, "--lr", "0.01", "--train-token", steps=2) == 0
    code, err = run_cli(["--threads", "1", "dreambooth", "--out", str(run), "--resume", "--set", "train.steps=4",
                         "-q"], capsys)
    assert code == 0, err
    assert "class images: 4 of 'a star at the top left on a gray background' and 3 more prompt(s) from the frozen " \
           "base (cached)" in err
    for name in ("model.safetensors", EMA, "autoencoder.safetensors"):
        assert tensors_equal(load_file(str(dreambooth_run / "checkpoints" / "step_0000004" / name)),
                             load_file(str(run / "checkpoints" / "step_0000004" / name))), name


# ------------------------------------------------------------------------------------------------ LoRA
def test_lora_folder_loads_into_a_fresh_base(lora_run: Path) -> None:
    folder = lora_run / "lora"
    assert {p.name for p in folder.iterdir()} == {LORA_FILE, "adapter_config.json", "pakhsh_lora.json",
                                                  "token_embedding.safetensors"}
    theirs = load_file(str(folder / LORA_FILE))
    assert all(k.startswith("unet.") and ".transformer_blocks." in k for k in theirs)
    assert any(".attn1.to_q.lora_A." in k for k in theirs) and any(".attn2.to_out.0.lora_B." in k for k in theirs)
    trained = load_model(lora_run).model  # the run's EMA: base + adapters
    assert any(v.abs().sum() > 0 for k, v in trained.state_dict().items() if ".lora_B." in k)
    fresh, cfg = load_lora(folder)
    assert cfg.dreambooth.lora_rank == 2
    x, t, kw = unet_inputs(1)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, t, **kw), trained(x, t, **kw), rtol=1e-5, atol=1e-6)
    assert torch.equal(fresh.dreambooth_token, trained.dreambooth_token)  # the learnt token travels too
    checkpoint_config = json.loads((folder / "adapter_config.json").read_text())
    assert checkpoint_config["r"] == 2 and checkpoint_config["lora_alpha"] == 2
    assert set(checkpoint_config["target_modules"]) == {"attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                                                         "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"}


def test_lora_refuses_another_base(lora_run: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(DreamBoothError, match="fingerprint"):
        load_lora(lora_run / "lora", base=str(lora_run.parent / "t2i" / "checkpoints" / "step_0000002"))


# ------------------------------------------------------------------------------------------------ token, prompts
def test_captions_without_the_token_are_refused(base: Path, subject: Path, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "subject"
    write_demo_subject(folder, TOKEN, SIZE)
    (folder / "subject_2.txt").write_text("a star at the top on a blue background\n")
    code, err = run_cli(["--threads", "1", "dreambooth", "--subject", str(folder), "--class-noun", "star", "--token",
                         TOKEN, "-m", str(base), "--out", str(tmp_path / "run"), "-q"], capsys)
    assert code == 2
    one_line(err, "subject_2.png", "lacks the token 'zwx'")


def test_a_caption_without_the_class_noun_is_a_notice(base: Path, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "subject"
    write_demo_subject(folder, TOKEN, SIZE)
    for p in folder.glob("*.txt"):
        p.write_text(p.read_text().replace(" star ", " thing "))
    with pytest.warns(UserWarning, match="the subject's prompt lacks the class noun 'star': 'a zwx thing at the"):
        code, err = run_cli(["--threads", "1", "dreambooth", "--subject", str(folder), "--class-noun", "star",
                             "--token", TOKEN, "-m", str(base), "--out", str(tmp_path / "run"), "--steps", "1",
                             "--batch-size", "2", "--class-images", "2", "-q",
                             *sum((["--set", s] for s in RUN_SETS), [])], capsys)
    assert code == 0, err


def test_generation_notices_prompts_without_the_token(dreambooth_run: Path) -> None:
    cfg = read_config(dreambooth_run / "checkpoints" / "step_0000004")
    assert token_notice(cfg, [f"a {TOKEN} star at the top", "A ZWX star"]) is None  # whole word, any case
    note = token_notice(cfg, ["a star", "a star", "zwxy star", ""])
    assert note.startswith("'a star'; 'zwxy star' lack the identifier 'zwx'")
    assert token_notice(read_config(base_of_config(dreambooth_run)), ["a star"]) is None  # not a DreamBooth model


def base_of_config(run: Path) -> Path:
    return Path(read_config(run / "checkpoints" / "step_0000004").dreambooth.base)


def test_demo_subject_is_deterministic_and_captioned(tmp_path: Path) -> None:
    a, b = write_demo_subject(tmp_path / "a", "sks"), write_demo_subject(tmp_path / "b", "sks")
    names = sorted(p.name for p in a.iterdir())
    assert names == [f"subject_{i}.{e}" for i in range(4) for e in ("png", "txt")]
    assert all((a / n).read_bytes() == (b / n).read_bytes() for n in names)
    captions = [(a / f"subject_{i}.txt").read_text().strip() for i in range(4)]
    assert captions[0] == "a sks star at the top left on a gray background" and len(DEMO_PLACES) == 4
    pairs = demo_subject("sks", 64)
    assert pairs[0][0].size == (64, 64)
    pixels = torch.from_numpy(np.asarray(pairs[1][0]).reshape(-1, 3).astype(np.int64))
    assert ((pixels == torch.tensor([30, 60, 230])).all(1).sum() > 50) and (
        (pixels == torch.tensor([250, 210, 30])).all(1).sum() > 50)  # both halves of the star are there


def test_token_must_be_a_word_the_base_never_saw(base: Path, subject: Path, tmp_path: Path) -> None:
    from pakhsh.training.dreambooth_base import read_base_config
    from pakhsh.training.dreambooth_data import check_token

    with pytest.raises(DreamBoothError, match="--token red: the base was trained on captions using that word"):
        check_token(DreamBoothConfig(token="red"), read_base_config(str(base))[0])
    with pytest.raises(ValueError, match="lacks the token"):
        DreamBoothConfig(token="sks", instance_prompt="a star")


@pytest.mark.parametrize(("fields", "needle"), [
    ({"token": "two words"}, "dreambooth.token='two words': must be one word"),
    ({"token": "star"}, "is the class noun itself"),
    ({"class_noun": " "}, "dreambooth.class_noun=' '"),
    ({"prior_weight": -1.0}, "dreambooth.prior_weight=-1.0"),
    ({"class_images": 0}, "needs >= 1 class image; set prior_weight=0"),
    ({"lora_rank": 0}, "dreambooth.lora_rank=0"),
    ({"lora_alpha": 0.0}, "dreambooth.lora_alpha=0.0"),
])
def test_dreambooth_section_errors_name_the_key(fields: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        DreamBoothConfig(**fields)


def test_dreambooth_section_needs_a_latent_text_model(base: Path, subject: Path, tmp_path: Path) -> None:
    from pakhsh.training.experiment import load_experiment

    with pytest.raises(ValueError, match="dreambooth: needs a latent text-to-image model"):
        load_experiment("shapes", ["dreambooth.token=sks"])
    with pytest.raises(ValueError, match="timestep_sampler must be uniform"):
        config(base, subject, tmp_path / "r", "train.timestep_sampler=loss-aware")
    with pytest.raises(DreamBoothError, match="the run's model must be the base's"):
        Trainer(config(base, subject, tmp_path / "r", "model.dropout=0.3"), progress=False)


# ------------------------------------------------------------------------------------------------ --train-token
def test_learnt_token_starts_as_the_frozen_encoding_and_gets_gradients(base: Path, subject: Path,
                                                                        tmp_path: Path) -> None:
    from pakhsh.training.learnt_token import TokenTextEncoder, piece_ids

    t = Trainer(config(base, subject, tmp_path / "run", "dreambooth.train_token=true"), progress=False)
    t.lock.release()
    enc = t.system.text_encoder
    vocab = enc.model.get_input_embeddings().weight
    assert torch.equal(t.net.dreambooth_token.detach(), vocab[piece_ids(enc, t.cfg.dreambooth)])
    prompts = [f"a {TOKEN} star at the top", "a star", f"{TOKEN} {TOKEN}"]
    wrapped = TokenTextEncoder(enc, piece_ids(enc, t.cfg.dreambooth), t.net)
    torch.testing.assert_close(wrapped.encode(prompts).tokens, enc.encode(prompts).tokens, rtol=1e-5, atol=1e-5)
    batch = first_batches(t, 1)[0]
    terms = dreambooth_losses(t.cfg, t.net, t.diffusion, batch, _draws(2), t.system)
    terms.loss.mean().backward()
    grad = t.net.dreambooth_token.grad
    assert grad is not None and grad.abs().sum() > 0 and grad.shape == (3, 384)
    with torch.no_grad():  # a moved embedding changes prompts with the token, and only those
        t.net.dreambooth_token.add_(torch.randn(3, 384, generator=torch.Generator().manual_seed(0)))  # not a
        # constant: the embedding LayerNorm takes out a shift
        moved = wrapped.encode(prompts).tokens
    assert (moved[0] - enc.encode(prompts[:1]).tokens[0]).abs().max() > 0.01
    torch.testing.assert_close(moved[1], enc.encode(prompts[1:2]).tokens[0], rtol=1e-5, atol=1e-5)


def test_a_learnt_token_is_what_generation_uses(lora_run: Path) -> None:
    from pakhsh.pipelines.text_to_image import TextToImagePipeline
    from pakhsh.training.learnt_token import TokenTextEncoder

    for spec in (lora_run, lora_run / "lora"):
        pipe = TextToImagePipeline.from_pretrained(spec, device="cpu")
        assert isinstance(pipe.text_encoder, TokenTextEncoder)
        frozen = TextEncoder(pipe.model.config.condition.text)
        learnt = pipe.text_encoder.encode([f"a {TOKEN} star", "a star"]).tokens
        assert (learnt[0] - frozen.encode([f"a {TOKEN} star"]).tokens[0]).abs().max() > 1e-3
        torch.testing.assert_close(learnt[1], frozen.encode(["a star"]).tokens[0], rtol=1e-5, atol=1e-5)
