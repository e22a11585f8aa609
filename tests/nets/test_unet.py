"""ADM UNet: shapes, init, gradients, mixed precision, attention placement, config and input validation."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from pakhsh.config import ConfigError, from_dict, to_dict
from pakhsh.nets.attention import AttentionBlock
from pakhsh.nets.layers import GroupNorm, ResBlock, num_groups_for, timestep_embedding
from pakhsh.nets.unet import UNet, UNetConfig


def tiny(**overrides) -> UNetConfig:
    """A UNet small enough for a 2-core CPU: 16x16, widths 32/64, one attention level."""
    base = dict(image_size=16, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                attention_resolutions=(8,), dropout=0.0, num_heads=2)
    base.update(overrides)
    return UNetConfig(**base)


def build(cfg: UNetConfig, seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return UNet(cfg)


def randomize_zero_params(model: nn.Module, seed: int = 1) -> None:
    """Give zero-initialised layers random weights so the output depends on every layer."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def inputs(cfg: UNetConfig, b: int = 2, h: int | None = None, w: int | None = None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h, w = h or cfg.image_size, w or cfg.image_size
    x = torch.randn(b, cfg.in_channels, h, w, generator=g)  # (B, C_in, H, W)
    t = torch.randint(0, 1000, (b,), generator=g)  # (B,)
    return x, t


# --- shapes -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, out_ch",
    [
        (dict(), 3),
        (dict(learn_sigma=True), 6),
        (dict(in_channels=6, out_channels=3), 3),  # Palette: condition concatenated to x_t
        (dict(resblock_updown=True, use_scale_shift_norm=False), 3),
        (dict(num_head_channels=16, channel_mult=(1, 2, 2), attention_resolutions=(8, 4)), 3),
    ],
)
def test_output_shape(overrides: dict, out_ch: int) -> None:
    cfg = tiny(**overrides)
    x, t = inputs(cfg)
    out = build(cfg)(x, t)
    assert out.shape == (2, out_ch, 16, 16)
    assert out.dtype == x.dtype


def test_class_labels_including_null_class() -> None:
    cfg = tiny(num_classes=5)
    model = build(cfg)
    randomize_zero_params(model)
    x, t = inputs(cfg)
    out_cond = model(x, t, torch.tensor([0, 4]))
    out_null = model(x, t, torch.tensor([5, 5]))  # index num_classes = null class
    assert out_cond.shape == out_null.shape == (2, 3, 16, 16)
    assert model.label_emb.num_embeddings == 6
    assert not torch.allclose(out_cond, out_null)
    # No labels means unconditional, i.e. the null class.
    torch.testing.assert_close(model(x, t), out_null)


def test_non_square_inputs_other_than_image_size() -> None:
    cfg = tiny(channel_mult=(1, 2, 2), attention_resolutions=(8,))  # downsampling factor 4
    x, t = inputs(cfg, h=24, w=40)
    assert build(cfg)(x, t).shape == (2, 3, 24, 40)


def test_scalar_and_float_timesteps() -> None:
    cfg = tiny()
    model = build(cfg)
    randomize_zero_params(model)
    x, _ = inputs(cfg)
    torch.testing.assert_close(model(x, 7), model(x, torch.tensor([7.0, 7.0])))


# --- init and determinism -----------------------------------------------------------------------------------
def test_same_seed_same_model_and_output() -> None:
    cfg = tiny(num_classes=3)
    a, b = build(cfg, seed=3), build(cfg, seed=3)
    for (na, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), na
    randomize_zero_params(a)
    randomize_zero_params(b)
    x, t = inputs(cfg)
    assert torch.equal(a(x, t, torch.tensor([0, 3])), b(x, t, torch.tensor([0, 3])))
    assert not torch.equal(build(cfg, seed=4).conv_in.weight, a.conv_in.weight)


def test_zero_init_output_is_exactly_zero() -> None:
    cfg = tiny(learn_sigma=True, num_classes=4)
    x, t = inputs(cfg)
    out = build(cfg)(x, t, torch.tensor([1, 4]))
    assert torch.count_nonzero(out) == 0


