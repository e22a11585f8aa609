"""DPM-Solver++(2M) and SDE-DPM-Solver++(2M): the first-order final move, the SDE's noise, and registration."""

import math

import pytest
import torch

from pakhsh.diffusion import GaussianDiffusion, linear_betas
from pakhsh.samplers import (
    SAMPLERS,
    SamplerStep,
    default_spacing,
    dpm_solver_pp_2m,
    noise_dense_steps,
    sample,
    sde_dpm_solver_pp_2m,
)

SOLVERS = [dpm_solver_pp_2m, sde_dpm_solver_pp_2m]


def _constant_x0_model(x, t, **cond):
    # an x_0-predicting model whose prediction is a different constant at every training step
    return torch.full_like(x, 0.3) + 0.001 * t.view(-1, 1, 1, 1).to(x.dtype)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("steps", [2, 5, 10, 20])
def test_final_denoise_returns_the_last_x0_prediction_alone(solver, steps, gen):
    base = GaussianDiffusion(linear_betas(1000), model_output="x0")
    d = base.respace(str(steps))
    seen: list[SamplerStep] = []
    x_T = torch.randn(2, 1, 4, 4, generator=gen, dtype=torch.float64)
    out = solver(d, _constant_x0_model, x_T, clip_denoised=False, generator=gen, callback=seen.append)
    last = seen[-1]
    assert last.t == 0 and torch.equal(out, last.x) and torch.equal(out, last.pred_x0)
    # the prediction at chain step 0 (training step 0) is exactly 0.3: nothing else is mixed in
    assert torch.equal(out, torch.full_like(out, 0.3))


@pytest.mark.parametrize("steps", [3, 5, 10, 20, 50])
def test_move_into_step_0_is_first_order(steps, gen):
    # lower order final: x_0-state = (sigma_0 / sigma_1) x_1 - alpha_0 (e^{-h} - 1) x0_1, the step-1 prediction
    # alone; the 2M rule would add (x0_1 - x0_2) / (2r) with x0_2 = x0_1 + 0.001 (t_2 - t_1) here
    base = GaussianDiffusion(linear_betas(1000), model_output="x0")
    d = base.respace(str(steps))
    seen: list[SamplerStep] = []
    x_T = torch.randn(2, 1, 4, 4, generator=gen, dtype=torch.float64)
    dpm_solver_pp_2m(d, _constant_x0_model, x_T, clip_denoised=False, callback=seen.append)
    into_0, at_1 = seen[-2], seen[-3]  # the moves 1 -> 0 and 2 -> 1
    assert into_0.t == 1
    abar0, abar1 = d.alphas_cumprod[0].item(), d.alphas_cumprod[1].item()
    lam = lambda a: 0.5 * (math.log(a) - math.log1p(-a))
    h = lam(abar0) - lam(abar1)
    expected = math.sqrt((1 - abar0) / (1 - abar1)) * at_1.x - math.sqrt(abar0) * math.expm1(-h) * into_0.pred_x0
    assert torch.allclose(into_0.x, expected, rtol=1e-12, atol=1e-12)


def _gaussian_eps(base: GaussianDiffusion, mu: float = 0.2, s: float = 0.5):
    """The exact eps-predictor for data x_0 ~ N(mu, s^2) per pixel."""

    def model(x_t, t, **cond):
        abar = base.alphas_cumprod[t].to(x_t.dtype).view(-1, 1, 1, 1)
        return (1 - abar).sqrt() * (x_t - abar.sqrt() * mu) / (abar * s**2 + 1 - abar)

    return model


