"""ddim_invert skips the identity move to step 0: one network call per real move, same latents as before."""

import pytest
import torch

from pakhsh.diffusion import GaussianDiffusion, linear_betas
from pakhsh.diffusion.gaussian import _gather
from pakhsh.samplers import SamplerStep, ddim_invert
from pakhsh.samplers.common import batch_t


class CountingModel:
    """A deterministic, imperfect eps model that counts its calls (and the training steps it was asked for)."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, x, t, **cond):
        self.calls.append(int(t[0]))
        return torch.tanh(0.9 * x + 0.0005 * t.view(-1, 1, 1, 1).to(x.dtype))


def _old_ddim_invert(d: GaussianDiffusion, model, x0: torch.Tensor, end: int, clip: bool) -> torch.Tensor:
    """The previous loop, kept as the reference: it also ran the model at step 0 for the move 'to' step 0."""
    x = x0
    for i in range(end + 1):
        out = d.p_mean_variance(model, x, batch_t(max(i - 1, 0), x), clip_denoised=clip)
        abar = _gather(d.alphas_cumprod, batch_t(i, x), x)
        x = abar.sqrt() * out.pred_x0 + torch.sqrt(1 - abar) * out.pred_eps
    return x


@pytest.mark.parametrize("steps", [1, 2, 10, 25])
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("output", ["eps", "v"])
def test_one_call_per_move_and_unchanged_latents(steps, clip, output, gen):
    base = GaussianDiffusion(linear_betas(1000), model_output=output)
    d = base.respace(str(steps))
    x0 = 1.2 * torch.rand(2, 3, 4, 4, generator=gen, dtype=torch.float64) - 0.6
    model = CountingModel()
    x_T = ddim_invert(d, model, x0, clip_denoised=clip)
    # N chain steps: N - 1 moves (step 0 -> 1 -> ... -> N - 1), one call each at the step moved from
    assert model.calls == d.timestep_map[: steps - 1].tolist()
    expected = _old_ddim_invert(d, CountingModel(), x0, steps - 1, clip)
    assert torch.allclose(x_T, expected, rtol=0, atol=1e-12), (x_T - expected).abs().max()


def test_end_step_and_callback(gen):
    d = GaussianDiffusion(linear_betas(1000)).respace("10")
    x0 = torch.rand(1, 1, 4, 4, generator=gen) - 0.5
    model = CountingModel()
    seen: list[SamplerStep] = []
    x4 = ddim_invert(d, model, x0, end_step=4, callback=seen.append)
    assert len(model.calls) == 4
    assert [(s.index, s.t) for s in seen] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert torch.equal(seen[-1].x, x4)
    assert torch.allclose(x4, _old_ddim_invert(d, CountingModel(), x0, 4, True), atol=1e-6)
    # end_step 0: x_0 itself, no network call, and not the caller's tensor
    model0 = CountingModel()
    same = ddim_invert(d, model0, x0, end_step=0)
    assert model0.calls == [] and torch.equal(same, x0) and same.data_ptr() != x0.data_ptr()
