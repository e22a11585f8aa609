"""Palette restoration metrics: closed forms of PSNR/SSIM/PD/diversity, the fool-rate classifier, the Table 2 row."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pakhsh.data.builtin.shapes import ShapesDataset
from pakhsh.evaluation import FEATNETS
from pakhsh.metrics.featnet import load_feature_net
from pakhsh.metrics.fid import compute_statistics
from pakhsh.metrics.restoration import (
    RestorationScores,
    _split_pairs,
    diversity,
    fool_rate,
    pairwise_ssim,
    perceptual_distance,
    psnr,
    restoration_scores,
    ssim,
)


def shapes_images(n: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 3, size, size) shapes test-split images in [-1, 1] and their (n,) labels."""
    ds = ShapesDataset(split="test", size=size, length=n)
    items = [ds[i] for i in range(n)]
    return torch.stack([it["image"] for it in items]), torch.tensor([it["label"] for it in items])


@pytest.fixture(scope="module")
def shapes16() -> torch.Tensor:
    return shapes_images(200, 16)[0]


@pytest.fixture(scope="module")
def shapes32() -> tuple[torch.Tensor, torch.Tensor]:
    return shapes_images(160, 32)  # > 128 (the feature size), so the FID covariances are not singular


@pytest.fixture(scope="module")
def shapes_net():
    return load_feature_net(FEATNETS / "shapes")


def blur(x: torch.Tensor) -> torch.Tensor:
    """Heavy 5x5 box blur, edges averaged over the pixels inside the image."""
    return F.avg_pool2d(x, 5, stride=1, padding=2, count_include_pad=False)


def rand_images(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ----------------------------------------------------------------------------- PSNR, SSIM


def test_psnr_identical_is_inf_and_offset_has_closed_form():
    x = rand_images(4, 3, 16, 16) * 0.8  # room for the offset inside [-1, 1]
    assert psnr(x, x.clone()) == math.inf
    # MSE 0.01 with data range 2: 10 log10(2^2 / 0.01)
    assert psnr(x + 0.1, x) == pytest.approx(10 * math.log10(4 / 0.01), abs=1e-4)
    assert psnr(x + 0.1, x) == pytest.approx(26.0206, abs=1e-3)


def test_psnr_is_the_mean_of_per_image_values():
    x = rand_images(2, 1, 8, 8) * 0.5
    out = x.clone()
    out[0] += 0.1  # image 0: 26.02 dB
    out[1] += 0.2  # image 1: 10 log10(4 / 0.04) = 20 dB
    assert psnr(out, x) == pytest.approx((10 * math.log10(400) + 20.0) / 2, abs=1e-4)


def test_ssim_is_one_on_identical_images_and_falls_with_noise(shapes16):
    assert ssim(shapes16, shapes16.clone()) == pytest.approx(1.0, abs=2e-4)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(shapes16.shape, generator=g)
    values = [ssim((shapes16 + s * noise).clamp(-1, 1), shapes16) for s in (0.02, 0.1, 0.4)]
    assert 1.0 > values[0] > values[1] > values[2]


def test_ssim_fits_its_window_to_small_images():
    x = rand_images(3, 1, 6, 6)
    assert ssim(x, x.clone()) == pytest.approx(1.0, abs=2e-4)
    assert ssim(rand_images(3, 1, 6, 6, seed=1), x) < 0.5


# ----------------------------------------------------------------------------- perceptual distance


def test_perceptual_distance_closed_form():
    a = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    assert perceptual_distance(a, a.clone()) == 0.0
    b = torch.tensor([[3.0, 4.0], [1.0, 2.0]])  # distances 5 and 1
    assert perceptual_distance(b, a) == pytest.approx(3.0)
    with pytest.raises(ValueError, match=r"\(2, 2\) and \(2, 3\)"):
        perceptual_distance(a, torch.zeros(2, 3))


# ----------------------------------------------------------------------------- fool rate


def test_fool_rate_is_one_half_on_exact_copies(shapes16):
    # Both images of a test pair get the same logit, so exactly one of the two is misclassified.
    assert fool_rate(shapes16.clone(), shapes16, steps=20) == 0.5


@pytest.mark.parametrize("kind", ["noise", "colour shift"])
def test_fool_rate_is_near_zero_on_obvious_fakes(shapes16, kind):
    if kind == "noise":
        fakes = rand_images(*shapes16.shape, seed=3)
    else:
        fakes = (0.5 * shapes16 + 0.5).clamp(-1, 1)  # washed out towards white
    assert fool_rate(fakes, shapes16, steps=60) < 0.1


def test_fool_rate_is_deterministic_and_leaves_the_global_rng(shapes16):
    fakes = (shapes16 + 0.15 * rand_images(*shapes16.shape, seed=5)).clamp(-1, 1)  # hard enough to vary
    state = torch.get_rng_state()
    first = fool_rate(fakes, shapes16, seed=7, steps=15)
    assert torch.equal(torch.get_rng_state(), state)
    assert fool_rate(fakes, shapes16, seed=7, steps=15) == first
    assert 0.0 <= first <= 1.0


def test_pairs_are_split_into_disjoint_halves():
    train, test = _split_pairs(11, torch.Generator().manual_seed(0))
    assert (len(train), len(test)) == (6, 5)
    assert sorted(torch.cat([train, test]).tolist()) == list(range(11))


# ----------------------------------------------------------------------------- diversity


def test_diversity_zero_for_identical_samples_and_known_std():
    x = rand_images(3, 2, 8, 8) * 0.5
    assert diversity(torch.stack([x, x, x])) == 0.0
    assert pairwise_ssim(torch.stack([x, x, x])) == pytest.approx(1.0, abs=2e-4)
    # per pixel the samples are {v - d, v, v + d}: unbiased std d
    d = 0.3
    assert diversity(torch.stack([x - d, x, x + d])) == pytest.approx(d, abs=1e-6)
    # two samples {v, v + 0.4}: std 0.4 / sqrt(2)
    assert diversity(torch.stack([x, x + 0.4])) == pytest.approx(0.4 / math.sqrt(2), abs=1e-6)


def test_pairwise_ssim_falls_as_samples_spread(shapes16):
    x = shapes16[:20]
    noise = rand_images(3, *x.shape, seed=2)
    close = pairwise_ssim((x + 0.05 * noise).clamp(-1, 1))
    far = pairwise_ssim((x + 0.5 * noise).clamp(-1, 1))
    assert 1.0 > close > far


# ----------------------------------------------------------------------------- the table row


def test_restoration_scores_of_originals_themselves(shapes32, shapes_net):
    x, y = shapes32
    r = restoration_scores(x.clone(), x, y, shapes_net, fool_steps=10)
    assert isinstance(r, RestorationScores) and r.n == 160
    assert abs(r.fid) < 1e-3
    assert r.pd == 0.0 and r.psnr == math.inf and r.ssim == pytest.approx(1.0, abs=2e-4)
    assert r.fool_rate == 0.5
    with torch.no_grad():
        accuracy = float((shapes_net(x).logits.argmax(1) == y).float().mean())
    assert r.ca == pytest.approx(accuracy) and r.ca > 0.6  # the shipped net scores ~0.79 on shapes
    assert 1.0 < r.inception_score <= 6.0


def test_restoration_scores_get_worse_for_blurred_and_grey_outputs(shapes32, shapes_net):
    x, y = shapes32
    same = restoration_scores(x.clone(), x, y, shapes_net, fool_steps=10)
    blurred = restoration_scores(blur(x), x, y, shapes_net, fool_steps=10)
    assert blurred.fid > same.fid + 5.0
    assert blurred.pd > 1.0 and blurred.ca < same.ca - 0.2
    assert blurred.psnr < 30.0 and blurred.ssim < 0.95
    grey = restoration_scores(x.mean(1, keepdim=True).expand_as(x).clone(), x, y, shapes_net, fool_steps=10)
    assert grey.pd > 0.5 and grey.ssim < 0.6


def test_restoration_scores_with_given_reference_stats_and_no_labels(shapes32, shapes_net):
    x, _ = shapes32
    with torch.no_grad():
        stats = compute_statistics(shapes_net(x).features)
    # a (mu, sigma) pair of the originals' statistics gives the same FID as the originals themselves
    r = restoration_scores(blur(x), x, None, shapes_net, ref_stats=(stats.mu, stats.sigma), fool_steps=5)
    own = restoration_scores(blur(x), x, None, shapes_net, fool_steps=5)
    assert r.fid == pytest.approx(own.fid, rel=1e-6)
    assert math.isnan(r.ca)
    shifted = restoration_scores(blur(x), x, None, shapes_net, ref_stats=(stats.mu + 1.0, stats.sigma),
                                 fool_steps=5)
    assert shifted.fid != pytest.approx(r.fid, rel=1e-3)


@pytest.mark.filterwarnings("ignore:only 24 samples")  # singular FID covariances: not what is tested here
def test_restoration_scores_resize_other_sizes_for_the_net(shapes_net):
    x, y = shapes_images(24, 16)  # the shapes net is trained on 32x32
    with pytest.warns(UserWarning, match="resized"):
        r = restoration_scores(x.clone(), x, y, shapes_net, fool_steps=5)
    assert r.pd == 0.0 and r.n == 24


# ----------------------------------------------------------------------------- bad inputs


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"outputs \(4, 3, 8, 8\) and originals \(4, 3, 16, 16\)"):
        psnr(torch.zeros(4, 3, 8, 8), torch.zeros(4, 3, 16, 16))