@pytest.mark.parametrize("solver", SOLVERS)
def test_samples_have_the_data_distribution(solver):
    # 4096 independent pixels of N(0.2, 0.5^2) data at 25 steps: a wrong noise scale (C) or drift (A, B) would
    # make the samples too wide or too narrow (the standard error of the std is 0.5 / sqrt(2 * 4096) ~ 0.006).
    # Measured: std 0.487 (ODE), 0.504 (SDE); with a 2M move into step 0 (r = h_prev / h = 0.24 there, so
    # D = 3.1 x0_1 - 2.1 x0_2) the ODE gave 0.587 and the SDE 0.718
    base = GaussianDiffusion(linear_betas(1000))
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(4, 1, 32, 32, generator=g, dtype=torch.float64)
    out = solver(base.respace("25"), _gaussian_eps(base), x_T, clip_denoised=False, generator=g)
    assert out.mean().item() == pytest.approx(0.2, abs=0.03)
    assert out.std().item() == pytest.approx(0.5, abs=0.03)


def test_sde_is_stochastic_and_seeded():
    base = GaussianDiffusion(linear_betas(1000))
    d, model = base.respace("10"), _gaussian_eps(base)
    x_T = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    runs = [sde_dpm_solver_pp_2m(d, model, x_T, generator=torch.Generator().manual_seed(s)) for s in (5, 5, 6)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.allclose(runs[0], runs[2])
    ode = dpm_solver_pp_2m(d, model, x_T)
    assert not torch.allclose(runs[0], ode)


def test_sde_registered_with_dpm_spacing(gen):
    assert SAMPLERS["sde-dpm++2m"] is sde_dpm_solver_pp_2m
    assert default_spacing("sde-dpm++2m", 20, 1000) == default_spacing("dpm++2m", 20, 1000) == "20"
    assert default_spacing("sde-dpm++2m", 20, 1000, "noise-dense") == noise_dense_steps(20, 1000)
    assert default_spacing("sde-dpm++2m", None, 1000) is None
    base = GaussianDiffusion(linear_betas(1000))
    x_T = torch.randn(1, 1, 4, 4, generator=gen)
    model = _gaussian_eps(base)
    via_sample = sample(base, model, x_T, sampler="sde-dpm++2m", spacing="20",
                        generator=torch.Generator().manual_seed(3))
    direct = sde_dpm_solver_pp_2m(base.respace("20"), model, x_T, generator=torch.Generator().manual_seed(3))
    assert torch.equal(via_sample, direct)


def test_noise_dense_steps_closed_form_and_ends():
    # t_i = round(999 (1 - (1 - i/19)^2)): both ends kept, gaps shrinking towards pure noise
    ts = noise_dense_steps(20, 1000)
    assert ts == [round(999 * (1 - (1 - i / 19) ** 2)) for i in range(20)]
    assert ts[0] == 0 and ts[-1] == 999
    gaps = [b - a for a, b in zip(ts, ts[1:])]
    assert gaps == sorted(gaps, reverse=True) and gaps[0] == 102 and gaps[-1] == 3


@pytest.mark.parametrize("steps,T", [(2, 1000), (900, 1000), (999, 1000), (1000, 1000), (7, 7), (5, 50)])
def test_noise_dense_steps_are_distinct_at_any_count(steps, T):
    # near T the rounded values collide when N is close to T; every count still gets N distinct steps
    ts = noise_dense_steps(steps, T)
    assert len(ts) == steps and ts == sorted(set(ts)) and ts[0] == 0 and ts[-1] == T - 1
    if steps == T:
        assert ts == list(range(T))


def test_spacing_names_are_checked():
    with pytest.raises(ValueError, match="unknown spacing 'karras'"):
        default_spacing("ddpm", 20, 1000, "karras")
    with pytest.raises(ValueError, match="2 <= steps <= 1000"):
        noise_dense_steps(1001, 1000)
    assert default_spacing("ddim", 20, 1000, "noise-dense") == noise_dense_steps(20, 1000)
    assert default_spacing("ddim", 20, 1000) == "ddim20" and default_spacing("ddpm", 20, 1000) == "20"
    assert default_spacing("sde-dpm++2m", 1, 1000, "noise-dense") == [999]  # one step starts from pure noise
