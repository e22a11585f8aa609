"""Cross-attention UNet (context_dim): placement, masking, input checks, diffusers equivalence, mixed precision."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
import torch
from torch import nn

from pakhsh.config import from_dict, to_dict
from pakhsh.nets.attention import AttentionBlock
from pakhsh.nets.transformer import (
    SpatialTransformer,
    from_diffusers_transformer_state,
    to_diffusers_transformer_state,
)
from pakhsh.nets.unet import UNet, UNetConfig

CTX = 24  # context width in these tests, deliberately unlike any UNet width


def tiny(**overrides) -> UNetConfig:
    """The tiny UNet of test_unet.py (16x16, widths 32/64, attention at 8x8), with cross-attention by default."""
    base = dict(image_size=16, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                attention_resolutions=(8,), dropout=0.0, num_heads=2, context_dim=CTX)
    base.update(overrides)
    return UNetConfig(**base)


def build(cfg: UNetConfig, seed: int = 0, randomize: bool = True) -> UNet:
    torch.manual_seed(seed)
    model = UNet(cfg)
    if randomize:  # zero-initialised outputs would hide every upstream difference
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for p in model.parameters():
                if not p.any():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def inputs(b: int = 2, length: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, 16, 16, generator=g)  # (B, C_in, H, W)
    t = torch.randint(0, 1000, (b,), generator=g)  # (B,)
    context = torch.randn(b, length, CTX, generator=g)  # (B, L, context_dim)
    return x, t, context


# --- context_dim=None is today's UNet -----------------------------------------------------------------------
# Fingerprints of tiny(num_classes=3, context_dim=None) built with seed 0, computed with unet.py as it was before
# cross-attention existed (its output matched this version's bit for bit). Keys+shapes catch any added or
# renamed module; the parameter bytes catch a changed init order (CPU RNG is stable across torch releases).
_KEYS_SHA = "a822d17360e4588812ac7c7f1ceba667ddd7dc3b4c1e6bac22d60b2bea0e2243"
_PARAMS_SHA = "30fc667f0a1e8d2e2a09d0b7207ca53cf760cb26902522da77518e9054b4f712"
_OUT_HEAD = [0.3400436341762543, 0.3834879398345947, -0.07341641187667847, 0.026168417185544968]


def test_without_context_dim_the_unet_is_unchanged() -> None:
    cfg = tiny(num_classes=3, context_dim=None)
    torch.manual_seed(0)
    model = UNet(cfg)
    sd = model.state_dict()
    h = hashlib.sha256()
    for k, v in sd.items():
        h.update(f"{k} {tuple(v.shape)}\n".encode())
    assert h.hexdigest() == _KEYS_SHA, "state_dict keys/shapes changed for context_dim=None"
    for v in sd.values():
        h.update(v.numpy().tobytes())
    assert h.hexdigest() == _PARAMS_SHA, "initial weights changed for context_dim=None"
    assert not any(isinstance(m, SpatialTransformer) for m in model.modules())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    x, t, _ = inputs()
    out = model(x, t, torch.tensor([0, 3]))
    torch.testing.assert_close(out.flatten()[:4], torch.tensor(_OUT_HEAD), atol=1e-5, rtol=1e-5)


# --- structure ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("linear, depth", [(False, 1), (True, 2)])
def test_output_shape_and_transformers_replace_every_attention_block(linear: bool, depth: int) -> None:
    cfg = tiny(use_linear_projection=linear, transformer_depth=depth, num_head_channels=16)
    model = build(cfg, randomize=False)
    assert not any(isinstance(m, AttentionBlock) for m in model.modules())
    blocks = [m for m in model.modules() if isinstance(m, SpatialTransformer)]
    assert len(blocks) == 2 * 1 + 1 + 1  # encoder + decoder (+1) at 8x8, and the middle block
    for st in blocks:
        assert len(st.blocks) == depth
        assert isinstance(st.proj_in, nn.Linear if linear else nn.Conv2d)
        assert not st.proj_out.weight.any()  # zero init: identity at start
        assert st.blocks[0].attn1.heads == st.norm.num_channels // 16  # num_head_channels rule
        assert st.blocks[0].attn2.kv.in_features == CTX
    x, t, context = inputs()
    out = model(x, t, context=context)
    assert out.shape == (2, 3, 16, 16) and out.dtype == torch.float32


def test_context_changes_the_output() -> None:
    model = build(tiny())
    x, t, context = inputs()
    a = model(x, t, context=context)
    b = model(x, t, context=context + torch.randn_like(context))
    assert not torch.allclose(a, b, atol=1e-4)
    # Different context lengths are fine: cross-attention does not care how many tokens there are.
    assert model(x, t, context=context[:, :2]).shape == a.shape


def test_masked_padding_tokens_do_not_affect_the_output() -> None:
    model = build(tiny(num_classes=4))
    x, t, context = inputs(length=6)
    mask = torch.tensor([[True] * 6, [True, True, False, False, False, False]])  # sample 1: 2 real, 4 padding
    y = torch.tensor([1, 4])
    ref = model(x, t, y, context=context, context_mask=mask)
    noisy = context.clone()
    noisy[1, 2:] = torch.randn(4, CTX) * 10
    torch.testing.assert_close(model(x, t, y, context=noisy, context_mask=mask), ref, atol=1e-6, rtol=0)
    # Without the mask the padding is attended to, so the output differs: the mask is what hides it.
    assert not torch.allclose(model(x, t, y, context=noisy), ref, atol=1e-4)
    # Masking is the same as dropping the padding tokens.
    torch.testing.assert_close(model(x[1:], t[1:], y[1:], context=context[1:, :2]), ref[1:], atol=1e-5, rtol=1e-5)


# --- input validation ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(), r"context \(2, L, 24\) .*none given"),
        (dict(context=torch.randn(2, 5, 16)), r"context must be \(2, L, 24\).*got \(2, 5, 16\)"),
        (dict(context=torch.randn(3, 5, CTX)), r"context must be \(2, L, 24\).*got \(3, 5, 24\)"),
        (dict(context=torch.randn(2, CTX)), r"context must be \(2, L, 24\).*got \(2, 24\)"),
        (dict(context=torch.randn(2, 5, CTX), context_mask=torch.ones(2, 4, dtype=torch.bool)),
         r"context_mask must be bool \(2, 5\).*got torch.bool \(2, 4\)"),
        (dict(context=torch.randn(2, 5, CTX), context_mask=torch.ones(2, 5)), r"context_mask must be bool"),
        (dict(context=torch.randn(2, 5, CTX), context_mask=torch.tensor([[True] * 5, [False] * 5])),
         "at least one token"),
    ],
)
def test_bad_context_raises_naming_the_shapes(kwargs: dict, match: str) -> None:
    model = build(tiny(), randomize=False)
    x, t, _ = inputs()
    with pytest.raises(ValueError, match=match):
        model(x, t, **kwargs)


def test_context_without_context_dim_raises() -> None:
    model = build(tiny(context_dim=None), randomize=False)
    x, t, context = inputs()
    with pytest.raises(ValueError, match="context_dim is None"):
        model(x, t, context=context)


@pytest.mark.parametrize("overrides, field", [(dict(context_dim=0), "context_dim"),
                                              (dict(transformer_depth=0), "transformer_depth"),
                                              (dict(num_heads=3), "num_heads")])
def test_config_validation_names_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"UNetConfig\.{field}"):
        tiny(**overrides)


def test_config_round_trips() -> None:
    cfg = tiny(transformer_depth=2, use_linear_projection=True)
    assert from_dict(UNetConfig, to_dict(cfg)) == cfg


# --- equivalence with diffusers -----------------------------------------------------------------------------
@pytest.mark.parametrize("linear", [False, True])
def test_matches_diffusers_transformer2d(linear: bool) -> None:
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.Transformer2DModel(num_attention_heads=2, attention_head_dim=32, in_channels=64, num_layers=2,
                                       cross_attention_dim=CTX, norm_num_groups=32, use_linear_projection=linear)
    ours = SpatialTransformer(64, 2, CTX, depth=2, use_linear_projection=linear)
    with torch.no_grad():  # diffusers' GroupNorm/LayerNorm start at (1, 0): make the affine maps matter too
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    ours.load_state_dict(from_diffusers_transformer_state(ref.state_dict()))
    g = torch.Generator().manual_seed(3)
    # Sample 1 has a small variance, where GroupNorm's eps (1e-6 in latent-diffusion, not 1e-5) shows.
    x = torch.randn(2, 64, 8, 8, generator=g) * torch.tensor([1.0, 0.01])[:, None, None, None]
    x = x.contiguous(memory_format=torch.channels_last)
    context = torch.randn(2, 7, CTX, generator=g)
    mask = torch.tensor([[True] * 7, [True] * 3 + [False] * 4])
    with torch.no_grad():
        want = ref(x, encoder_hidden_states=context).sample
        want_masked = ref(x, encoder_hidden_states=context, encoder_attention_mask=mask.float()).sample
        got, got_masked = ours(x, context), ours(x, context, mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_masked, want_masked, atol=1e-5, rtol=1e-5)
    assert got.is_contiguous(memory_format=torch.channels_last)  # the UNet's activation layout is kept
    # The inverse map gives diffusers back its own state dict.
    back = to_diffusers_transformer_state(ours.state_dict())
    assert back.keys() == ref.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in ref.state_dict().items())


def test_key_map_refuses_unknown_and_incomplete_keys() -> None:
    sd = to_diffusers_transformer_state(SpatialTransformer(32, 2, CTX).state_dict())
    with pytest.raises(ValueError, match=r"unexpected key 'transformer_blocks\.0\.attn1\.to_q\.bias'"):
        from_diffusers_transformer_state({**sd, "transformer_blocks.0.attn1.to_q.bias": torch.zeros(32)})
    partial = {k: v for k, v in sd.items() if k != "transformer_blocks.0.attn2.to_v.weight"}
    with pytest.raises(ValueError, match=r"missing key 'transformer_blocks\.0\.attn2\.to_v\.weight'"):
        from_diffusers_transformer_state(partial)


# --- mixed precision and gradients --------------------------------------------------------------------------
def test_bf16_autocast_runs_and_returns_x_dtype() -> None:
    model = build(tiny(use_linear_projection=True)).eval()
    x, t, context = inputs()
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    ref = model(x, t, context=context, context_mask=mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, context=context, context_mask=mask)
    assert out.dtype == x.dtype == torch.float32
    assert torch.isfinite(out).all()
    rel = (out - ref).norm() / ref.norm()
    assert rel < 0.03, f"bf16 relative error {rel:.4f}"


def test_gradients_reach_every_transformer_parameter_and_checkpointing_agrees() -> None:
    cfg = tiny(transformer_depth=2)
    plain, ckpt = build(cfg), build(dataclasses.replace(cfg, use_checkpoint=True))
    x, t, context = inputs()
    context.requires_grad_()
    plain(x, t, context=context).square().mean().backward()
    grad_context = context.grad.clone()
    context.grad = None
    ckpt(x, t, context=context).square().mean().backward()
    dead = [n for n, p in plain.named_parameters() if not p.grad.any() or not torch.isfinite(p.grad).all()]
    assert dead == []
    assert grad_context.abs().sum() > 0
    torch.testing.assert_close(context.grad, grad_context)
    for (n, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=n)
