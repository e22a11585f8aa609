"""Step-by-step agreement with diffusers' schedulers (an independent implementation) for the same betas,
model output and noise."""

import pytest
import torch

from pakhsh.diffusion import GaussianDiffusion, cosine_betas, linear_betas
from pakhsh.samplers import ddim_sample, default_spacing, dpm_solver_pp_2m, sde_dpm_solver_pp_2m

diffusers = pytest.importorskip("diffusers")


def _fixed_output(x, t, **k):
    # a deterministic, non-trivial "network": depends on x and t
    return torch.tanh(x * 0.7 + 0.001 * t.view(-1, 1, 1, 1).to(x.dtype) - 0.2)


@pytest.mark.parametrize("variance,dv", [("fixed_small", "fixed_small"), ("fixed_large", "fixed_large")])
@pytest.mark.parametrize("clip", [False, True])
def test_ddpm_step_matches_diffusers(variance, dv, clip):
    betas = linear_betas(1000)
    ours = GaussianDiffusion(betas, variance=variance)
    sched = diffusers.DDPMScheduler(
        num_train_timesteps=1000, trained_betas=betas.tolist(), variance_type=dv, clip_sample=clip, clip_sample_range=1.0
    )
    sched.set_timesteps(1000)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 8, generator=g)
    for t in [999, 500, 37, 1]:
        tt = torch.full((2,), t, dtype=torch.long)
        eps = _fixed_output(x, tt)
        ref = sched.step(eps, t, x, generator=torch.Generator().manual_seed(t)).prev_sample
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(t))
        out = ours.p_mean_variance(_fixed_output, x, tt, clip_denoised=clip)
        mine = out.mean + torch.exp(0.5 * out.log_variance) * noise
        # diffusers keeps alpha-bar in float32; near t = 0 that costs ~1e-4 (we keep float64)
        assert torch.allclose(mine, ref, atol=3e-4 if t < 10 else 2e-5), (t, (mine - ref).abs().max())


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_trajectory_matches_diffusers(eta):
    betas = cosine_betas(1000)
    base = GaussianDiffusion(betas)
    sched = diffusers.DDIMScheduler(
        num_train_timesteps=1000, trained_betas=betas.tolist(), clip_sample=False, set_alpha_to_one=True,
        timestep_spacing="leading", steps_offset=0,
    )
    sched.set_timesteps(20)
    d = base.respace("ddim20")
    assert sorted(sched.timesteps.tolist()) == d.timestep_map.tolist()
    g = torch.Generator().manual_seed(1)
    x_T = torch.randn(2, 3, 8, 8, generator=g)
    x = x_T.clone()
    dg = torch.Generator().manual_seed(5)
    for t in sched.timesteps:
        eps = _fixed_output(x, torch.full((2,), int(t)))
        x = sched.step(eps, t, x, eta=eta, generator=dg).prev_sample
    mine = ddim_sample(d, _fixed_output, x_T, eta=eta, clip_denoised=False, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(mine, x, atol=1e-4)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over the scale of b: diffusers works in float32 with float32 sigmas, so its error grows with
    the magnitude of the sample (ours, float32 images with float64 coefficients, is ~1e-6 off float64)."""
    return ((a - b).abs().max() / b.abs().max().clamp(min=1.0)).item()


def _dpm_scheduler(betas, d: GaussianDiffusion, algorithm: str, prediction: str = "epsilon"):
    """diffusers' DPMSolverMultistepScheduler set up as our chain: it visits our steps above training step 0 and
    ends at sigma_min = sigma(t = 0), i.e. at our chain step 0, with a first-order last step; lower_order_final
    gives that below 15 steps and euler_at_final at any count (our solver is first order into step 0 always).
    Our final denoise, step 0 -> sigma = 0, is then one more x_0 prediction at t = 0."""
    visited = d.timestep_map[1:].flip(0).tolist()
    sched = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, trained_betas=betas.tolist(), algorithm_type=algorithm, solver_order=2,
        solver_type="midpoint", prediction_type=prediction, lower_order_final=True, euler_at_final=len(visited) >= 15,
        final_sigmas_type="sigma_min", thresholding=False,
    )
    sched.set_timesteps(timesteps=visited)
    return sched


@pytest.mark.parametrize("steps", [2, 3, 10, 14, 15, 20, 25])
def test_dpm_solver_pp_2m_trajectory_matches_diffusers(steps):
    betas = linear_betas(1000)
    d = GaussianDiffusion(betas).respace(str(steps))
    sched = _dpm_scheduler(betas, d, "dpmsolver++")
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    x, ref = x_T.clone(), []
    for t in sched.timesteps:
        x = sched.step(_fixed_output(x, torch.full((2,), int(t))), t, x).prev_sample
        ref.append(x)
    mine: list[torch.Tensor] = []
    out = dpm_solver_pp_2m(d, _fixed_output, x_T, clip_denoised=False, callback=lambda s: mine.append(s.x))
    assert len(mine) == steps and len(ref) == steps - 1
    for k, (a, b) in enumerate(zip(mine, ref)):  # the states at chain steps N-2 .. 0
        assert _rel_err(a, b) < 5e-6, (k, _rel_err(a, b))
    denoised = d.p_mean_variance(_fixed_output, ref[-1], torch.zeros(2, dtype=torch.long), clip_denoised=False)
    assert _rel_err(out, denoised.pred_x0) < 5e-6


class _GaussianToy:
    """Exact eps of N(0.2, 0.5^2) data plus a t-dependent perturbation: an O(1), imperfect eps or v model."""

    def __init__(self, base: GaussianDiffusion) -> None:
        self.base = base

    def __call__(self, x, t, **k):
        abar = self.base.alphas_cumprod[t].to(x.dtype).view(-1, 1, 1, 1)
        eps = (1 - abar).sqrt() * (x - abar.sqrt() * 0.2) / (0.25 * abar + 1 - abar)
        eps = eps + 0.1 * torch.tanh(x + 0.001 * t.view(-1, 1, 1, 1).to(x.dtype))
        if self.base.model_output.value == "eps":
            return eps
        x0 = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
        return abar.sqrt() * eps - (1 - abar).sqrt() * x0


@pytest.mark.parametrize("spacing", ["uniform", "noise-dense"])
@pytest.mark.parametrize("steps", [10, 20])
@pytest.mark.parametrize("output,prediction", [("eps", "epsilon"), ("v", "v_prediction")])
def test_sde_dpm_solver_pp_2m_matches_diffusers_step_by_step(steps, output, prediction, spacing):
    # noise-dense steps (its default for unconditional models) shrink towards t = T, so h_prev / h varies along
    # the chain: the 2M weights are exercised away from the near-constant ratio of uniform steps
    betas = linear_betas(1000)
    base = GaussianDiffusion(betas, model_output=output)
    d, model = base.respace(default_spacing("sde-dpm++2m", steps, 1000, spacing)), _GaussianToy(base)
    sched = _dpm_scheduler(betas, d, "sde-dpmsolver++", prediction)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    # the same noise for both: ours draws one N(0, I) per move into steps N-2 .. 0, in order, from its
    # generator (none for the final denoise, whose noise weight is 0); diffusers gets those as variance_noise
    g = torch.Generator().manual_seed(9)
    noises = [torch.randn(x_T.shape, generator=g) for _ in range(steps - 1)]
    x, ref = x_T.clone(), []
    for t, z in zip(sched.timesteps, noises, strict=True):
        x = sched.step(model(x, torch.full((2,), int(t))), t, x, variance_noise=z).prev_sample
        ref.append(x)
    mine: list[torch.Tensor] = []
    g_ours = torch.Generator().manual_seed(9)
    out = sde_dpm_solver_pp_2m(d, model, x_T, clip_denoised=False, generator=g_ours,
                               callback=lambda s: mine.append(s.x))
    assert len(mine) == steps and torch.equal(out, mine[-1])
    for k, (a, b) in enumerate(zip(mine, ref)):
        assert _rel_err(a, b) < 3e-5, (k, _rel_err(a, b))  # measured: 1.5e-5 (diffusers float32)
    denoised = d.p_mean_variance(model, ref[-1], torch.zeros(2, dtype=torch.long), clip_denoised=False)
    assert _rel_err(out, denoised.pred_x0) < 3e-5


def test_zero_final_sigma_config_differs_only_by_the_move_into_step_0():
    # diffusers with final_sigmas_type="zero" and t = 0 among its timesteps makes the move into t = 0 2nd order
    # (its first-order step is only the trivial t = 0 -> sigma = 0 one); up to chain step 1 it is our solver
    betas = linear_betas(1000)
    base = GaussianDiffusion(betas)
    d, model = base.respace("10"), _GaussianToy(base)
    sched = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, trained_betas=betas.tolist(), algorithm_type="dpmsolver++", solver_order=2,
        lower_order_final=True, final_sigmas_type="zero", thresholding=False,
    )
    sched.set_timesteps(timesteps=d.timestep_map.flip(0).tolist())
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    x, ref = x_T.clone(), []
    for t in sched.timesteps:
        x = sched.step(model(x, torch.full((2,), int(t))), t, x).prev_sample
        ref.append(x)
    mine: list[torch.Tensor] = []
    dpm_solver_pp_2m(d, model, x_T, clip_denoised=False, callback=lambda s: mine.append(s.x))
    assert all(_rel_err(a, b) < 1e-5 for a, b in zip(mine[:-2], ref[:-2]))
    assert _rel_err(mine[-2], ref[-2]) > 1e-3  # state at step 0: first order (ours) vs 2M (that config)
