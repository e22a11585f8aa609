"""The UNet's unCLIP input (UNetConfig.embed_dim / embed_tokens): a CLIP image embedding added to the timestep
embedding and appended as extra cross-attention tokens after the text context. None is the zero embedding (the
classifier-free-guidance null); shapes are checked; a UNet without embed_dim is the UNet it was (same state-dict
keys: checkpoints shipped before unCLIP still load) and refuses an embedding. Guidance through
`ClassifierFreeGuidance` with the zero embedding as the null: scale 1 = conditional, scale 0 = null output."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import pakhsh
from pakhsh.config import from_dict
from pakhsh.nets.transformer import SpatialTransformer
from pakhsh.nets.unet import UNet, UNetConfig
from pakhsh.samplers import ClassifierFreeGuidance

CTX, E = 24, 6  # context width, embedding width


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    """One torch thread (after conftest's two): tiny nets gain nothing from more, and the CPU is shared."""
    torch.set_num_threads(1)


def tiny(**overrides) -> UNetConfig:
    base = dict(image_size=8, model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
                dropout=0.0, num_heads=2, num_groups=8, context_dim=CTX, embed_dim=E, embed_tokens=3)
    base.update(overrides)
    return UNetConfig(**base)


def build(cfg: UNetConfig, seed: int = 0) -> UNet:
    """The UNet with its zero-initialised layers given small random weights (so every input shows in the output)."""
    torch.manual_seed(seed)
    net = UNet(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return net


def inputs(b: int = 2, length: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 3, 8, 8, generator=g), torch.randint(0, 1000, (b,), generator=g),
            torch.randn(b, length, CTX, generator=g), torch.randn(b, E, generator=g) * 3)


def test_no_embedding_is_the_zero_embedding() -> None:
    net = build(tiny())
    x, t, ctx, emb = inputs()
    with torch.no_grad():
        none = net(x, t, context=ctx)
        zeros = net(x, t, context=ctx, image_embed=torch.zeros(2, E))
        given = net(x, t, context=ctx, image_embed=emb)
    torch.testing.assert_close(none, zeros, rtol=0, atol=0)
    assert (given - none).abs().max() > 1e-3


def test_conv_out_starts_at_zero_so_a_fresh_decoder_ignores_everything() -> None:
    torch.manual_seed(0)
    net = UNet(tiny()).eval()
    x, t, ctx, emb = inputs()
    with torch.no_grad():
        assert not net(x, t, context=ctx, image_embed=emb).any()


@pytest.mark.parametrize("path", ["time", "tokens"])
def test_the_embedding_reaches_the_net_by_both_paths(path: str) -> None:
    """Each path alone changes the output: the time-embedding shift (tokens switched off) and the tokens (the
    projection to the time embedding zeroed)."""
    cfg = tiny(embed_tokens=0) if path == "time" else tiny()
    net = build(cfg)
    if path == "tokens":
        with torch.no_grad():
            net.image_embed_proj.weight.zero_()
            net.image_embed_proj.bias.zero_()
    else:
        assert net.image_embed_tokens is None
    x, t, ctx, emb = inputs()
    with torch.no_grad():
        a, b = net(x, t, context=ctx, image_embed=emb), net(x, t, context=ctx, image_embed=emb * -1)
    assert (a - b).abs().max() > 1e-3


def test_embedding_tokens_follow_the_text_context() -> None:
    net = build(tiny())
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    for m in net.modules():
        if isinstance(m, SpatialTransformer):
            m.register_forward_pre_hook(lambda mod, args: seen.append((args[1], args[2])))
    x, t, ctx, emb = inputs(length=4)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    with torch.no_grad():
        net(x, t, context=ctx, context_mask=mask, image_embed=emb)
    assert seen
    context, cmask = seen[0]
    assert context.shape == (2, 4 + 3, CTX)
    torch.testing.assert_close(context[:, :4], ctx)  # the caption first, unchanged
    want_tokens = net.image_embed_tokens(emb).reshape(2, 3, CTX)
    torch.testing.assert_close(context[:, 4:], want_tokens)
    assert torch.equal(cmask, torch.cat([mask, torch.ones(2, 3, dtype=torch.bool)], 1))  # the tokens are real
    # a decoder on the embedding alone (no caption): the tokens are the whole context
    seen.clear()
    with torch.no_grad():
        net(x, t, image_embed=emb)
    assert seen[0][0].shape == (2, 3, CTX)
    with pytest.raises(ValueError, match="context_mask given without context"):
        net(x, t, context_mask=mask, image_embed=emb)


def test_padding_beyond_the_caption_mask_is_still_ignored() -> None:
    net = build(tiny())
    x, t, ctx, emb = inputs()
    mask = torch.tensor([[True, True, False, False], [True, True, True, False]])
    junk = torch.where(mask[..., None], ctx, torch.randn(ctx.shape) * 10)
    with torch.no_grad():
        torch.testing.assert_close(net(x, t, context=junk, context_mask=mask, image_embed=emb),
                                   net(x, t, context=ctx, context_mask=mask, image_embed=emb), rtol=0, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, E + 1), (3, E), (2, 1, E), (E,)])
