"""LoRA on our UNet (training/lora.py): the adapters in diffusers' layout are what diffusers loads, and adapters that
do not fit are refused, naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pakhsh.nets.unet import UNet, UNetConfig
from pakhsh.training.lora import (
    LORA_FILE,
    LoraError,
    inject_lora,
    is_lora_key,
    lora_from_diffusers,
    lora_to_diffusers,
    lora_weights,
    set_lora_weights,
)


def tiny_unet(context_dim: int | None = 16) -> UNet:
    torch.manual_seed(0)
    return UNet(UNetConfig(image_size=8, in_channels=4, out_channels=4, model_channels=16, channel_mult=(1, 2),
                           num_res_blocks=1, attention_resolutions=(4,), num_heads=2, context_dim=context_dim))


def random_adapters(net: UNet, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, v in net.state_dict().items():
            if is_lora_key(k):
                v.copy_(0.1 * torch.randn(v.shape, generator=g))


def test_our_lora_layout_is_what_diffusers_loads(tmp_path: Path) -> None:
    """A tiny diffusers StableDiffusionPipeline and our UNet with its UNet's weights; random adapters on ours, written
    in diffusers' layout as `save_lora` writes them and read by diffusers' own `load_lora_weights(folder)`: the two
    UNets agree, and reading the file back into ours gives the same adapters."""
    pytest.importorskip("diffusers")
    from safetensors.torch import save_file

    from pakhsh.interop.stable_diffusion import unet_config_from_diffusers, unet_state_from_diffusers
    from tests.interop.test_stable_diffusion import SD_DDIM, _pipeline

    pipe = _pipeline(SD_DDIM)
    cfg, problems = unet_config_from_diffusers(dict(pipe.unet.config))
    ours = UNet(cfg)
    state, problems = unet_state_from_diffusers(ours, pipe.unet.state_dict())
    assert problems == []
    ours.load_state_dict(state)
    inject_lora(ours, 3, alpha=6.0)  # scale 2: folded into B on export
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for k, v in ours.state_dict().items():
            if is_lora_key(k):
                v.copy_(0.1 * torch.randn(v.shape, generator=g))
    exported = lora_to_diffusers(ours, lora_weights(ours))
    save_file(exported, str(tmp_path / LORA_FILE))
    x, ctx, t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 16, 32, generator=g), torch.tensor([5, 700])
    with torch.no_grad():
        before = pipe.unet(x, t, encoder_hidden_states=ctx).sample
        pipe.load_lora_weights(str(tmp_path))
        mine, theirs = ours.eval()(x, t, context=ctx), pipe.unet(x, t, encoder_hidden_states=ctx).sample
    assert (mine - theirs).abs().max() < 1e-4  # measured 1.3e-6
    assert (mine - before).abs().max() > 1e-2  # the adapters do something
    back = lora_from_diffusers(ours, exported)  # and back: diffusers' layout -> ours gives the same adapters
    fresh = UNet(cfg)
    fresh.load_state_dict(state)
    inject_lora(fresh, 3)
    set_lora_weights(fresh, back)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x, t, context=ctx), mine, rtol=1e-5, atol=1e-5)


def test_adapters_round_trip_through_diffusers_layout_on_a_tiny_unet() -> None:
    net = inject_lora(tiny_unet(), 2, alpha=4.0)
    random_adapters(net, 0)
    ours = lora_weights(net)
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in ours) and len(ours) % 2 == 0
    fresh = inject_lora(tiny_unet(), 2, alpha=4.0)
    set_lora_weights(fresh, lora_from_diffusers(fresh, lora_to_diffusers(net, ours)))
    for key, value in lora_weights(fresh).items():
        torch.testing.assert_close(value, ours[key])


def test_no_transformer_blocks_no_adapters() -> None:
    with pytest.raises(LoraError, match="no transformer blocks"):
        inject_lora(tiny_unet(context_dim=None), 2)


def test_adapters_of_another_rank_are_refused_naming_the_key() -> None:
    net = inject_lora(tiny_unet(), 2)
    random_adapters(net, 0)
    other = inject_lora(tiny_unet(), 3)
    with pytest.raises(LoraError, match=r"lora_A.weight is \(2, .*another rank"):
        set_lora_weights(other, lora_weights(net), "x.safetensors")


def test_fused_parts_with_different_a_or_a_missing_part_are_refused() -> None:
    net = inject_lora(tiny_unet(), 2)
    random_adapters(net, 1)
    theirs = lora_to_diffusers(net, lora_weights(net))
    key_q = next(k for k in theirs if ".attn1.to_q.lora_A." in k)
    changed = dict(theirs)
    changed[key_q] = theirs[key_q] + 1.0
    with pytest.raises(LoraError, match="the LoRA A of attn1.to_q, attn1.to_k, attn1.to_v differ"):
        lora_from_diffusers(net, changed)
    lacking = {k: v for k, v in theirs.items() if ".attn2.to_v.lora_B." not in k}
    with pytest.raises(LoraError, match="lacks the LoRA B of attn2.to_v"):
        lora_from_diffusers(net, lacking)
    with pytest.raises(LoraError, match="'unet.nowhere.lora_A.weight' is not a LoRA weight"):
        lora_from_diffusers(net, {**theirs, "unet.nowhere.lora_A.weight": torch.zeros(1)})
