"""Step-by-step agreement with diffusers' schedulers (an independent implementation) for the same betas,
model output and noise."""

import pytest
import torch

from pakhsh.diffusion import GaussianDiffusion, cosine_betas, linear_betas
from pakhsh.diffusion.gaussian import _gather
from pakhsh.samplers import ddim_sample, dpm_solver_pp_2m

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


def test_dpm_solver_pp_2m_matches_diffusers():
    betas = linear_betas(1000)
    base = GaussianDiffusion(betas)
    d = base.respace("15")
    sched = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, trained_betas=betas.tolist(), algorithm_type="dpmsolver++", solver_order=2,
        lower_order_final=True, final_sigmas_type="zero", thresholding=False,
    )
    sched.set_timesteps(timesteps=sorted(d.timestep_map.tolist(), reverse=True))
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    x = x_T.clone()
    for t in sched.timesteps:
        eps = _fixed_output(x, torch.full((2,), int(t)))
        x = sched.step(eps, t, x).prev_sample
    mine = dpm_solver_pp_2m(d, _fixed_output, x_T, clip_denoised=False)
    assert torch.allclose(mine, x, atol=1e-4), (mine - x).abs().max()
