"""KL autoencoder: shapes, diffusers equivalence and key/config maps, the Gaussian posterior, scaling, validation,
mixed precision."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from pakhsh.config import from_dict, to_dict
from pakhsh.nets.autoencoder import (
    AutoencoderConfig,
    AutoencoderKL,
    DiagonalGaussian,
    autoencoder_from_diffusers,
    config_from_diffusers,
    config_to_diffusers,
    from_diffusers_state,
    to_diffusers_state,
)
from pakhsh.nets.layers import GroupNorm


def tiny(**overrides) -> AutoencoderConfig:
    """An autoencoder small enough for a 2-core CPU: widths 8/16, f = 2."""
    base = dict(base_channels=8, channel_mult=(1, 2), num_res_blocks=1, num_groups=4)
    base.update(overrides)
    return AutoencoderConfig(**base)


def build(cfg: AutoencoderConfig, seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(cfg).eval()


def images(b: int = 2, h: int = 16, w: int = 16, c: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(seed))  # (B, C, H, W)


def perturb(model: torch.nn.Module, seed: int = 1, scale: float = 0.1) -> None:
    """Move every parameter (GroupNorm's (1, 0) affine included) so each one changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


# --- shapes ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mult, f", [((1, 2, 2), 4), ((1, 2, 2, 2), 8)])
def test_shapes_follow_the_downsampling_factor(mult: tuple[int, ...], f: int) -> None:
    cfg = tiny(channel_mult=mult, latent_channels=3, out_channels=2)
    assert cfg.downsample_factor == f
    model = build(cfg)
    x = images(h=32, w=16)
    with torch.no_grad():
        recon, post = model(x)
    assert post.mean.shape == post.logvar.shape == (2, 3, 32 // f, 16 // f)
    assert recon.shape == (2, 2, 32, 16) and recon.dtype == x.dtype and recon.is_contiguous()


def test_single_level_and_deterministic_posterior() -> None:
    model = build(tiny(channel_mult=(1,), double_z=False, mid_attention=False))
    assert not any("attentions" in k for k in model.state_dict())
    x = images()
    with torch.no_grad():
        recon, post = model(x, generator=torch.Generator().manual_seed(0))
    assert post.mean.shape == (2, 4, 16, 16) and recon.shape == x.shape
    assert post.deterministic and torch.equal(post.sample(), post.mean)
    assert torch.equal(post.kl(), torch.zeros(2)) and torch.equal(post.nll(post.mean), torch.zeros(2))


def test_gradients_reach_every_parameter() -> None:
    model = build(tiny(dropout=0.1)).train()
    recon, post = model(images(), generator=torch.Generator().manual_seed(0))
    ((recon - images()).pow(2).mean() + 1e-3 * post.kl().mean()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


# --- diffusers equivalence ------------------------------------------------------------------------------------
DIFFUSERS_TINY = [
    dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4),
    # f = 4, two ResnetBlocks per level (three in the decoder), width changes both ways, no middle attention
    dict(block_out_channels=(8, 16, 16), layers_per_block=2, norm_num_groups=4, latent_channels=3,
         in_channels=2, out_channels=1, mid_block_add_attention=False),
]


def diffusers_vae(kwargs: dict, seed: int = 0):
    diffusers = pytest.importorskip("diffusers")
    n = len(kwargs["block_out_channels"])
    torch.manual_seed(seed)
    ref = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * n,
                                  up_block_types=("UpDecoderBlock2D",) * n, **kwargs).eval()
    perturb(ref)
    return ref


@pytest.mark.parametrize("kwargs", DIFFUSERS_TINY)
def test_matches_diffusers_autoencoder_kl(kwargs: dict) -> None:
    ref = diffusers_vae(kwargs)
    ours = autoencoder_from_diffusers(dict(ref.config), ref.state_dict()).eval()
    x = images(c=kwargs.get("in_channels", 3))
    with torch.no_grad():
        want = ref.encode(x).latent_dist
        got = ours.encode(x)
        torch.testing.assert_close(got.mean, want.mean, atol=1e-5, rtol=0)
        torch.testing.assert_close(got.logvar, want.logvar, atol=1e-5, rtol=0)
        z = torch.randn(got.mean.shape, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(ours.decode(z), ref.decode(z).sample, atol=1e-5, rtol=0)
        # the scaled helpers agree with diffusers' pipeline convention: latents * scaling_factor, and back
        s = ref.config.scaling_factor
        torch.testing.assert_close(ours.decode_latents(z * s), ref.decode(z).sample, atol=1e-5, rtol=0)


def test_inverse_key_map_gives_diffusers_its_state_dict() -> None:
    ref = diffusers_vae(DIFFUSERS_TINY[0])
    sd = ref.state_dict()
    back = to_diffusers_state(from_diffusers_state(sd))
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    ours = build(config_from_diffusers(dict(ref.config)), seed=5)
    ref.load_state_dict(to_diffusers_state(ours.state_dict()), strict=True)  # and ours loads into diffusers


def test_old_attention_names_and_conv_shaped_projections_load() -> None:
    """Pre-0.14 diffusers checkpoints name the projections query/key/value/proj_attn; latent-diffusion's are
    1x1 convs. Both map onto the same weights as today's to_q/to_k/to_v/to_out.0."""
    sd = diffusers_vae(DIFFUSERS_TINY[0]).state_dict()
    renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for k, v in sd.items():
        for new, name in renames.items():
            if f"attentions.0.{new}." in k:
                k = k.replace(f".{new}.", f".{name}.")
                v = v[:, :, None, None] if v.ndim == 2 else v
        old[k] = v
    assert any(".query." in k for k in old)
    want, got = from_diffusers_state(sd), from_diffusers_state(old)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_key_map_errors_name_the_key() -> None:
    sd = diffusers_vae(DIFFUSERS_TINY[0]).state_dict()
    with pytest.raises(ValueError, match=r"'encoder\.down_blocks\.0\.attentions\.0\.to_q\.weight'"):
        from_diffusers_state({**sd, "encoder.down_blocks.0.attentions.0.to_q.weight": torch.zeros(1)})
    incomplete = {k: v for k, v in sd.items() if k != "decoder.mid_block.attentions.0.to_k.bias"}
    with pytest.raises(ValueError, match=r"missing key 'decoder\.mid_block\.attentions\.0\.to_k\.bias'"):
        from_diffusers_state(incomplete)
    ours = build(tiny()).state_dict()
    with pytest.raises(ValueError, match=r"'encoder\.extra\.weight'"):
        to_diffusers_state({**ours, "encoder.extra.weight": torch.zeros(1)})


# --- configs --------------------------------------------------------------------------------------------------
SD15_VAE = {  # stable-diffusion-v1-5/vae/config.json, which predates scaling_factor in the config
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3,
    "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}


def test_config_from_diffusers() -> None:
    # SD 1.x's VAE is our default config; diffusers supplies the scaling factor its config.json leaves out.
    assert config_from_diffusers(SD15_VAE) == AutoencoderConfig(scaling_factor=0.18215)
    sdxl = {**SD15_VAE, "scaling_factor": 0.13025, "force_upcast": True}
    assert config_from_diffusers(sdxl).scaling_factor == 0.13025
    ref = diffusers_vae(DIFFUSERS_TINY[1])
    assert config_from_diffusers(dict(ref.config)) == AutoencoderConfig(
        in_channels=2, out_channels=1, latent_channels=3, base_channels=8, channel_mult=(1, 2, 2),
        num_res_blocks=2, mid_attention=False, num_groups=4, scaling_factor=0.18215)


def test_config_round_trips() -> None:
    diffusers = pytest.importorskip("diffusers")
    cfg = tiny(channel_mult=(1, 2, 4), num_res_blocks=2, latent_channels=3, scaling_factor=0.5, mid_attention=False)
    as_diffusers = config_to_diffusers(cfg)
    assert config_from_diffusers(as_diffusers) == cfg
    ref = diffusers.AutoencoderKL(**as_diffusers)  # diffusers builds it, and its weights fit ours exactly
    AutoencoderKL(cfg).load_state_dict(from_diffusers_state(ref.state_dict()), strict=True)
    assert from_dict(AutoencoderConfig, to_dict(cfg)) == cfg  # our JSON form, as saved beside weights
    with pytest.raises(ValueError, match="AutoencoderConfig.double_z"):
        config_to_diffusers(tiny(double_z=False))


@pytest.mark.parametrize("change, key", [
    ({"shift_factor": 0.0609}, "shift_factor"),  # SD3 latents are shifted as well as scaled
    ({"use_quant_conv": False}, "use_quant_conv"),
    ({"act_fn": "gelu"}, "act_fn"),
    ({"down_block_types": ["DownEncoderBlock2D"] * 3}, "down_block_types"),
    ({"block_out_channels": [128, 192, 512, 512]}, "block_out_channels"),
    ({"latents_mean": [0.0] * 4}, "latents_mean"),
    ({"unheard_of": 1}, "unheard_of"),
    ({"_class_name": "AutoencoderTiny"}, "_class_name"),
])
def test_config_from_diffusers_refuses_what_it_cannot_build(change: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        config_from_diffusers({**SD15_VAE, **change})


@pytest.mark.parametrize("field, value", [
    ("in_channels", 0), ("latent_channels", 0), ("base_channels", -8), ("num_res_blocks", 0),
    ("channel_mult", ()), ("channel_mult", (1, 0)), ("dropout", 1.0), ("num_groups", 3),
    ("scaling_factor", 0.0), ("scaling_factor", math.inf), ("double_z", "yes"),
])
def test_validation_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"^AutoencoderConfig\.{field}:"):
        tiny(**{field: value})


def _mutated(cfg: AutoencoderConfig, **changes) -> AutoencoderConfig:
    """A copy of `cfg` changed after construction, bypassing its validation."""
    cfg = dataclasses.replace(cfg)
    for k, v in changes.items():
        setattr(cfg, k, v)
    return cfg


def test_model_revalidates_a_mutated_config_and_checks_inputs() -> None:
    cfg = tiny()
    with pytest.raises(ValueError, match="AutoencoderConfig.num_groups"):
        AutoencoderKL(_mutated(cfg, num_groups=5))
    model = build(cfg)
    with pytest.raises(ValueError, match=r"x must be \(B, 3, H, W\)"):
        model.encode(images(c=4))
    with pytest.raises(ValueError, match="divisible by 2"):
        model.encode(images(h=15))
    with pytest.raises(ValueError, match=r"z must be \(B, 4, H, W\)"):
        model.decode(images(c=3))


# --- the posterior --------------------------------------------------------------------------------------------
def test_kl_closed_form() -> None:
    zeros = torch.zeros(2, 4, 3, 3)
    assert torch.equal(DiagonalGaussian(zeros, zeros).kl(), torch.zeros(2))  # KL(N(0, 1) || N(0, 1)) = 0
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    post = DiagonalGaussian(mean, logvar)
    want = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3))
    torch.testing.assert_close(post.kl(), want)
    # one element by hand: mean 1, var e -> 0.5 * (1 + e - 1 - 1) = 0.5 * (e - 1)
    one = DiagonalGaussian(torch.ones(1, 1, 1, 1), torch.ones(1, 1, 1, 1))
    torch.testing.assert_close(one.kl(), torch.tensor([0.5 * (math.e - 1)]))
    # against torch.distributions, for KL to another Gaussian and for the negative log-likelihood
    other = DiagonalGaussian(torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g))
    p, q = (torch.distributions.Normal(d.mean, d.std) for d in (post, other))
    torch.testing.assert_close(post.kl(other), torch.distributions.kl_divergence(p, q).sum(dim=(1, 2, 3)))
    x = torch.randn(2, 4, 3, 3, generator=g)
    torch.testing.assert_close(post.nll(x), -p.log_prob(x).sum(dim=(1, 2, 3)))


