import math

import numpy as np
import pytest
import torch

from pakhsh.diffusion import GaussianDiffusion, ModelOutput, VarianceType, cosine_betas, linear_betas, process_x0
from tests.conftest import TrueEpsModel, tiny_diffusion


def test_q_sample_moments(gen):
    d = GaussianDiffusion(linear_betas(1000))
    x0 = torch.full((20000, 1, 1, 1), 0.5, dtype=torch.float64)
    t = torch.full((20000,), 300, dtype=torch.long)
    x_t = d.q_sample(x0, t, torch.randn(x0.shape, generator=gen, dtype=torch.float64))
    abar = d.alphas_cumprod[300].item()
    assert x_t.mean().item() == pytest.approx(math.sqrt(abar) * 0.5, abs=0.02)
    assert x_t.var().item() == pytest.approx(1 - abar, rel=0.05)


def test_posterior_matches_bayes_rule_numerically(gen):
    """q(x_{t-1}|x_t,x_0) from the closed form equals the product of q(x_t|x_{t-1}) q(x_{t-1}|x_0) normalised."""
    d = GaussianDiffusion(cosine_betas(50))
    t, x0, xt = 20, 0.3, -0.4
    a_t = 1 - d.betas[t].item()
    abar_prev = d.alphas_cumprod[t - 1].item()
    grid = np.linspace(-4, 4, 200001)
    logp = -((xt - math.sqrt(a_t) * grid) ** 2) / (2 * (1 - a_t)) - (grid - math.sqrt(abar_prev) * x0) ** 2 / (2 * (1 - abar_prev))
    p = np.exp(logp - logp.max())
    p /= p.sum()
    mean_num, var_num = (p * grid).sum(), (p * grid**2).sum() - (p * grid).sum() ** 2
    mean, var, _ = d.q_posterior(torch.tensor([[[[x0]]]], dtype=torch.float64), torch.tensor([[[[xt]]]], dtype=torch.float64), torch.tensor([t]))
    assert mean.item() == pytest.approx(mean_num, abs=1e-6)
    assert var.item() == pytest.approx(var_num, rel=1e-4)


@pytest.mark.parametrize("output", ["eps", "x0", "v"])
def test_conversions_round_trip(output, gen):
    d = tiny_diffusion(100, output)
    x0 = torch.rand(4, 3, 8, 8, generator=gen, dtype=torch.float64) * 2 - 1
    eps = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 10, 50, 99])
    x_t = d.q_sample(x0, t, eps)
    assert torch.allclose(d.x0_from_eps(x_t, t, eps), x0, atol=1e-9)
    assert torch.allclose(d.eps_from_x0(x_t, t, x0), eps, atol=1e-6)
    v = d.v_from_eps(x0, t, eps)
    assert torch.allclose(d.x0_from_v(x_t, t, v), x0, atol=1e-9)
    # the model that predicts the right target gives back x0 exactly through p_mean_variance
    model = TrueEpsModel(d, x0)
    out = d.p_mean_variance(model, x_t, t, clip_denoised=False)
    assert torch.allclose(out.pred_x0, x0, atol=1e-6)
    assert torch.allclose(out.pred_eps[1:], eps[1:], atol=1e-5)


def test_variance_types():
    b = linear_betas(100)
    x = torch.zeros(3, 1, 2, 2, dtype=torch.float64)
    t = torch.tensor([0, 1, 50])
    small = GaussianDiffusion(b, variance="fixed_small")
    large = GaussianDiffusion(b, variance="fixed_large")
    learned = GaussianDiffusion(b, variance="learned_range")
    zero_model = lambda x_t, tt, **k: torch.zeros_like(x_t)
    s = small.p_mean_variance(zero_model, x, t)
    l = large.p_mean_variance(zero_model, x, t)
    assert torch.allclose(s.variance[1:, 0, 0, 0], small.posterior_variance[[1, 50]])
    assert torch.allclose(l.variance[1:, 0, 0, 0], torch.tensor(b[[1, 50]]))
    assert l.variance[0, 0, 0, 0] == pytest.approx(small.posterior_variance[1].item())
    # learned range: v = -1 -> beta-tilde, v = +1 -> beta (iDDPM eq. 15)
    for v, ref in [(-1.0, s), (1.0, l)]:
        m = lambda x_t, tt, **k: torch.cat([torch.zeros_like(x_t), torch.full_like(x_t, v)], 1)
        o = learned.p_mean_variance(m, x, t)
        assert torch.allclose(o.log_variance[1:], ref.log_variance[1:], atol=1e-12)
    with pytest.raises(ValueError, match="channels"):
        learned.p_mean_variance(zero_model, x, t)


def test_respaced_model_sees_training_steps():
    d = GaussianDiffusion(linear_betas(1000)).respace("ddim10")
    seen = []

    def model(x_t, t, **k):
        seen.append(t.tolist())
        return torch.zeros_like(x_t)

    d.p_mean_variance(model, torch.zeros(2, 1, 2, 2), torch.tensor([0, 9]))
    assert seen == [[0, 900]]


def test_clip_and_dynamic_threshold():
    x = torch.tensor([[[[-3.0, 0.5, 2.0, 0.9]]]])
    assert torch.equal(process_x0(x, True), x.clamp(-1, 1))
    assert torch.equal(process_x0(x, False), x)
    y = process_x0(x, True, threshold=0.999)
    s = torch.quantile(x.abs().flatten(), 0.999)
    assert torch.allclose(y, x.clamp(-s, s) / s)
    assert y.abs().max() <= 1.0
    small = torch.tensor([[[[0.2, -0.5]]]])
    assert torch.equal(process_x0(small, True, threshold=0.9), small)  # s = max(s, 1): no rescale inside [-1, 1]
