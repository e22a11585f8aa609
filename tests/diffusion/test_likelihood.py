import math

import pytest
import torch

from pakhsh.diffusion import GaussianDiffusion, calc_bpd, dataset_bpd, linear_betas, prior_bpd
from tests.conftest import TrueEpsModel

Phi = lambda z: 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))


def test_perfect_model_bpd_equals_analytic_bound(gen):
    d = GaussianDiffusion(linear_betas(50))
    # 8-bit data on the 256-bin grid
    x0 = (torch.randint(0, 256, (2, 1, 4, 4), generator=gen).double() / 127.5 - 1)
    out = calc_bpd(d, TrueEpsModel(d, x0), x0, generator=gen, clip_denoised=False)
    # KL terms vanish for t > 0: the predicted x_0 is exact, and the variance is the posterior's
    assert out.vb[:, 1:].abs().max().item() < 1e-6
    # decoder: discretised Gaussian centred on x_0 with sigma^2 = beta-tilde_1
    sigma = math.sqrt(d.posterior_variance[1].item())
    inner = torch.log(Phi(torch.tensor(1 / 255 / sigma)) - Phi(torch.tensor(-1 / 255 / sigma)))
    edge = torch.log(Phi(torch.tensor(1 / 255 / sigma)))
    per_dim = torch.where(x0.abs() > 0.999, edge, inner)
    decoder = -per_dim.mean(dim=(1, 2, 3)) / math.log(2)
    assert torch.allclose(out.vb[:, 0], decoder, atol=1e-6)
    # prior: KL(N(sqrt(abar_T) x0, 1 - abar_T) || N(0, 1)) per dim
    abar = d.alphas_cumprod[-1].item()
    prior = (0.5 * (-1 - math.log(1 - abar) + (1 - abar) + abar * x0**2)).mean(dim=(1, 2, 3)) / math.log(2)
    assert torch.allclose(out.prior_bpd, prior.float(), atol=1e-6)
    assert torch.allclose(out.total_bpd, (decoder + prior).float(), atol=1e-5)
    assert torch.allclose(prior_bpd(d, x0).float(), prior.float(), atol=1e-6)


def test_dataset_bpd_averages_batches(gen):
    d = GaussianDiffusion(linear_betas(30))
    data = [torch.rand(3, 1, 4, 4, generator=gen) * 2 - 1 for _ in range(3)]
    zero = lambda x, t, **k: torch.zeros_like(x)
    rep = dataset_bpd(d, zero, [{"image": b} for b in data], max_images=7, generator=torch.Generator().manual_seed(0), progress=False)
    assert rep.num_images == 7 and len(rep.terms_bpd) == 30
    assert rep.bpd == pytest.approx(sum(rep.terms_bpd) + rep.prior_bpd, rel=1e-5)
    assert rep.bpd > 0
