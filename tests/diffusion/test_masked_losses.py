"""L1 and masked objectives (Palette): closed forms against hand computation."""

from __future__ import annotations

import pytest
import torch

from pakhsh.diffusion.losses import LossType, mean_flat, training_losses
from tests.conftest import tiny_diffusion


def test_masked_mean_flat_closed_form() -> None:
    x = torch.arange(8.0).reshape(2, 1, 2, 2)
    mask = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).reshape(1, 1, 2, 2).expand(2, 1, 2, 2)
    assert torch.equal(mean_flat(x, mask), torch.tensor([(0 + 3) / 2, (4 + 7) / 2]))
    x3 = x.expand(2, 3, 2, 2)  # a (B, 1, H, W) mask covers every channel
    assert torch.equal(mean_flat(x3, mask), mean_flat(x, mask))
    assert torch.equal(mean_flat(x, None), torch.tensor([1.5, 5.5]))


def _fixed_model(out: torch.Tensor):
    return lambda x_t, t, **cond: out


@pytest.mark.parametrize("loss", ["simple", "l1"])
def test_loss_is_the_mean_over_generated_pixels(loss: str) -> None:
    d = tiny_diffusion(50)
    g = torch.Generator().manual_seed(0)
    x0, noise, out = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
    mask = (torch.rand(2, 1, 4, 4, generator=g) < 0.5).float()
    t = torch.tensor([3, 40])
    terms = training_losses(d, _fixed_model(out), x0, t, loss_type=loss, noise=noise, mask=mask)
    err = (out - noise).abs() if loss == "l1" else (out - noise) ** 2  # eps target
    m = mask.expand_as(err)
    want = (err * m).sum(dim=(1, 2, 3)) / m.sum(dim=(1, 2, 3))
    torch.testing.assert_close(terms.loss, want)
    # changing the prediction only at known pixels changes nothing
    out2 = torch.where(mask > 0.5, out, out + 10)
    terms2 = training_losses(d, _fixed_model(out2), x0, t, loss_type=loss, noise=noise, mask=mask)
    torch.testing.assert_close(terms2.loss, terms.loss)


def test_l1_refuses_learned_variance() -> None:
    d = tiny_diffusion(50, variance="learned_range")
    x0 = torch.zeros(1, 3, 4, 4)
    with pytest.raises(ValueError, match="'l1' cannot train a learned variance"):
        training_losses(d, _fixed_model(torch.zeros(1, 6, 4, 4)), x0, torch.tensor([1]), loss_type=LossType.L1)