def test_state_dict_saves_with_safetensors_and_reloads(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    cfg = tiny(num_classes=2)
    model = build(cfg)
    randomize_zero_params(model)
    save_file(model.state_dict(), tmp_path / "unet.safetensors")  # refuses non-contiguous tensors
    clone = build(cfg, seed=9)
    clone.load_state_dict(load_file(tmp_path / "unet.safetensors"))
    x, t = inputs(cfg)
    assert torch.equal(clone(x, t), model(x, t))


def test_residual_branches_start_at_zero() -> None:
    model = build(tiny())
    for m in model.modules():
        if isinstance(m, ResBlock):
            assert not m.conv2.weight.any() and not m.conv2.bias.any()
        if isinstance(m, AttentionBlock):
            assert not m.proj_out.weight.any()


# --- gradients ----------------------------------------------------------------------------------------------
def _grads_after(model: UNet, cfg: UNetConfig, steps: int) -> dict[str, torch.Tensor]:
    """Take `steps` SGD steps on an MSE loss; return the gradients of the last backward."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, t = inputs(cfg)
    y = torch.tensor([0, cfg.num_classes]) if cfg.num_classes else None
    target = torch.randn(2, cfg.out_dim, 16, 16, generator=torch.Generator().manual_seed(5))
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(x, t, y), target).backward()
        if _ < steps - 1:
            opt.step()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_first_backward_reaches_only_the_output_conv() -> None:
    cfg = tiny()
    grads = _grads_after(build(cfg), cfg, steps=1)
    nonzero = {n for n, g in grads.items() if g.any()}
    assert nonzero == {"conv_out.weight", "conv_out.bias"}  # zero conv_out blocks everything upstream


def test_gradients_reach_every_parameter_after_training_steps() -> None:
    # Zero-init layers are "opened" one step at a time: conv_out, then the res-block output convs, then all.
    cfg = tiny(num_classes=3, learn_sigma=True)
    grads = _grads_after(build(cfg), cfg, steps=3)
    dead = [n for n, g in grads.items() if not g.any() or not torch.isfinite(g).all()]
    assert dead == []


def test_gradient_checkpointing_matches_plain_backward() -> None:
    cfg = tiny()
    plain, ckpt = build(cfg), build(dataclasses.replace(cfg, use_checkpoint=True))
    ckpt.load_state_dict(plain.state_dict())
    randomize_zero_params(plain)
    randomize_zero_params(ckpt)
    x, t = inputs(cfg)
    plain(x, t).square().mean().backward()
    ckpt(x, t).square().mean().backward()
    for (n, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=n)


# --- mixed precision ----------------------------------------------------------------------------------------
def test_bf16_autocast_close_to_fp32() -> None:
    cfg = tiny(num_classes=3)
    model = build(cfg).eval()
    randomize_zero_params(model)
    x, t = inputs(cfg)
    y = torch.tensor([1, 3])
    ref = model(x, t, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, y)
    assert out.dtype == torch.float32  # handed back in the caller's dtype
    assert torch.isfinite(out).all()
    rel = (out - ref).norm() / ref.norm()
    assert rel < 0.03, f"bf16 relative error {rel:.4f}"


def test_bf16_autocast_backward_runs() -> None:
    cfg = tiny()
    model = build(cfg)
    randomize_zero_params(model)
    x, t = inputs(cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x, t).float().square().mean()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("channels_last", [True, False])
def test_groupnorm_under_autocast_matches_fp32(channels_last: bool) -> None:
    torch.manual_seed(0)
    gn = GroupNorm(8, 64)
    nn.init.normal_(gn.weight)
    nn.init.normal_(gn.bias)
    x = (torch.randn(4, 64, 8, 8) * 5 + 3).bfloat16()  # offset + scale: where low-precision stats would suffer
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    grad = torch.randn(4, 64, 8, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = gn(x)
    y.backward(grad)
    assert y.dtype == torch.bfloat16
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    x32 = x.detach().float().requires_grad_()
    w32, b32 = (p.detach().clone().requires_grad_() for p in (gn.weight, gn.bias))
    y32 = nn.functional.group_norm(x32, 8, w32, b32)
    y32.backward(grad.float())
    torch.testing.assert_close(y.float(), y32, atol=0.05, rtol=0.01)  # bf16 output rounding only
    torch.testing.assert_close(x.grad.float(), x32.grad, atol=0.02, rtol=0.01)
    torch.testing.assert_close(gn.weight.grad, w32.grad)  # fp32 parameters get fp32-exact grads
    torch.testing.assert_close(gn.bias.grad, b32.grad)


# --- attention placement ------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn_res, n_res", [((8,), 1), ((16, 4), 2), ((), 2)])
def test_attention_only_at_requested_resolutions(attn_res: tuple[int, ...], n_res: int) -> None:
    cfg = tiny(channel_mult=(1, 2, 2), attention_resolutions=attn_res, num_res_blocks=n_res)
    model = build(cfg)
    # Encoder: n_res per attended level; decoder: n_res + 1; middle block: always one.
    expected = len(attn_res) * (2 * n_res + 1) + 1
    blocks = [m for m in model.modules() if isinstance(m, AttentionBlock)]
    assert len(blocks) == expected
    seen: list[int] = []
    for b in blocks:
        b.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[-1]))
    x, t = inputs(cfg)
    model(x, t)
    bottom = cfg.image_size // cfg.downsample_factor
    assert seen.count(bottom) >= 1  # the middle block
    assert set(seen) <= set(attn_res) | {bottom}
    for r in attn_res:
        assert seen.count(r) >= 2 * n_res + 1


# --- config -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(image_size=18, channel_mult=(1, 2, 2)), "image_size"),  # 18 % 2**(3-1) != 0
        (dict(attention_resolutions=(4,)), "attention_resolutions"),  # levels are 16 and 8
        (dict(num_heads=3), "num_heads"),
        (dict(num_head_channels=24), "num_head_channels"),
        (dict(model_channels=40), "model_channels"),  # 40 not divisible by 32 groups
        (dict(channel_mult=()), "channel_mult"),
        (dict(dropout=1.0), "dropout"),
        (dict(num_classes=0), "num_classes"),
        (dict(num_res_blocks=0), "num_res_blocks"),
    ],
)
def test_config_validation_names_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"UNetConfig\.{field}"):
        tiny(**overrides)


def test_config_round_trips_and_rejects_unknown_keys() -> None:
    cfg = tiny(num_classes=10, learn_sigma=True)
    assert from_dict(UNetConfig, to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="num_head"):
        from_dict(UNetConfig, {**to_dict(cfg), "num_head": 4})


def test_small_widths_use_fewer_groups() -> None:
    assert num_groups_for(256) == 32
    assert num_groups_for(16) == 16
    assert num_groups_for(96) == 32
    assert num_groups_for(48) == 24
    tiny(model_channels=16, channel_mult=(1, 2))  # 16 and 32 channels: valid


def test_timestep_embedding_shape_and_range() -> None:
    emb = timestep_embedding(torch.tensor([0, 10, 999]), 33)
    assert emb.shape == (3, 33) and emb.dtype == torch.float32
    assert emb.abs().max() <= 1.0
    torch.testing.assert_close(emb[0, :16], torch.ones(16))  # cos(0) = 1


# --- input validation ---------------------------------------------------------------------------------------
def test_labels_without_num_classes_raise() -> None:
    cfg = tiny()
    x, t = inputs(cfg)
    with pytest.raises(ValueError, match="num_classes is None"):
        build(cfg)(x, t, torch.tensor([0, 1]))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: (torch.randn(2, 4, 16, 16), torch.zeros(2), None), r"x must be \(B, 3, H, W\)"),
        (lambda: (torch.randn(2, 3, 15, 16), torch.zeros(2), None), "divisible by 2"),
        (lambda: (torch.randn(2, 3, 16, 16), torch.zeros(3), None), "t must be"),
        (lambda: (torch.randn(2, 3, 16, 16), torch.zeros(2), torch.tensor([0, 6])), r"y must be in \[0, 5\]"),
        (lambda: (torch.randn(2, 3, 16, 16), torch.zeros(2), torch.tensor([0.0, 1.0])), "integer labels"),
    ],
)
def test_bad_inputs_raise_clear_errors(make, match: str) -> None:
    model = build(tiny(num_classes=5))
    x, t, y = make()
    with pytest.raises(ValueError, match=match):
        model(x, t, y)
