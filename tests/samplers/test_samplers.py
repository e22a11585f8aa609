import pytest
import torch

from pakhsh.diffusion import GaussianDiffusion, cosine_betas, linear_betas
from pakhsh.samplers import (
    ClassifierFreeGuidance,
    ancestral_sample,
    ddim_invert,
    ddim_sample,
    dpm_solver_pp_2m,
    interpolate,
    sample,
    vary,
)
from tests.conftest import TrueEpsModel


class GaussianOptimal:
    """The exact eps-predictor for data x_0 ~ N(mu, s^2) per pixel: a smooth, non-trivial ODE."""

    def __init__(self, base: GaussianDiffusion, mu: float = 0.2, s: float = 0.5) -> None:
        self.base, self.mu, self.s = base, mu, s

    def __call__(self, x_t, t, **cond):
        abar = self.base.alphas_cumprod[t].to(x_t.dtype).view(-1, 1, 1, 1)
        return (1 - abar).sqrt() * (x_t - abar.sqrt() * self.mu) / (abar * self.s**2 + 1 - abar)


def _x0(gen, shape=(2, 3, 4, 4)):
    return torch.rand(shape, generator=gen, dtype=torch.float64) * 1.8 - 0.9


@pytest.mark.parametrize(
    "sampler,spacing,kw",
    [
        ("ddpm", None, {}),
        ("ddpm", "10", {}),
        ("ddpm", "3,4,5", {}),
        ("ddim", "ddim10", {"eta": 0.0}),
        ("ddim", "ddim10", {"eta": 1.0}),
        ("dpm++2m", "10", {}),
        ("dpm++2m", "25", {}),
        ("sde-dpm++2m", "10", {}),
        ("sde-dpm++2m", "25", {}),
    ],
)
@pytest.mark.parametrize("output", ["eps", "x0", "v"])
def test_true_eps_model_recovers_x0(sampler, spacing, kw, output, gen):
    base = GaussianDiffusion(linear_betas(100), model_output=output)
    x0 = _x0(gen)
    model = TrueEpsModel(base, x0)
    x_T = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    out = sample(base, model, x_T, sampler=sampler, spacing=spacing, generator=gen, **kw)
    assert torch.allclose(out, x0, atol=1e-6)
    expected_calls = 100 if spacing is None else len(base.respace(spacing).timestep_map)
    assert model.calls == expected_calls


@pytest.mark.parametrize("steps", [1000, 4000])
def test_respaced_learned_variance_and_long_chains(steps, gen):
    base = GaussianDiffusion(cosine_betas(steps), variance="learned_range")
    x0 = _x0(gen, (1, 1, 4, 4))
    model = TrueEpsModel(base, x0, learned_var=0.3)
    out = ancestral_sample(base.respace("20"), model, torch.randn(x0.shape, generator=gen, dtype=torch.float64), generator=gen)
    assert torch.allclose(out, x0, atol=1e-6)


def test_ddim_inversion_round_trip(gen):
    base = GaussianDiffusion(linear_betas(1000))
    model = GaussianOptimal(base)
    x0 = 0.2 + 0.5 * torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64)
    errors = []
    for n in (50, 200):
        d = base.respace(f"ddim{n}")
        x_T = ddim_invert(d, model, x0, clip_denoised=False)
        assert x_T.std().item() == pytest.approx(1.0, abs=0.35)  # close to a unit Gaussian latent
        back = ddim_sample(d, model, x_T, eta=0.0, clip_denoised=False)
        errors.append((back - x0).abs().max().item())
    # DDIM inversion is a first-order ODE solve: 4x the steps gives about 4x less round-trip error
    assert errors[1] < 0.05
    assert errors[1] < 0.3 * errors[0]


def test_same_seed_same_samples():
    base = GaussianDiffusion(linear_betas(100))
    model = GaussianOptimal(base)
    runs = []
    for seed in (7, 7, 8):
        g = torch.Generator().manual_seed(seed)
        x_T = torch.randn(2, 1, 4, 4, generator=g)
        runs.append(ancestral_sample(base.respace("10"), model, x_T, generator=g))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_callback_and_start_step(gen):
    base = GaussianDiffusion(linear_betas(100))
    d, model = base.respace("10"), GaussianOptimal(base)
    steps = []
    x = torch.randn(1, 1, 2, 2, generator=gen)
    ddim_sample(d, model, x, callback=lambda s: steps.append(s.t), start_step=4)
    assert steps == [4, 3, 2, 1, 0]
    with pytest.raises(ValueError, match="start_step"):
        ancestral_sample(d, model, x, start_step=10)
    with pytest.raises(ValueError, match="eta"):
        ddim_sample(d, model, x, eta=1.5)


def test_classifier_free_guidance_formula():
    def model(x, t, y):
        # conditional output depends on the label; null label 9 gives the unconditional output
        return x * 0 + y.view(-1, 1, 1, 1).float()

    x, t = torch.zeros(2, 2, 1, 1), torch.zeros(2, dtype=torch.long)
    y = torch.tensor([3, 5])
    cfg = ClassifierFreeGuidance(model, 3.0, {"y": 9})
    out = cfg(x, t, y=y)
    expected = 9 + 3.0 * (y.float() - 9)
    assert torch.allclose(out[:, 0, 0, 0], expected)
    assert torch.equal(ClassifierFreeGuidance(model, 1.0, {"y": 9})(x, t, y=y), model(x, t, y))
    # learned variance: only the first channel is guided, the second comes from the conditional half
    half = ClassifierFreeGuidance(model, 3.0, {"y": 9}, guided_channels=1)(x, t, y=y)
    assert torch.allclose(half[:, 0, 0, 0], expected) and torch.allclose(half[:, 1, 0, 0], y.float())
    with pytest.raises(ValueError, match="null condition"):
        cfg(x, t)


def test_vary_keeps_more_at_small_t(gen):
    base = GaussianDiffusion(linear_betas(1000))
    model = GaussianOptimal(base)
    x0 = 0.2 + 0.5 * torch.randn(1, 1, 8, 8, generator=gen)
    d = base.respace("50")
    near = vary(d, model, x0, t=100, count=4, generator=gen)
    far = vary(d, model, x0, t=900, count=4, generator=gen)
    assert near.shape == (4, 1, 8, 8)
    assert (near - x0).pow(2).mean() < (far - x0).pow(2).mean()
    assert not torch.allclose(near[0], near[1])


def test_interpolate_rows_share_reverse_noise(gen):
    base = GaussianDiffusion(linear_betas(1000))
    model = GaussianOptimal(base)
    d = base.respace("20")
    a, b = torch.full((1, 1, 4, 4), -0.5), torch.full((1, 1, 4, 4), 0.5)
    lams = [0.0, 0.5, 1.0]
    out = interpolate(d, model, a, b, lams, t=500, shared_noise=True, generator=torch.Generator().manual_seed(3))
    assert out.shape == (3, 1, 4, 4)
    # with shared encoding noise and shared reverse noise, the rows are ordered by lambda pixel-wise
    assert (out[0] <= out[1] + 1e-6).all() and (out[1] <= out[2] + 1e-6).all()
    again = interpolate(d, model, a, b, lams, t=500, shared_noise=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(out, again)
    sl = interpolate(d, model, a, b, lams, t=500, mixing="slerp", generator=gen)
    assert sl.shape == (3, 1, 4, 4)
