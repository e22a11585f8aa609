"""objective=autoencoder (latent diffusion's first stage): config checks that name the key, the loss terms against
their formulas (KL closed form, L1 / L2 weights), the discriminator's gradients kept to its own term and switched
on at disc_start, a tiny `pakhsh train autoencoder_f4` run, `load_autoencoder` and exact resume.

`tiny_autoencoder_run` is shared with the latent tests (tests/training/test_latent_training.py,
tests/e2e/test_latent_cli.py, ...): one tiny run per pytest session, built on first use and never modified."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from pakhsh.cli import main
from pakhsh.nets.autoencoder import AutoencoderConfig, AutoencoderKL, DiagonalGaussian
from pakhsh.training.autoencoder import AutoencoderTrainee, autoencoder_losses, autoencoder_state, load_autoencoder
from pakhsh.training.checkpoint import CheckpointError
from pakhsh.training.ema import rate_name
from pakhsh.training.experiment import load_experiment
from tests.conftest import run_cli

# 16x16 shapes, f = 4 (4x4x4 latents), an 8-wide autoencoder: a step takes a fraction of a second on one thread
AE_SETS = ["data.image_size=16", "data.length=16", "autoencoder.base_channels=8", "autoencoder.channel_mult=[1,2,2]",
           "autoencoder.num_groups=4", "train.batch_size=4", "train.sample_every=0", "train.num_preview=2",
           "train.save_every=2", "train.mixed_precision=no", "train.device=cpu", "train.warmup_steps=1",
           "train.log_every=1"]
AE_STEPS = 4
EMA_FILE = f"{rate_name(0.999)}.safetensors"  # autoencoder_f4.yaml: ema_rates [0.999]


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    """One torch thread (after conftest's two): the CPU is shared, and runs compared bit for bit use one."""
    torch.set_num_threads(1)


def train(config: str, out: Path, sets: list[str], *extra: str) -> int:
    """`pakhsh --threads 1 train CONFIG --out OUT -q --set ...` in this process (one thread: bit-exact reruns)."""
    argv = ["--threads", "1", "train", config, "--out", str(out), "-q"]
    for s in sets:
        argv += ["--set", s]
    return main([*argv, *extra])


def session_cache(factory: pytest.TempPathFactory) -> Path:
    """$PAKHSH_CACHE for these tests (encoded captions): the session's temp folder, never the user's cache."""
    return factory.getbasetemp() / "pakhsh-cache"


def shared_run(factory: pytest.TempPathFactory, name: str, build) -> Path:
    """A run built once per pytest session (per xdist worker) under the session's base temp folder; tests only
    read it. A half-built one (a failed build) is rebuilt."""
    path = factory.getbasetemp() / "pakhsh-shared-runs" / name
    done = path / ".built"
    if not done.is_file():
        path.mkdir(parents=True, exist_ok=True)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("PAKHSH_CACHE", str(session_cache(factory)))
            build(path)
        done.touch()
    return path


def tiny_autoencoder_run(factory: pytest.TempPathFactory) -> Path:
    """A 4-step `pakhsh train autoencoder_f4` run (checkpoints at steps 2 and 4)."""
    def build(path: Path) -> None:
        code = train("autoencoder_f4", path, [*AE_SETS, f"train.steps={AE_STEPS}"], "--overwrite")
        assert code == 0

    return shared_run(factory, "autoencoder", build)


@pytest.fixture(scope="module")
def ae_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_autoencoder_run(tmp_path_factory)


def one_line(err: str, *needles: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def tensors_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------ config checks
def test_autoencoder_objective_needs_an_autoencoder_section(tmp_path: Path, capsys) -> None:
    with pytest.raises(ValueError, match="objective=autoencoder needs an autoencoder: section"):
        load_experiment("shapes", ["objective=autoencoder"])
    code, err = run_cli(["train", "shapes", "--set", "objective=autoencoder", "--out", str(tmp_path / "r")], capsys)
    assert code == 2
    one_line(err, "objective=autoencoder needs an autoencoder: section")
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_autoencoder_section_is_refused_without_the_objective(tmp_path: Path, capsys) -> None:
    with pytest.raises(ValueError, match="only for objective=autoencoder"):
        load_experiment("autoencoder_f4", ["objective=diffusion"])
    code, err = run_cli(["train", "autoencoder_f4", "--set", "objective=diffusion", "--out", str(tmp_path / "r")],
                        capsys)
    assert code == 2
    one_line(err, "autoencoder", "only for objective=autoencoder")


def test_autoencoder_objective_refuses_latent_and_condition_sections() -> None:
    with pytest.raises(ValueError, match="remove task, latent and condition"):
        load_experiment("autoencoder_f4", ["latent.autoencoder=autoencoder_f4"])


@pytest.mark.parametrize(("overrides", "needle"), [
    (["autoencoder_loss.kl_weight=-1"], "autoencoder_loss.kl_weight"),
    (["autoencoder_loss.l2_weight=-0.5"], "autoencoder_loss.l2_weight"),
    (["autoencoder_loss.disc_weight=.inf"], "autoencoder_loss.disc_weight"),
    (["autoencoder_loss.l1_weight=.nan"], "autoencoder_loss.l1_weight"),
    (["autoencoder_loss.l1_weight=0", "autoencoder_loss.l2_weight=0"], "l1_weight + l2_weight"),
    (["autoencoder_loss.disc_start=-1"], "disc_start"),
    (["autoencoder_loss.disc_layers=0"], "disc_layers"),
])
def test_bad_autoencoder_loss_values_name_the_key(overrides: list[str], needle: str, tmp_path: Path, capsys) -> None:
    with pytest.raises(ValueError, match=needle.replace("+", r"\+")):
        load_experiment("autoencoder_f4", overrides)
    code, err = run_cli(["train", "autoencoder_f4", *[a for o in overrides for a in ("--set", o)],
                         "--out", str(tmp_path / "r")], capsys)
    assert code == 2
    one_line(err, needle)


def test_good_autoencoder_loss_values_are_taken() -> None:
    cfg = load_experiment("autoencoder_f4", ["autoencoder_loss.l1_weight=0", "autoencoder_loss.l2_weight=2",
                                             "autoencoder_loss.disc_weight=0.25", "autoencoder_loss.disc_start=7"])
    lc = cfg.autoencoder_loss
    assert (lc.l1_weight, lc.l2_weight, lc.disc_weight, lc.disc_start) == (0, 2, 0.25, 7)
    assert cfg.is_autoencoder and not cfg.is_latent


# ------------------------------------------------------------------------------------------------ loss terms
TINY_AE = AutoencoderConfig(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, num_groups=4, latent_channels=4)


class KnownPosterior(nn.Module):
    """An 'autoencoder' with a fixed posterior and a reconstruction x + delta (records the z it decodes)."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor, x: torch.Tensor, delta: torch.Tensor) -> None:
        super().__init__()
        self.mean, self.logvar, self.x, self.delta = mean, logvar, x, delta
        self.decoded: torch.Tensor | None = None

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        assert torch.equal(x, self.x)
        return DiagonalGaussian(self.mean, self.logvar)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        self.decoded = z
        return self.x + self.delta


def ae_config(**loss: float):
    return load_experiment("autoencoder_f4", [f"autoencoder_loss.{k}={v}" for k, v in loss.items()])


@pytest.mark.parametrize(("l1", "l2", "kl"), [(1.0, 0.0, 0.5), (0.0, 1.0, 0.5), (2.0, 3.0, 0.0), (0.5, 0.0, 0.0)])
def test_loss_is_l1_l2_and_kl_by_their_weights(l1: float, l2: float, kl: float) -> None:
    g = torch.Generator().manual_seed(0)
    b, shape = 3, (3, 8, 8)
    x = torch.rand(b, *shape, generator=g) * 2 - 1
    delta = torch.randn(b, *shape, generator=g) * 0.3
    mean = torch.randn(b, 4, 4, 4, generator=g)
    logvar = torch.randn(b, 4, 4, 4, generator=g) * 0.5 - 1.0
    eps = torch.randn(b, 4, 4, 4, generator=g)
    cfg = ae_config(l1_weight=l1, l2_weight=l2, kl_weight=kl)
    trainee = AutoencoderTrainee(TINY_AE, cfg.autoencoder_loss)
    trainee.autoencoder = KnownPosterior(mean, logvar, x, delta)

    terms = autoencoder_losses(cfg, trainee, x, eps, step=0)

    # the closed form of KL(N(mu, e^lv) || N(0, I)), summed over the latent, per image
    kl_closed = 0.5 * (mean ** 2 + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2, 3))
    mse = (delta ** 2).mean(dim=(1, 2, 3))
    mae = delta.abs().mean(dim=(1, 2, 3))
    pixels = math.prod(shape)
    want = l1 * mae + l2 * mse + kl * kl_closed / pixels
    assert terms.loss.shape == (b,)
    torch.testing.assert_close(terms.vb, kl_closed, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(terms.vb, DiagonalGaussian(mean, logvar).kl(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(terms.mse, mse, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms.loss, want, rtol=1e-5, atol=1e-6)
    # the decoder got the reparameterised sample mean + std * eps of the trainer's eps
    torch.testing.assert_close(trainee.autoencoder.decoded, mean + (0.5 * logvar).exp() * eps)


def test_l1_and_l2_weights_change_the_loss_as_the_formula_says() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    delta = torch.full_like(x, 0.5)  # |d| = 0.5, d^2 = 0.25 everywhere
    mean, logvar = torch.zeros(2, 4, 4, 4), torch.zeros(2, 4, 4, 4)  # KL = 0 exactly
    eps = torch.zeros(2, 4, 4, 4)
    losses = {}
    for l1, l2 in [(1.0, 0.0), (0.0, 1.0), (1.0, 1.0)]:
        cfg = ae_config(l1_weight=l1, l2_weight=l2, kl_weight=1.0)
        trainee = AutoencoderTrainee(TINY_AE, cfg.autoencoder_loss)
        trainee.autoencoder = KnownPosterior(mean, logvar, x, delta)
        losses[(l1, l2)] = autoencoder_losses(cfg, trainee, x, eps, step=0).loss
    torch.testing.assert_close(losses[(1.0, 0.0)], torch.full((2,), 0.5))
    torch.testing.assert_close(losses[(0.0, 1.0)], torch.full((2,), 0.25))
    torch.testing.assert_close(losses[(1.0, 1.0)], torch.full((2,), 0.75))


def test_no_discriminator_is_built_without_disc_weight() -> None:
    cfg = ae_config(disc_weight=0.0)
    assert AutoencoderTrainee(TINY_AE, cfg.autoencoder_loss).discriminator is None
    cfg = ae_config(disc_weight=0.5)
    assert AutoencoderTrainee(TINY_AE, cfg.autoencoder_loss).discriminator is not None


def _grads(module: nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor | None]:
    module.zero_grad(set_to_none=True)
    loss.backward()
    return {n: None if p.grad is None else p.grad.clone() for n, p in module.named_parameters()}


def _is_zero(g: torch.Tensor | None) -> bool:
    return g is None or not bool(g.abs().gt(0).any())


def test_discriminator_gets_only_its_own_gradient_and_only_from_disc_start() -> None:
    torch.manual_seed(0)
    w, start = 0.5, 3
    cfg = ae_config(disc_weight=w, disc_start=start, disc_channels=8, disc_layers=2, kl_weight=0.01)
    trainee = AutoencoderTrainee(TINY_AE, cfg.autoencoder_loss)
    disc = trainee.discriminator
    assert disc is not None
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    eps = torch.randn(2, 4, 8, 8, generator=g)
    is_disc = {n: n.startswith("discriminator.") for n, _ in trainee.named_parameters()}

    # before disc_start: reconstruction + KL only; the discriminator gets no gradient
    before = autoencoder_losses(cfg, trainee, x, eps, step=start - 1).loss.mean()
    g_before = _grads(trainee, before)
    assert all(_is_zero(g_before[n]) for n, d in is_disc.items() if d)
    assert not all(_is_zero(g_before[n]) for n, d in is_disc.items() if not d)

    # from disc_start on (step == disc_start included): the full loss
    full = autoencoder_losses(cfg, trainee, x, eps, step=start).loss.mean()
    g_full = _grads(trainee, full)

    # the two terms, computed here by hand
    recon, _ = trainee(x, eps)
    gen = -w * disc(recon).float().mean(dim=(1, 2, 3)).mean()  # the generator side of the hinge game
    g_gen = _grads(trainee, gen)
    recon, _ = trainee(x, eps)
    real, fake = disc(x), disc(recon.detach())
    d_loss = 0.5 * (torch.relu(1 - real).mean(dim=(1, 2, 3)) + torch.relu(1 + fake).mean(dim=(1, 2, 3))).mean()
    g_d = _grads(trainee, d_loss)
    torch.testing.assert_close(full.detach(), before.detach() + gen.detach() + d_loss.detach(), rtol=1e-5, atol=1e-6)

    # the hand-made terms do reach both sides, so a leak would show
    assert not all(_is_zero(g_gen[n]) for n, d in is_disc.items() if d)
    assert not all(_is_zero(g_gen[n]) for n, d in is_disc.items() if not d)
    for n, d in is_disc.items():
        if d:  # discriminator: exactly the hinge d-loss gradient (nothing from the generator term)
            assert g_full[n] is not None
            torch.testing.assert_close(g_full[n], g_d[n], rtol=1e-4, atol=1e-7, msg=n)
        else:  # autoencoder: reconstruction + KL + generator term (nothing from the d-loss)
            assert _is_zero(g_d[n]), n
            want = g_before[n] + g_gen[n]
            torch.testing.assert_close(g_full[n], want, rtol=1e-4, atol=1e-7, msg=n)


# ------------------------------------------------------------------------------------------------ the tiny run
def test_autoencoder_run_writes_checkpoints(ae_run: Path) -> None:
    ckpts = ae_run / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_0000002", "step_0000004"]
    last = ckpts / "step_0000004"
    for name in ("model.safetensors", EMA_FILE, "config.json", "optimizer.pt", "state.pt"):
        assert (last / name).is_file(), name
    assert not (last / "autoencoder.safetensors").exists()  # that file is for latent runs
    saved = json.loads((ae_run / "config.json").read_text())
    assert saved["objective"] == "autoencoder" and saved["autoencoder"]["base_channels"] == 8
    model = load_file(str(last / "model.safetensors"))
    assert model and all(k.startswith("autoencoder.") for k in model)  # disc_weight 0: no discriminator
    log = [json.loads(line) for line in (ae_run / "log.jsonl").read_text().splitlines() if line.strip()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in log)


def test_load_autoencoder_gives_the_ema_weights(ae_run: Path) -> None:
    net, folder = load_autoencoder(ae_run)
    assert isinstance(net, AutoencoderKL) and not net.training
    assert folder.resolve() == (ae_run / "checkpoints" / "step_0000004").resolve()
    ema = load_file(str(folder / EMA_FILE))
    want = {k[len("autoencoder."):]: v for k, v in ema.items() if k.startswith("autoencoder.")}
    assert tensors_equal(net.state_dict(), want)
    assert net.cfg.base_channels == 8 and net.cfg.downsample_factor == 4

    raw, _ = load_autoencoder(ae_run, ema=False)
    model = load_file(str(folder / "model.safetensors"))
    assert tensors_equal(raw.state_dict(), autoencoder_state(model))
    assert not tensors_equal(raw.state_dict(), net.state_dict())  # the EMA really is another set of weights

    older, f2 = load_autoencoder(ae_run / "checkpoints" / "step_0000002")  # a checkpoint folder works too
    assert f2.name == "step_0000002"
    assert tensors_equal(older.state_dict(), autoencoder_state(load_file(str(f2 / EMA_FILE))))


def test_load_autoencoder_refuses_other_models_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="is not an autoencoder") as e:
        load_autoencoder("shapes")
    assert "\n" not in str(e.value) and "objective=diffusion" in str(e.value)
    with pytest.raises(FileNotFoundError, match="no such folder") as e:
        load_autoencoder(tmp_path / "nope")
    assert "\n" not in str(e.value)


def test_autoencoder_resume_is_exact(ae_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "split"
    assert train("autoencoder_f4", run, [*AE_SETS, "train.steps=2"]) == 0
    assert train("autoencoder_f4", run, [*AE_SETS, f"train.steps={AE_STEPS}"], "--resume") == 0
    for name in ("model.safetensors", EMA_FILE):
        straight = load_file(str(ae_run / "checkpoints" / "step_0000004" / name))
        resumed = load_file(str(run / "checkpoints" / "step_0000004" / name))
        assert tensors_equal(straight, resumed), name
    # and the run did move: step 2 and step 4 differ
    two = load_file(str(run / "checkpoints" / "step_0000002" / "model.safetensors"))
    assert not tensors_equal(two, load_file(str(run / "checkpoints" / "step_0000004" / "model.safetensors")))


def test_trainer_starts_the_discriminator_at_disc_start(tmp_path: Path) -> None:
    """One step each: disc_start=1 leaves the discriminator at its initial weights, disc_start=0 trains it; the
    checkpoint holds it, load_autoencoder leaves it out."""
    sets = [*AE_SETS, "train.steps=1", "train.save_every=1", "autoencoder_loss.disc_weight=0.5",
            "autoencoder_loss.disc_channels=8"]
    cfg = load_experiment("autoencoder_f4", sets)
    torch.manual_seed(cfg.train.seed)  # the trainer builds the net right after seeding with train.seed
    init = AutoencoderTrainee(cfg.autoencoder, cfg.autoencoder_loss).state_dict()
    init_disc = {k: v for k, v in init.items() if k.startswith("discriminator.")}
    assert init_disc

    trained = {}
    for start in (1, 0):
        run = tmp_path / f"start{start}"
        assert train("autoencoder_f4", run, [*sets, f"autoencoder_loss.disc_start={start}"]) == 0
        model = load_file(str(run / "checkpoints" / "step_0000001" / "model.safetensors"))
        trained[start] = model
        assert model.keys() == init.keys()
        net, _ = load_autoencoder(run)
        assert set(net.state_dict()) == {k[len("autoencoder."):] for k in model if k.startswith("autoencoder.")}
    assert tensors_equal({k: trained[1][k] for k in init_disc}, init_disc)  # step 0 < disc_start=1: untouched
    assert not tensors_equal({k: trained[0][k] for k in init_disc}, init_disc)
    ae_keys = [k for k in init if k.startswith("autoencoder.") and k.endswith("weight")]
    assert any(not torch.equal(trained[1][k], init[k]) for k in ae_keys)  # the autoencoder did train