def test_too_few_images_and_wrong_ranks():
    with pytest.raises(ValueError, match="at least 2 images"):
        ssim(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        fool_rate(torch.zeros(3, 16, 16), torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match="K >= 2"):
        diversity(torch.zeros(1, 4, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\(K, N, C, H, W\)"):
        pairwise_ssim(torch.zeros(4, 3, 8, 8))


def test_values_outside_model_range_are_refused():
    x = torch.zeros(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"outputs: expected values in \[-1, 1\], got values in \[0, 255\]"):
        psnr(torch.full_like(x, 255.0).index_fill_(0, torch.tensor([0]), 0.0), x)
    with pytest.raises(ValueError, match="dtype torch.uint8"):
        ssim(x, x.to(torch.uint8))
    with pytest.raises(ValueError, match="NaN"):
        psnr(x, torch.full_like(x, float("nan")))
    with pytest.raises(ValueError, match="samples: expected values"):
        diversity(torch.full((2, 2, 1, 8, 8), 3.0))


def test_bad_labels_are_refused(shapes_net):
    x, y = shapes_images(8, 32)
    with pytest.raises(ValueError, match=r"labels: expected 8 integer class indices"):
        restoration_scores(x, x, y[:5], shapes_net, fool_steps=1, is_splits=2)
    with pytest.raises(ValueError, match=r"class indices in \[0, 6\), got \[0, 9\]"):
        restoration_scores(x, x, torch.tensor([0, 1, 2, 3, 4, 5, 0, 9]), shapes_net, fool_steps=1, is_splits=2)
    with pytest.raises(ValueError, match="featnet must be"):
        restoration_scores(x, x, y, object(), fool_steps=1)  # type: ignore[arg-type]