def test_logvar_is_clamped() -> None:
    post = DiagonalGaussian(torch.zeros(1, 3), torch.tensor([[-100.0, 0.0, 100.0]]))
    assert post.logvar.tolist() == [[-30.0, 0.0, 20.0]]
    with pytest.raises(ValueError, match="mean and logvar"):
        DiagonalGaussian(torch.zeros(1, 3), torch.zeros(1, 4))


def test_sampling_is_reproducible_under_a_generator() -> None:
    model = build(tiny())
    x = images()
    with torch.no_grad():
        post = model.encode(x)
        a = post.sample(torch.Generator().manual_seed(7))
        b = post.sample(torch.Generator().manual_seed(7))
        c = post.sample(torch.Generator().manual_seed(8))
        eps = torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(7))
        assert torch.equal(a, b) and not torch.equal(a, c)
        torch.testing.assert_close(a, post.mean + (0.5 * post.logvar).exp() * eps)
        assert torch.equal(post.mode(), post.mean)
        recon, _ = model(x, generator=torch.Generator().manual_seed(7))  # forward draws the same sample
        assert torch.equal(recon, model.decode(a))
        torch.testing.assert_close(model(x, sample=False)[0], model.decode(post.mean))


def test_latent_helpers_apply_the_scaling_factor() -> None:
    model = build(tiny(scaling_factor=0.25))
    x = images()
    with torch.no_grad():
        post = model.encode(x)
        z = model.encode_latents(x, torch.Generator().manual_seed(1))
        torch.testing.assert_close(z, post.sample(torch.Generator().manual_seed(1)) * 0.25)
        torch.testing.assert_close(model.encode_latents(x, sample=False), post.mean * 0.25)
        torch.testing.assert_close(model.decode_latents(z), model.decode(z / 0.25))
        assert not torch.allclose(model.decode_latents(z), model.decode(z))


# --- mixed precision ------------------------------------------------------------------------------------------
def test_bf16_autocast_keeps_groupnorm_fp32_and_returns_the_input_dtype() -> None:
    model = build(tiny())
    perturb(model, scale=0.02)
    assert all(m.eps == 1e-6 for m in model.modules() if isinstance(m, GroupNorm))
    x = images()
    with torch.no_grad():
        want, want_post = model(x, sample=False)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, post = model(x, sample=False)
            kl = post.kl()
    assert got.dtype == post.mean.dtype == post.logvar.dtype == kl.dtype == torch.float32
    assert torch.isfinite(got).all()
    scale = want.abs().max()
    assert (got - want).abs().max() < 0.05 * scale  # bf16 convs: close, not equal
    assert (post.mean - want_post.mean).abs().max() < 0.05 * want_post.mean.abs().max()
    # a bf16 model on bf16 inputs stays bf16
    with torch.no_grad():
        out, _ = model.to(torch.bfloat16)(x.bfloat16(), sample=False)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
