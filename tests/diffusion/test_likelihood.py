import math

import pytest
import torch

from pakhsh.diffusion import GaussianDiffusion, calc_bpd, dataset_bpd, linear_betas, prior_bpd, vb_term_bpd
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
    f64 = lambda v: torch.tensor(v, dtype=torch.float64)
    inner = torch.log(Phi(f64(1 / 255 / sigma)) - Phi(f64(-1 / 255 / sigma)))
    edge = torch.log(Phi(f64(1 / 255 / sigma)))
    per_dim = torch.where(x0.abs() > 0.999, edge, inner)
    decoder = -per_dim.mean(dim=(1, 2, 3)) / math.log(2)
    assert torch.allclose(out.vb[:, 0], decoder, atol=1e-6)
    # prior: KL(N(sqrt(abar_T) x0, 1 - abar_T) || N(0, 1)) per dim
    abar = d.alphas_cumprod[-1].item()
    prior = (0.5 * (-1 - math.log(1 - abar) + (1 - abar) + abar * x0**2)).mean(dim=(1, 2, 3)) / math.log(2)
    assert torch.allclose(out.prior_bpd, prior, atol=1e-6)
    assert torch.allclose(out.total_bpd, decoder + prior, atol=1e-5)
    assert torch.allclose(prior_bpd(d, x0), prior, atol=1e-6)


def test_dataset_bpd_averages_batches(gen):
    d = GaussianDiffusion(linear_betas(30))
    data = [torch.rand(3, 1, 4, 4, generator=gen) * 2 - 1 for _ in range(3)]
    zero = lambda x, t, **k: torch.zeros_like(x)
    rep = dataset_bpd(d, zero, [{"image": b} for b in data], max_images=7, generator=torch.Generator().manual_seed(0), progress=False)
    assert rep.num_images == 7 and len(rep.terms_bpd) == 30
    assert rep.bpd == pytest.approx(sum(rep.terms_bpd) + rep.prior_bpd, rel=1e-5)
    assert rep.bpd > 0


def _toy_eps(x, t, **k):
    # a deterministic, imperfect eps model, so every term of the bound is non-zero
    return torch.tanh(0.8 * x - 0.002 * t.view(-1, 1, 1, 1).to(x.dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_calc_bpd_returns_float64_of_float64_maths(dtype, gen):
    d = GaussianDiffusion(linear_betas(40))
    x0 = (torch.randint(0, 256, (2, 1, 4, 4), generator=gen).double() / 127.5 - 1).to(dtype)
    out = calc_bpd(d, _toy_eps, x0, generator=torch.Generator().manual_seed(3), clip_denoised=False)
    for name in ("total_bpd", "prior_bpd", "vb", "x0_mse", "eps_mse"):
        assert getattr(out, name).dtype == torch.float64, name
    # the reference: the same noise, x_t made in x_0's dtype (what the network saw), every term then in float64
    g = torch.Generator().manual_seed(3)
    vb = torch.zeros(2, 40, dtype=torch.float64)
    for i in range(39, -1, -1):
        t = torch.full((2,), i, dtype=torch.long)
        noise = torch.randn(x0.shape, generator=g).to(dtype)
        x_t = d.q_sample(x0, t, noise)
        vb[:, i], _ = vb_term_bpd(d, _toy_eps, x0.double(), x_t.double(), t, model_output=_toy_eps(x_t, t).double())
    prior = prior_bpd(d, x0.double())
    assert torch.allclose(out.vb, vb, rtol=1e-12, atol=1e-12)
    assert torch.allclose(out.prior_bpd, prior, rtol=1e-12, atol=1e-12)
    assert torch.allclose(out.total_bpd, vb.sum(1) + prior, rtol=1e-12, atol=1e-12)
    assert out.vb[:, 1:].abs().min() > 1e-6  # the toy model really leaves KL terms to sum
