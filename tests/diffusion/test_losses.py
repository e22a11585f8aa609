import math

import pytest
import torch

from pakhsh.diffusion import (
    GaussianDiffusion,
    LossAwareSampler,
    UniformSampler,
    discretized_gaussian_log_likelihood,
    linear_betas,
    normal_kl,
    training_losses,
)


def test_kl_identical_is_zero_and_matches_monte_carlo(gen):
    m, lv = torch.tensor([0.3]), torch.tensor([-1.2])
    assert normal_kl(m, lv, m, lv).item() == 0.0
    m2, lv2 = torch.tensor([-0.4]), torch.tensor([0.5])
    x = m + torch.exp(0.5 * lv) * torch.randn(400000, generator=gen, dtype=torch.float64)
    logp = -0.5 * (math.log(2 * math.pi) + lv + (x - m) ** 2 / lv.exp())
    logq = -0.5 * (math.log(2 * math.pi) + lv2 + (x - m2) ** 2 / lv2.exp())
    mc = (logp - logq).mean().item()
    assert normal_kl(m, lv, m2, lv2).item() == pytest.approx(mc, abs=5e-3)


@pytest.mark.parametrize("mean,log_scale", [(0.0, -3.0), (0.7, -1.0), (-0.99, -5.0), (0.2, 1.0)])
def test_discretized_likelihood_sums_to_one(mean, log_scale):
    bins = torch.linspace(-1, 1, 256, dtype=torch.float64)
    lp = discretized_gaussian_log_likelihood(
        bins, means=torch.full_like(bins, mean), log_scales=torch.full_like(bins, log_scale)
    )
    assert lp.exp().sum().item() == pytest.approx(1.0, abs=1e-6)


def _linear_model(c: int, learned: bool):
    net = torch.nn.Conv2d(c, 2 * c if learned else c, 1)
    return net, (lambda x, t, **k: net(x))


def test_hybrid_gradient_reaches_mean_only_through_simple(gen):
    torch.manual_seed(0)
    d = GaussianDiffusion(linear_betas(100), variance="learned_range")
    net, model = _linear_model(3, True)
    x0 = torch.rand(8, 3, 4, 4, generator=gen) * 2 - 1
    t = torch.randint(0, 100, (8,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    terms = training_losses(d, model, x0, t, loss_type="hybrid", noise=noise)
    # gradient of the vb part alone: zero on the rows of the conv that produce the mean (first 3 channels)
    net.zero_grad()
    (terms.loss - terms.mse).sum().backward(retain_graph=True)
    assert net.weight.grad[:3].abs().max().item() == 0.0
    assert net.weight.grad[3:].abs().max().item() > 0.0
    # the mse part reaches only the mean rows
    net.zero_grad()
    terms.mse.sum().backward()
    assert net.weight.grad[3:].abs().max().item() == 0.0
    assert net.weight.grad[:3].abs().max().item() > 0.0


def test_hybrid_weighting_and_kl_objectives(gen):
    d = GaussianDiffusion(linear_betas(200), variance="learned_range")
    _, model = _linear_model(1, True)
    x0 = torch.rand(4, 1, 4, 4, generator=gen) * 2 - 1
    t = torch.tensor([0, 5, 100, 199])
    noise = torch.randn(x0.shape, generator=gen)
    h = training_losses(d, model, x0, t, loss_type="hybrid", noise=noise, vlb_weight=0.001)
    assert torch.allclose(h.loss, h.mse + 0.001 * 200 * h.vb)
    kl = training_losses(d, model, x0, t, loss_type="kl", noise=noise)
    rkl = training_losses(d, model, x0, t, loss_type="rescaled_kl", noise=noise)
    assert torch.allclose(kl.vb, h.vb, atol=1e-6)
    assert torch.allclose(rkl.loss, 200 * kl.loss)
    assert (kl.vb > 0).all()


def test_simple_loss_is_mse_on_target(gen):
    for output in ["eps", "x0", "v"]:
        d = GaussianDiffusion(linear_betas(50), model_output=output)
        zero = lambda x, t, **k: torch.zeros_like(x)
        x0 = torch.rand(3, 1, 2, 2, generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.tensor([1, 10, 40])
        terms = training_losses(d, zero, x0, t, noise=noise)
        target = d.training_target(x0, t, noise)
        assert torch.allclose(terms.loss, (target**2).mean(dim=(1, 2, 3)))


def test_loss_objective_mismatch_errors():
    fixed = GaussianDiffusion(linear_betas(30))
    learned = GaussianDiffusion(linear_betas(30), variance="learned_range")
    x0, t = torch.zeros(1, 1, 2, 2), torch.tensor([1])
    with pytest.raises(ValueError, match="hybrid"):
        training_losses(learned, lambda x, t: torch.zeros(1, 2, 2, 2), x0, t, loss_type="simple")
    with pytest.raises(ValueError, match="learned_range"):
        training_losses(fixed, lambda x, t: x, x0, t, loss_type="hybrid")


def test_loss_aware_sampler_importance_weights(gen):
    s = LossAwareSampler(4, history=2, uniform_prob=0.0)
    assert torch.equal(s.sample(8, generator=gen).weights, torch.ones(8))  # uniform during warm-up
    for _ in range(2):
        s.update(torch.tensor([0, 1, 2, 3]), torch.tensor([1.0, 1.0, 2.0, 4.0]))
    p = s.probabilities()
    assert p == pytest.approx([1 / 8, 1 / 8, 2 / 8, 4 / 8])
    batch = s.sample(10000, generator=gen)
    # unbiased: E_p[w * L_t] = mean_t L_t
    losses = torch.tensor([1.0, 1.0, 2.0, 4.0])[batch.t]
    assert (batch.weights * losses).mean().item() == pytest.approx(2.0, rel=0.03)
    assert UniformSampler(5).probabilities().sum() == pytest.approx(1.0)
