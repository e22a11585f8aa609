import math

import numpy as np
import pytest

from pakhsh.diffusion import GaussianDiffusion, cosine_betas, explicit_betas, linear_betas, respace_betas, space_timesteps


@pytest.mark.parametrize("steps", [1000, 4000])
def test_linear_schedule_endpoints_scale_with_T(steps):
    b = linear_betas(steps)
    assert b.shape == (steps,)
    assert b[0] == pytest.approx(1e-4 * 1000 / steps)
    assert b[-1] == pytest.approx(0.02 * 1000 / steps)
    assert np.all(np.diff(b) > 0)


@pytest.mark.parametrize("steps", [1000, 4000])
def test_cosine_schedule_matches_eq17(steps):
    b = cosine_betas(steps)
    abar = np.cumprod(1 - b)
    f = lambda t: math.cos((t / steps + 0.008) / 1.008 * math.pi / 2) ** 2
    # alpha-bar(t) = f(t) / f(0) where betas are not clipped
    for t in [0, steps // 4, steps // 2, 3 * steps // 4]:
        assert abar[t] == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert b.max() == pytest.approx(0.999)  # clipped at the end


def test_alphas_cumprod_is_product():
    b = linear_betas(1000)
    d = GaussianDiffusion(b)
    assert np.allclose(d.alphas_cumprod.numpy(), np.cumprod(1 - b), rtol=0, atol=1e-15)
    assert d.alphas_cumprod_prev[0] == 1.0
    assert np.allclose(d.alphas_cumprod_prev[1:].numpy(), d.alphas_cumprod[:-1].numpy())


def test_posterior_variance_formula():
    b = cosine_betas(1000)
    d = GaussianDiffusion(b)
    abar = np.cumprod(1 - b)
    t = np.arange(1, 1000)
    expected = (1 - abar[t - 1]) / (1 - abar[t]) * b[t]
    assert np.allclose(d.posterior_variance.numpy()[1:], expected, rtol=1e-12)
    assert d.posterior_variance[0] == 0.0
    # log variance clipped at t = 0 to the t = 1 value
    assert d.posterior_log_variance_clipped[0] == pytest.approx(math.log(expected[0]))


def test_explicit_betas_validated():
    with pytest.raises(ValueError, match=r"betas\[1\]"):
        explicit_betas([0.1, 0.0, 0.2])
    with pytest.raises(ValueError, match="non-empty"):
        explicit_betas([])


@pytest.mark.parametrize("spacing,count", [("50", 50), ("250", 250), ("ddim25", 25), ("10,15,20", 45), (1000, 1000)])
def test_space_timesteps_counts(spacing, count):
    kept = space_timesteps(1000, spacing)
    assert len(kept) == count
    assert kept == sorted(set(kept)) and 0 <= kept[0] and kept[-1] < 1000


def test_space_timesteps_shapes():
    assert space_timesteps(1000, "ddim25") == list(range(0, 1000, 40))
    assert space_timesteps(10, "2") == [0, 9]
    sect = space_timesteps(300, "1,2,3")
    assert sect == [0, 100, 199, 200, 250, 299]
    with pytest.raises(ValueError, match="spacing"):
        space_timesteps(1000, "fast")
    with pytest.raises(ValueError, match="cannot take"):
        space_timesteps(10, "11")


@pytest.mark.parametrize("steps", [1000, 4000])
@pytest.mark.parametrize("spacing", ["50", "ddim25", "10,15,20"])
def test_respaced_betas_reproduce_alpha_bar(steps, spacing):
    d = GaussianDiffusion(cosine_betas(steps))
    kept = space_timesteps(steps, spacing)
    r = d.respace(spacing)
    assert np.allclose(r.alphas_cumprod.numpy(), d.alphas_cumprod.numpy()[kept], rtol=1e-12)
    assert r.timestep_map.tolist() == kept
    # respacing twice composes the maps back to training steps
    rr = r.respace("5")
    assert rr.timestep_map.tolist() == [kept[i] for i in space_timesteps(len(kept), "5")]
    assert np.allclose(rr.alphas_cumprod.numpy(), d.alphas_cumprod.numpy()[rr.timestep_map.numpy()])


def test_respace_betas_direct():
    abar = np.array([0.9, 0.5, 0.2, 0.1])
    b = respace_betas(abar, [1, 3])
    assert np.allclose(np.cumprod(1 - b), [0.5, 0.1])


def test_linear_schedule_too_short_is_an_error():
    with pytest.raises(ValueError, match="cosine"):
        linear_betas(20)
