"""Latent diffusion runs (`pakhsh train t2i` against a tiny autoencoder run): the frozen autoencoder travels in
every checkpoint, the latent scale factor is measured (1 / std of posterior samples) and stored, resume is exact
(with the autoencoder the checkpoint holds), condition dropout gives each condition's exact null, mismatched
configs are one-line errors, and classifier-free guidance at 1 / 0 is the conditional / unconditional model.

`tiny_t2i_run` (text + map + layout) and `tiny_text_run` (text only) are shared with tests/e2e/test_latent_cli.py
and built once per pytest session (see `shared_run`)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import default_collate

from pakhsh.conditioning.layout import batch_layout
from pakhsh.conditioning.segmap import one_hot_map
from pakhsh.conditioning.text import TextEncoder
from pakhsh.data import build_dataset
from pakhsh.diffusion import GaussianDiffusion
from pakhsh.pipelines import SampleSettings
from pakhsh.pipelines.text_to_image import TextToImagePipeline
from pakhsh.samplers import default_spacing
from pakhsh.samplers.ddim import ddim_sample
from pakhsh.training.autoencoder import load_autoencoder
from pakhsh.training.checkpoint import read_config
from pakhsh.training.ema import rate_name
from pakhsh.training.experiment import load_experiment
from pakhsh.training.latent import LatentSystem
from tests.conftest import run_cli
from tests.training.test_autoencoder_training import (
    one_line,
    session_cache,
    shared_run,
    tensors_equal,
    tiny_autoencoder_run,
    train,
)

# 16x16 shapes -> 4x4x4 latents of the tiny f=4 autoencoder; a 2-level 16-wide UNet with cross-attention
T2I_SETS = ["data.image_size=16", "data.length=16", "model.image_size=4", "model.model_channels=16",
            "model.channel_mult=[1,2]", "model.attention_resolutions=[4]", "model.num_head_channels=16",
            "model.num_groups=8", "condition.text.max_length=8", "train.batch_size=4", "train.sample_every=0",
            "train.num_preview=2", "train.preview_steps=2", "train.save_every=2", "train.mixed_precision=no",
            "train.device=cpu", "train.warmup_steps=1", "train.log_every=1", "latent.scale_samples=8"]
TEXT_ONLY = ["condition.segmap=false", "condition.layout=false", "model.cond_channels=0", "model.layout_classes=null"]
T2I_STEPS = 4
EMA_FILE = f"{rate_name(0.999)}.safetensors"  # t2i.yaml: ema_rates [0.999]


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    """One torch thread (after conftest's two): the CPU is shared, and runs compared bit for bit use one."""
    torch.set_num_threads(1)


def t2i_sets(ae: Path, *more: str) -> list[str]:
    return [*T2I_SETS, f"latent.autoencoder={ae}", *more]


def tiny_t2i_run(factory: pytest.TempPathFactory) -> Path:
    """A 4-step `pakhsh train t2i` run (text + segmentation map + layout), checkpoints at steps 2 and 4."""
    ae = tiny_autoencoder_run(factory)

    def build(path: Path) -> None:
        assert train("t2i", path, t2i_sets(ae, f"train.steps={T2I_STEPS}"), "--overwrite") == 0

    return shared_run(factory, "t2i", build)


def tiny_text_run(factory: pytest.TempPathFactory) -> Path:
    """A 2-step text-only latent run (no map, no layout)."""
    ae = tiny_autoencoder_run(factory)

    def build(path: Path) -> None:
        assert train("t2i", path, t2i_sets(ae, *TEXT_ONLY, "train.steps=2"), "--overwrite") == 0

    return shared_run(factory, "t2i_text", build)


@pytest.fixture(scope="module", autouse=True)
def _caption_cache(tmp_path_factory: pytest.TempPathFactory):
    """Encoded captions go to the session's temp folder, not the user's ~/.cache/pakhsh."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PAKHSH_CACHE", str(session_cache(tmp_path_factory)))
        yield


@pytest.fixture(scope="module")
def ae_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_autoencoder_run(tmp_path_factory)


@pytest.fixture(scope="module")
def t2i_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_t2i_run(tmp_path_factory)


@pytest.fixture(scope="module")
def text_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_text_run(tmp_path_factory)


def last_checkpoint(run: Path) -> Path:
    return run / "checkpoints" / f"step_{T2I_STEPS:07d}"


# ------------------------------------------------------------------------------------------------ the run
def test_latent_run_trains_and_keeps_the_autoencoder_in_every_checkpoint(t2i_run: Path, ae_run: Path) -> None:
    ckpts = sorted(p.name for p in (t2i_run / "checkpoints").glob("step_*"))
    assert ckpts == ["step_0000002", "step_0000004"]
    log = [json.loads(line) for line in (t2i_run / "log.jsonl").read_text().splitlines() if line.strip()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in log)
    ae, _ = load_autoencoder(ae_run)  # what latent.autoencoder names: its EMA weights
    for name in ckpts:
        folder = t2i_run / "checkpoints" / name
        assert tensors_equal(load_file(str(folder / "autoencoder.safetensors")), ae.state_dict())
        unet = load_file(str(folder / "model.safetensors"))
        assert not any(k.startswith(("encoder.", "decoder.", "autoencoder.")) for k in unet)  # the UNet alone


def test_latent_config_records_the_autoencoder_and_the_measured_scale(t2i_run: Path, ae_run: Path) -> None:
    saved = json.loads((t2i_run / "config.json").read_text())
    lat = saved["latent"]
    ae_saved = json.loads((ae_run / "config.json").read_text())["autoencoder"]
    assert lat["autoencoder_config"] == ae_saved
    scale = lat["scale_factor"]
    assert isinstance(scale, float) and math.isfinite(scale) and scale > 0
    assert json.loads((last_checkpoint(t2i_run) / "config.json").read_text())["latent"]["scale_factor"] == scale

    # recomputed here: 1 / std of posterior samples (fixed noise, seed 0) of the first scale_samples images
    cfg = read_config(last_checkpoint(t2i_run))
    ae, _ = load_autoencoder(ae_run)
    ds = build_dataset(cfg.data)
    k = min(cfg.latent.scale_samples, len(ds))
    assert k == 8
    with torch.no_grad():
        post = ae.encode(torch.stack([ds[i]["image"] for i in range(k)]))
    z = post.mean + post.std * torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(0))
    assert scale == pytest.approx(1.0 / float(z.std()), rel=1e-4)
    assert scale != pytest.approx(1.0 / float(post.mean.std()), rel=1e-3)  # samples, not the posterior means


def test_latent_system_latents_are_the_scaled_posterior_sample(t2i_run: Path, ae_run: Path) -> None:
    cfg = read_config(last_checkpoint(t2i_run))
    ae, _ = load_autoencoder(ae_run)
    cfg_nocond = load_experiment("t2i", t2i_sets(ae_run, *TEXT_ONLY, "condition=null", "model.context_dim=null"))
    system, built = LatentSystem.build(cfg_nocond, torch.device("cpu"))  # no text: the encoder is not loaded
    assert system.text_encoder is None and built.latent.autoencoder_config == ae.cfg
    ds = build_dataset(cfg.data)
    idx = [3, 0, 7]
    x = torch.stack([ds[i]["image"] for i in idx])
    eps = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        post = ae.encode(x)
    batch = {"index": torch.tensor(idx), "image": x}

    system.scale = 0.7  # batch by batch (no cache)
    torch.testing.assert_close(system.latents(batch, eps), 0.7 * (post.mean + post.std * eps), rtol=1e-4, atol=1e-5)
    # prepare() fills the cache and measures the scale: the same latents from the cache, scaled by what it measured
    system.scale = None
    measured = system.prepare(ds, progress=False)
    assert measured == pytest.approx(cfg.latent.scale_factor, rel=1e-6)
    torch.testing.assert_close(system.latents(batch, eps), measured * (post.mean + post.std * eps),
                               rtol=1e-4, atol=1e-5)


def test_given_scale_factor_is_kept(ae_run: Path) -> None:
    cfg = load_experiment("t2i", t2i_sets(ae_run, *TEXT_ONLY, "condition=null", "model.context_dim=null",
                                          "latent.scale_factor=0.5"))
    system, _ = LatentSystem.build(cfg, torch.device("cpu"))
    assert system.prepare(build_dataset(cfg.data), progress=False) == 0.5


def test_latent_resume_is_exact_with_the_checkpoints_autoencoder(t2i_run: Path, ae_run: Path, tmp_path: Path) -> None:
    """2 steps, then --resume to 4 == 4 straight steps, and the resumed run takes the autoencoder from its
    checkpoint: the autoencoder folder it was started with is gone by then."""
    ae_copy = tmp_path / "ae_copy"
    shutil.copytree(ae_run, ae_copy)
    run = tmp_path / "split"
    assert train("t2i", run, t2i_sets(ae_copy, "train.steps=2")) == 0
    first = json.loads((run / "config.json").read_text())["latent"]["scale_factor"]
    straight_scale = json.loads((t2i_run / "config.json").read_text())["latent"]["scale_factor"]
    assert first == straight_scale  # a second run measures the identical value
    shutil.rmtree(ae_copy)
    assert train("t2i", run, t2i_sets(ae_copy, f"train.steps={T2I_STEPS}"), "--resume") == 0
    for name in ("model.safetensors", EMA_FILE, "autoencoder.safetensors"):
        straight = load_file(str(last_checkpoint(t2i_run) / name))
        resumed = load_file(str(last_checkpoint(run) / name))
        assert tensors_equal(straight, resumed), name
    assert json.loads((run / "config.json").read_text())["latent"]["scale_factor"] == straight_scale


# ------------------------------------------------------------------------------------------------ condition dropout
@pytest.fixture(scope="module")
def system(t2i_run: Path) -> tuple[LatentSystem, object]:
    cfg = read_config(last_checkpoint(t2i_run))
    sys_, cfg = LatentSystem.build(cfg, torch.device("cpu"))
    ds = build_dataset(cfg.data)
    sys_.prepare(ds, progress=False)
    return sys_, ds


def test_condition_dropout_gives_each_conditions_null(system) -> None:
    sys_, ds = system
    c = sys_.cfg.condition
    p = [c.text_dropout, c.segmap_dropout, c.layout_dropout]
    assert all(0 < v < 0.999 for v in p)
    idx = [0, 1, 2, 3, 4]
    batch = default_collate([ds[i] for i in idx])
    batch["index"] = torch.tensor(idx)
    # row 0: text dropped; 1: map dropped; 2: layout dropped; 3: all kept; 4: at the thresholds (kept: drop is u < p)
    u = torch.tensor([[0.0, 0.999, 0.999], [0.999, 0.0, 0.999], [0.999, 0.999, 0.0], [0.999] * 3, p])
    cond = sys_.conditions(batch, u)
    assert set(cond) == {"context", "context_mask", "concat", "boxes", "box_labels"}

    enc = TextEncoder(c.text)
    null = enc.encode([""])
    assert torch.equal(cond["context"][0], null.tokens[0].float())  # exactly the empty prompt's embedding
    assert torch.equal(cond["context_mask"][0], null.mask[0])
    own = enc.encode(list(batch["caption"]))
    kept = [1, 2, 3, 4]
    torch.testing.assert_close(cond["context"][kept], own.tokens[kept].float(), rtol=2e-3, atol=2e-3)  # fp16 cache
    assert torch.equal(cond["context_mask"][kept], own.mask[kept])
    assert not torch.allclose(cond["context"][1], null.tokens[0], atol=1e-2)

    maps = one_hot_map(batch["segmentation"], 7, (4, 4))
    assert torch.equal(cond["concat"][1], torch.zeros_like(maps[1]))
    keep_map = [0, 2, 3, 4]
    torch.testing.assert_close(cond["concat"][keep_map], maps[keep_map])
    torch.testing.assert_close(cond["concat"][keep_map].sum(1), torch.ones(4, 4, 4))

    boxes, labels = batch_layout(batch["boxes"], batch["objects"], 16)
    assert torch.equal(cond["box_labels"][2], torch.full_like(labels[2], -1))
    keep_layout = [0, 1, 3, 4]
    assert torch.equal(cond["box_labels"][keep_layout], labels[keep_layout])
    assert bool((labels[keep_layout] >= 0).any())
    torch.testing.assert_close(cond["boxes"], boxes)


def test_text_dropout_zero_keeps_every_caption(system) -> None:
    sys_, ds = system
    batch = default_collate([ds[i] for i in range(2)])
    batch["index"] = torch.tensor([0, 1])
    drop_all = sys_.conditions(batch, torch.zeros(2, 3))  # u = 0 < every dropout > 0: everything dropped
    null_t, null_m = sys_.null_text()
    assert torch.equal(drop_all["context"], null_t.expand(2, -1, -1))
    assert torch.equal(drop_all["context_mask"], null_m.expand(2, -1))
    assert not drop_all["concat"].any() and bool((drop_all["box_labels"] == -1).all())


def test_caption_cache_is_reused_and_a_damaged_one_recomputed(system, tmp_path_factory) -> None:
    sys_, ds = system
    tokens, masks = sys_._tokens.clone(), sys_._masks.clone()
    files = sorted((session_cache(tmp_path_factory) / "text").glob("*.safetensors"))
    assert files  # the captions were written to $PAKHSH_CACHE (not the user's cache)

    class NoEncoding:  # the same encoder, but encoding fails: the captions must come from the cache
        folder = sys_.text_encoder.folder
        config = sys_.text_encoder.config

        def to(self, device):
            return self

        def encode(self, prompts):
            raise AssertionError("encoded again")

    again = LatentSystem(sys_.cfg, sys_.autoencoder, NoEncoding(), torch.device("cpu"))
    again._fill(ds, progress=False)
    assert torch.equal(again._tokens, tokens) and torch.equal(again._masks, masks)

    for f in files:
        f.write_bytes(b"not a safetensors file")
    fresh = LatentSystem(sys_.cfg, sys_.autoencoder, sys_.text_encoder, torch.device("cpu"))
    fresh._fill(ds, progress=False)  # a damaged cache file is recomputed (float-equal: thread counts may differ)
    torch.testing.assert_close(fresh._tokens, tokens, rtol=0, atol=2e-3)
    assert torch.equal(fresh._masks, masks)
    again = LatentSystem(sys_.cfg, sys_.autoencoder, NoEncoding(), torch.device("cpu"))
    again._fill(ds, progress=False)  # ... and written again
    assert torch.equal(again._tokens, fresh._tokens)


# ------------------------------------------------------------------------------------------------ config errors
@pytest.mark.parametrize(("overrides", "needles"), [
    (["model.in_channels=3"], ["makes 4-channel latents", "model.in_channels"]),
    (["model.image_size=8"], ["model.image_size=8", "set model.image_size=4"]),
    (["model.context_dim=null", "condition.layout=false", "model.layout_classes=null"],
     ["condition.text needs cross-attention", "model.context_dim"]),
    (["model.cond_channels=3"], ["model.cond_channels=7", "got 3"]),
    (["model.layout_classes=null"], ["condition.layout needs model.layout_classes"]),
    (["condition.layout=false"], ["model.layout_classes is set but condition.layout is false"]),
    (["model.context_dim=100"], ["model.context_dim=100", "set model.context_dim=384"]),
    (["data.image_size=18"], ["not a multiple of the autoencoder's factor f=4"]),
])
def test_mismatched_latent_configs_are_one_line_errors(overrides: list[str], needles: list[str], ae_run: Path,
                                                       tmp_path: Path, capsys) -> None:
    out = tmp_path / "r"
    code, err = run_cli(["--threads", "1", "train", "t2i", "--out", str(out), "-q",
                         *[a for o in t2i_sets(ae_run, *overrides) for a in ("--set", o)]], capsys)
    assert code == 2, err
    one_line(err, *needles)
    assert not (out / "checkpoints").exists()


def test_latent_autoencoder_must_be_an_autoencoder(tmp_path: Path, capsys) -> None:
    for spec, needle in (("shapes", "is not an autoencoder"), (str(tmp_path / "nope"), "no such folder")):
        code, err = run_cli(["--threads", "1", "train", "t2i", "--out", str(tmp_path / "r"), "-q",
                             *[a for o in [*T2I_SETS, f"latent.autoencoder={spec}"] for a in ("--set", o)]], capsys)
        assert code == 2, err
        one_line(err, needle)


def test_segmap_condition_on_data_without_maps_is_a_one_line_error(ae_run: Path, tmp_path: Path, capsys) -> None:
    import numpy as np
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("a red circle")
    sets = t2i_sets(ae_run, "data.name=folder", f"data.path={folder}", "data.length=null", "condition.layout=false",
                    "model.layout_classes=null", "train.steps=1")
    code, err = run_cli(["--threads", "1", "train", "t2i", "--out", str(tmp_path / "r"), "-q",
                         *[a for o in sets for a in ("--set", o)]], capsys)
    assert code == 2, err
    one_line(err, "condition.segmap", "segmentation")


def test_t2i_finds_the_autoencoder_f4_run_trained_before_it(ae_run: Path, tmp_path: Path, monkeypatch,
                                                            capsys) -> None:
    monkeypatch.chdir(tmp_path)
    shutil.copytree(ae_run, tmp_path / "runs" / "autoencoder_f4")  # where `pakhsh train autoencoder_f4` trains
    # the README's retraining command names the run folder (a bare name is a shipped autoencoder)
    sets = [*T2I_SETS, *TEXT_ONLY, "train.steps=1", "train.save_every=1", "latent.autoencoder=runs/autoencoder_f4"]
    code, err = run_cli(["--threads", "1", "train", "t2i", "-q", *[a for o in sets for a in ("--set", o)]], capsys)
    assert code == 0, err
    ae, _ = load_autoencoder(tmp_path / "runs" / "autoencoder_f4")
    saved = load_file(str(tmp_path / "runs" / "t2i" / "checkpoints" / "step_0000001" / "autoencoder.safetensors"))
    assert tensors_equal(saved, ae.state_dict())


# ------------------------------------------------------------------------------------------------ guidance
JITTER = 0.1  # std of the noise added to a tiny run's UNet weights (see jitter_unet)


def jitter_unet(unet: torch.nn.Module, std: float = JITTER, seed: int = 0) -> None:
    """Add seeded noise to every UNet weight, in place: a 4-step model has barely moved its zero-initialised output
    and attention projections, so its conditions hardly change the images; jittered, every condition shows.
    Guidance identities and the CLI's plumbing hold for any weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def _pipeline(run: Path, perturb: bool = True) -> TextToImagePipeline:
    """The run's pipeline, its UNet jittered (jitter_unet) unless perturb is False."""
    pipe = TextToImagePipeline.from_pretrained(run, device="cpu")
    if perturb:
        jitter_unet(pipe.unet)
    return pipe


def _gen(pipe: TextToImagePipeline, prompts, guidance: float, latents: torch.Tensor, steps: int = 3,
         sampler: str = "ddim", **kw):
    return pipe.generate(prompts, settings=SampleSettings(sampler, steps, guidance=guidance), latents=latents,
                         progress=False, **kw)


def test_pipeline_loads_the_runs_unet_autoencoder_and_scale(t2i_run: Path) -> None:
    pipe = _pipeline(t2i_run, perturb=False)
    ckpt = last_checkpoint(t2i_run)
    assert tensors_equal(pipe.vae.state_dict(), load_file(str(ckpt / "autoencoder.safetensors")))
    scale = json.loads((t2i_run / "config.json").read_text())["latent"]["scale_factor"]
    assert pipe.vae.cfg.scaling_factor == scale
    ema = load_file(str(ckpt / EMA_FILE))
    unet = pipe.unet.state_dict()
    assert ema and all(torch.equal(unet[k], v) for k, v in ema.items())
    assert pipe.latent_shape(None, None) == (4, 4, 4)


def test_guidance_one_is_the_conditional_model_alone(t2i_run: Path) -> None:
    pipe = _pipeline(t2i_run)
    cfg = read_config(last_checkpoint(t2i_run))
    prompts = ["a red circle", "a large blue square at the top"]
    x_T = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    got = _gen(pipe, prompts, 1.0, x_T)

    # by hand: the UNet alone with the prompts' tokens and the null map and layout, DDIM eta = 0 over "ddim3"
    d = GaussianDiffusion.from_config(cfg.diffusion).respace(default_spacing("ddim", 3, cfg.diffusion.num_steps))
    emb = TextEncoder(cfg.condition.text).encode(prompts)
    cond = {"context": emb.tokens, "context_mask": emb.mask, "concat": torch.zeros(2, 7, 4, 4),
            "boxes": torch.zeros(2, 1, 4), "box_labels": torch.full((2, 1), -1, dtype=torch.long)}
    with torch.no_grad():
        z = ddim_sample(d, pipe.unet, x_T.clone(), eta=0.0, cond=cond, clip_denoised=False)
        want = pipe.vae.decode(z / cfg.latent.scale_factor).clamp(-1, 1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # the prompt matters (so the comparisons below can fail)
    assert (got - _gen(pipe, ["", ""], 1.0, x_T)).abs().max() > 1e-2


def test_guidance_zero_is_the_unconditional_model_text_only(text_run: Path) -> None:
    pipe = _pipeline(text_run)
    x_T = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(4))
    uncond = _gen(pipe, "", 1.0, x_T)
    cond = _gen(pipe, "a small green triangle", 1.0, x_T)
    assert (cond - uncond).abs().max() > 1e-2
    torch.testing.assert_close(_gen(pipe, "a small green triangle", 0.0, x_T), uncond, rtol=0, atol=1e-4)


def test_guidance_zero_is_the_unconditional_model_with_map_and_layout(t2i_run: Path) -> None:
    pipe = _pipeline(t2i_run)
    ds = build_dataset(read_config(last_checkpoint(t2i_run)).data)
    sample = ds[0]
    seg = sample["segmentation"][None]
    boxes, labels = batch_layout(sample["boxes"][None], sample["objects"][None], 16)
    x_T = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(6))
    uncond = _gen(pipe, "", 1.0, x_T)
    full = dict(segmap=seg, layout=(boxes, labels))
    assert (_gen(pipe, "a red circle", 1.0, x_T, **full) - uncond).abs().max() > 1e-2
    assert (_gen(pipe, "", 1.0, x_T, segmap=seg) - uncond).abs().max() > 1e-2  # the map alone matters
    assert (_gen(pipe, "", 1.0, x_T, layout=(boxes, labels)) - uncond).abs().max() > 1e-3  # the layout alone too
    torch.testing.assert_close(_gen(pipe, "a red circle", 0.0, x_T, **full), uncond, rtol=0, atol=1e-4)


def test_guidance_scale_extrapolates_from_unconditional_to_conditional(text_run: Path) -> None:
    """One ancestral step ends on the x_0 prediction (no noise is added at the last step), linear in the model
    output: with the decoder replaced by a small linear map, guidance s gives uncond + s * (cond - uncond)."""
    pipe = _pipeline(text_run)
    pipe.vae.decode_latents = lambda z: z * 0.1  # latents out, unclamped (|z| < 10)
    x_T = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(8))
    prompts = ["a red circle", "a blue star"]
    out = {s: _gen(pipe, prompts, s, x_T, steps=1, sampler="ddpm") for s in (0.0, 1.0, 3.0)}
    assert (out[1.0] - out[0.0]).abs().max() > 2e-5  # small: the single step is at t = 0
    assert out[3.0].abs().max() < 1
    torch.testing.assert_close(out[3.0], out[0.0] + 3.0 * (out[1.0] - out[0.0]), rtol=0, atol=2e-6)