def test_wrong_embedding_shape_is_an_error(shape: tuple[int, ...]) -> None:
    net = build(tiny())
    x, t, ctx, _ = inputs()
    with pytest.raises(ValueError, match=rf"image_embed must be \(2, {E}\)"):
        net(x, t, context=ctx, image_embed=torch.zeros(shape))


def test_config_checks_name_the_key() -> None:
    with pytest.raises(ValueError, match="embed_tokens"):
        tiny(context_dim=None)  # tokens need cross-attention
    with pytest.raises(ValueError, match="embed_dim"):
        tiny(embed_dim=0)
    with pytest.raises(ValueError, match="embed_tokens"):
        tiny(embed_tokens=-1)
    net = build(tiny(context_dim=None, embed_tokens=0))  # the time-embedding shift alone needs no context
    x, t, _, emb = inputs()
    with torch.no_grad():
        assert net(x, t, image_embed=emb).shape == (2, 3, 8, 8)


# ------------------------------------------------------------------------------------------------ no embed_dim
def test_a_unet_without_embed_dim_refuses_an_embedding_and_has_no_new_keys() -> None:
    net = build(tiny(embed_dim=None))
    assert not any("image_embed" in k for k in net.state_dict())
    x, t, ctx, emb = inputs()
    with pytest.raises(ValueError, match="embed_dim is None"):
        net(x, t, context=ctx, image_embed=emb)
    with_embed = set(build(tiny()).state_dict())
    assert set(net.state_dict()) == {k for k in with_embed if not k.startswith("image_embed")}
    assert {k for k in with_embed if k.startswith("image_embed")} == {
        "image_embed_proj.weight", "image_embed_proj.bias", "image_embed_tokens.weight", "image_embed_tokens.bias"}


@pytest.mark.parametrize("name", ["t2i", "shapes"])
def test_checkpoints_shipped_before_unclip_keep_their_keys(name: str) -> None:
    """The shipped UNets were saved before embed_dim existed: their configs build a UNet with exactly their keys."""
    import json

    folder = Path(pakhsh.__file__).parent / "assets" / "models" / name
    cfg = json.loads((folder / "config.json").read_text())
    model_cfg = from_dict(UNetConfig, cfg["model"])
    assert model_cfg.embed_dim is None
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert set(UNet(model_cfg).state_dict()) == keys


# ------------------------------------------------------------------------------------------------ guidance
def test_guidance_one_and_zero_with_the_zero_embedding_as_the_null() -> None:
    net = build(tiny())
    x, t, ctx, emb = inputs()
    null = {"image_embed": torch.zeros(1, E)}
    with torch.no_grad():
        cond = net(x, t, context=ctx, image_embed=emb)
        uncond = net(x, t, context=ctx, image_embed=torch.zeros(2, E))
        g1 = ClassifierFreeGuidance(net, 1.0, null)(x, t, context=ctx, image_embed=emb)
        g0 = ClassifierFreeGuidance(net, 0.0, null)(x, t, context=ctx, image_embed=emb)
        g3 = ClassifierFreeGuidance(net, 3.0, null)(x, t, context=ctx, image_embed=emb)
    assert (cond - uncond).abs().max() > 1e-3
    torch.testing.assert_close(g1, cond, rtol=0, atol=1e-6)
    torch.testing.assert_close(g0, uncond, rtol=0, atol=1e-5)
    torch.testing.assert_close(g3, uncond + 3 * (cond - uncond), rtol=0, atol=1e-4)
