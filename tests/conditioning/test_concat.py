"""Palette conditioning: the net sees [x_t, degraded image, mask], known pixels are given clean and come out
exactly, with every sampler of the core; the regression baseline is one network call."""

from __future__ import annotations

import pytest
import torch

from pakhsh.conditioning.concat import ConcatConditioned, paste_known, regression_x0, restore
from pakhsh.diffusion import GaussianDiffusion
from pakhsh.diffusion.schedules import cosine_betas
from pakhsh.diffusion.gaussian import ModelOutput, VarianceType
from pakhsh.nets.unet import UNet, UNetConfig
from pakhsh.samplers import SAMPLERS
from pakhsh.samplers.common import ImageGenerators


def _net(seed: int = 0, num_classes: int | None = None) -> UNet:
    torch.manual_seed(seed)
    cfg = UNetConfig(image_size=8, in_channels=3, out_channels=3, cond_channels=4, model_channels=16,
                     channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(), dropout=0.0, num_groups=8,
                     num_classes=num_classes)
    net = UNet(cfg).eval()
    with torch.no_grad():  # zero-initialised layers (conv_out, each ResBlock's last conv) would hide the inputs
        for p in net.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    return net


def _cond(b: int = 3, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(b, 3, 8, 8, generator=g) * 2 - 1
    mask = (torch.rand(b, 1, 8, 8, generator=g) < 0.5).float()
    return {"cond_image": x0 * (1 - mask), "mask": mask}


def _diffusion() -> GaussianDiffusion:
    return GaussianDiffusion(cosine_betas(50), ModelOutput.EPS, VarianceType.FIXED_SMALL)


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_known_pixels_come_out_exactly_with_every_sampler(sampler: str) -> None:
    cond, net = _cond(), _net()
    d = _diffusion().respace("ddim5" if sampler == "ddim" else "5")
    x_T = ImageGenerators.for_images(0, range(3)).randn(3, 8, 8)
    out = restore(d, net, cond, x_T, sampler=sampler, generator=ImageGenerators.for_images(0, range(3)))
    known = cond["mask"].expand_as(out) < 0.5
    assert torch.equal(out[known], cond["cond_image"][known])
    assert (out[~known] != cond["cond_image"][~known]).float().mean() > 0.9  # the rest was generated
    assert out.abs().max() <= 1.0


def test_net_never_sees_what_the_chain_holds_at_known_pixels() -> None:
    """So pasting at the end equals re-imposing the known region at every step, for any sampler."""
    cond, wrapped = _cond(), ConcatConditioned(_net())
    t = torch.full((3,), 20)
    x_t = torch.randn(3, 3, 8, 8)
    other = torch.where(cond["mask"] > 0.5, x_t, torch.randn(3, 3, 8, 8) * 5)
    with torch.no_grad():
        assert torch.equal(wrapped(x_t, t, **cond), wrapped(other, t, **cond))
        changed = torch.where(cond["mask"] > 0.5, x_t + 1, x_t)  # an unknown pixel changes: the output does
        assert not torch.equal(wrapped(x_t, t, **cond), wrapped(changed, t, **cond))


def test_regression_is_one_network_call_and_ignores_noise() -> None:
    net, cond = _net(), _cond()
    calls = []
    net.register_forward_hook(lambda *a: calls.append(1))
    a = restore(_diffusion(), net, cond, torch.randn(3, 3, 8, 8), objective="regression")
    b = restore(_diffusion(), net, cond, torch.randn(3, 3, 8, 8), objective="regression")
    assert len(calls) == 2 and torch.equal(a, b)
    with torch.no_grad():
        pred = regression_x0(ConcatConditioned(net), cond).clamp(-1, 1)
    assert torch.equal(a, paste_known(pred, cond["cond_image"], cond["mask"]))


def test_task_label_reaches_the_net() -> None:
    net, cond = _net(num_classes=4), _cond()
    wrapped, t, x = ConcatConditioned(net), torch.full((3,), 10), torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        a = wrapped(x, t, **cond, y=torch.zeros(3, dtype=torch.long))
        b = wrapped(x, t, **cond, y=torch.full((3,), 2))
    assert not torch.allclose(a, b)


def test_shape_errors_name_the_part() -> None:
    wrapped, cond = ConcatConditioned(_net()), _cond()
    x, t = torch.randn(3, 3, 8, 8), torch.full((3,), 1)
    with pytest.raises(ValueError, match="mask must be"):
        wrapped(x, t, cond_image=cond["cond_image"], mask=cond["mask"][:, :, :4])
    with pytest.raises(ValueError, match="cond_image"):
        wrapped(x, t, cond_image=cond["cond_image"][:2], mask=cond["mask"])


def test_unet_condition_channels() -> None:
    net = _net()
    x, t = torch.randn(2, 3, 8, 8), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="condition channels"):
        net(x, t)
    with pytest.raises(ValueError, match="concat must be"):
        net(x, t, concat=torch.zeros(2, 3, 8, 8))
    assert net(x, t, concat=torch.zeros(2, 4, 8, 8)).shape == (2, 3, 8, 8)
    plain = UNet(UNetConfig(image_size=8, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                            attention_resolutions=(), num_groups=8))
    with pytest.raises(ValueError, match="cond_channels is 0"):
        plain(x, t, concat=torch.zeros(2, 4, 8, 8))
    with pytest.raises(ValueError, match="cond_channels"):
        UNetConfig(cond_channels=-1)
