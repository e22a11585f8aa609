"""Super-resolution's condition: shapes and ranges, exact replay, the training path without augmentation equal to
the sampling path bit for bit, blur and noise of the drawn strengths, TaskConfig's new keys, and the multi-task
stream left exactly as it was before superres existed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pakhsh.config import from_dict, to_dict
from pakhsh.tasks import (
    SINGLE_TASKS, TASK_NAMES, TaskConfig, area_downsample, degrade, gaussian_blur, superres_condition,
    upsample_nearest,
)
from pakhsh.tasks.superres import blur_kernels
from pakhsh.training.experiment import ExperimentConfig, load_experiment


def _images(b: int = 6, c: int = 3, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Random images in [-1, 1] with detail at every scale (blur has high frequencies to remove)."""
    return torch.rand(b, c, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _sr(**kw) -> TaskConfig:
    return TaskConfig(name="superres", **kw)


def _run(cfg: TaskConfig, x: torch.Tensor, seed: int = 0):
    return degrade(x, cfg, torch.Generator().manual_seed(seed))


# --- shapes, ranges, replay ---------------------------------------------------------------------------------

@pytest.mark.parametrize("c, scale, size", [(3, 2, 16), (1, 2, 8), (3, 4, 16)])
def test_degrade_shapes_ranges_mask_and_id(c: int, scale: int, size: int) -> None:
    x = _images(c=c, size=size)
    (cond, mask), ids = _run(_sr(scale=scale, aug_prob=1.0, cond_noise=(0.5, 0.5)), x)
    assert cond.shape == x.shape and cond.dtype == x.dtype
    assert mask.shape == (6, 1, size, size) and mask.dtype == torch.float32 and bool((mask == 1).all())
    assert cond.min() >= -1 and cond.max() <= 1  # clamped after the noise
    assert ids.tolist() == [SINGLE_TASKS.index("superres")] * 6 == [4] * 6  # never one of multi's labels
    blocks = cond.unfold(2, scale, scale).unfold(3, scale, scale)  # each scale x scale block is one value
    assert bool((blocks == blocks[..., :1, :1]).all())


def test_degrade_replays_exactly_and_depends_on_the_seed() -> None:
    x, cfg = _images(), _sr(aug_prob=1.0)
    a, b = _run(cfg, x, seed=3)[0].cond, _run(cfg, x, seed=3)[0].cond
    assert torch.equal(a, b)
    assert not torch.equal(a, _run(cfg, x, seed=4)[0].cond)
    g = torch.Generator().manual_seed(5)
    first = degrade(x, cfg, g)[0].cond
    state = g.get_state()
    second = degrade(x, cfg, g)[0].cond
    g.set_state(state)
    assert torch.equal(degrade(x, cfg, g)[0].cond, second) and not torch.equal(first, second)


def test_degrade_draws_a_fixed_count_whatever_the_settings() -> None:
    """The next draws after a batch do not depend on what the batch drew: (B, 3) uniforms + the low-res noise."""
    x = _images(b=4, size=16)
    after = []
    for cfg in (_sr(), _sr(aug_prob=0.0), _sr(aug_prob=1.0, blur_sigma=(2.0, 3.0), cond_noise=(0.0, 0.0))):
        g = torch.Generator().manual_seed(9)
        degrade(x, cfg, g)
        after.append(torch.rand(3, generator=g))
    g = torch.Generator().manual_seed(9)
    torch.rand(4, 3, generator=g, dtype=torch.float64)
    torch.randn(4, 3, 8, 8, generator=g)
    expected = torch.rand(3, generator=g)
    assert all(torch.equal(a, expected) for a in after)


def test_degrade_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(0)
    before = torch.get_rng_state()
    _run(_sr(aug_prob=1.0), _images())
    assert torch.equal(torch.get_rng_state(), before)


# --- the sampling path is the training path ------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [_sr(blur_sigma=(0.0, 0.0), cond_noise=(0.0, 0.0), aug_prob=1.0),
                                 _sr(aug_prob=0.0), _sr(scale=4, blur_sigma=(0.0, 0.0), cond_noise=(0.0, 0.0))])
def test_no_augmentation_is_superres_condition_bit_for_bit(cfg: TaskConfig) -> None:
    x = _images()
    (cond, mask), _ = _run(cfg, x)
    low = area_downsample(x, cfg.scale)
    want, want_mask = superres_condition(low, cfg.scale, size=(16, 16))
    assert torch.equal(cond, want) and torch.equal(mask, want_mask)
    assert torch.equal(cond[..., :: cfg.scale, :: cfg.scale], low)  # nearest upsampling keeps the low-res pixels
    torch.testing.assert_close(area_downsample(cond, cfg.scale), low)


def test_area_downsample_is_the_block_mean() -> None:
    x = _images(size=8)
    torch.testing.assert_close(area_downsample(x, 2), F.interpolate(x, scale_factor=0.5, mode="area"))
    torch.testing.assert_close(area_downsample(x, 4)[0, 0, 1, 1], x[0, 0, 4:8, 4:8].mean())


def test_superres_condition_shapes_and_blur() -> None:
    low = _images(b=2, size=8)
    cond, mask = superres_condition(low, 2)
    assert cond.shape == (2, 3, 16, 16) and mask.shape == (2, 1, 16, 16) and bool((mask == 1).all())
    assert torch.equal(cond, upsample_nearest(low, 2))
    blurred, _ = superres_condition(low, 2, blur_sigma=0.8)
    assert torch.equal(blurred, upsample_nearest(gaussian_blur(low, 0.8), 2))
    assert not torch.equal(blurred, cond)


# --- blur and noise follow the drawn strengths ---------------------------------------------------------------

def _high_freq_energy(x: torch.Tensor) -> float:
    """Mean squared difference between neighbouring pixels: falls as an image gets smoother."""
    return float(((x[..., 1:, :] - x[..., :-1, :]) ** 2).mean() + ((x[..., :, 1:] - x[..., :, :-1]) ** 2).mean())


def test_blur_removes_more_high_frequencies_as_sigma_grows() -> None:
    x = _images(size=16)
    energies = [_high_freq_energy(gaussian_blur(x, s)) for s in (0.0, 0.1, 0.3, 0.6, 1.0, 2.0)]
    assert energies[0] == _high_freq_energy(x)  # sigma 0 is the identity
    assert all(a > b for a, b in zip(energies, energies[1:])), energies


def test_blur_kernels_sum_to_one_and_keep_a_constant_image() -> None:
    k = blur_kernels(torch.tensor([0.0, 0.3, 0.6, 2.0]), 6)
    torch.testing.assert_close(k.sum(dim=1), torch.ones(4, dtype=torch.float64))
    assert k[0].tolist() == [0.0] * 6 + [1.0] + [0.0] * 6
    assert bool((k[1:, 6] < 1).all()) and bool((k[1:, 6:].diff(dim=1) <= 0).all())  # peaked at 0, decreasing
    flat = torch.full((1, 1, 6, 6), 0.25)
    torch.testing.assert_close(gaussian_blur(flat, 1.5), flat)  # replicated borders: no darkened edge


def _replayed(b: int, c: int, h: int, w: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The draws a superres batch makes, in its documented order: (B, 3) uniforms, then the low-res noise."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, generator=g, dtype=torch.float64), torch.randn(b, c, h, w, generator=g)


def test_each_image_is_blurred_with_its_drawn_sigma() -> None:
    x, lo, hi = _images(b=1).repeat(8, 1, 1, 1), 0.2, 1.5  # one image eight times: only the sigmas differ
    (cond, _), _ = _run(_sr(blur_sigma=(lo, hi), cond_noise=(0.0, 0.0), aug_prob=1.0), x, seed=2)
    u, _ = _replayed(8, 3, 8, 8, seed=2)
    low = area_downsample(x, 2)
    sigmas = lo + (hi - lo) * u[:, 1]
    for i, s in enumerate(sigmas.tolist()):
        torch.testing.assert_close(cond[i : i + 1], superres_condition(low[i : i + 1], 2, blur_sigma=s)[0])
    energy = [_high_freq_energy(area_downsample(cond[i : i + 1], 2)) for i in range(8)]
    order = sigmas.argsort().tolist()
    assert all(energy[a] > energy[b] for a, b in zip(order, order[1:]))  # stronger sigma, smoother condition


def test_each_image_gets_noise_of_its_drawn_std() -> None:
    x = _images(b=8) * 0.5  # in [-0.5, 0.5]: noise of std <= 0.1 is almost never clamped
    (cond, _), _ = _run(_sr(blur_sigma=(0.0, 0.0), cond_noise=(0.02, 0.1), aug_prob=1.0), x, seed=6)
    u, eps = _replayed(8, 3, 8, 8, seed=6)
    std = (0.02 + 0.08 * u[:, 2]).float().view(-1, 1, 1, 1)
    want = (area_downsample(x, 2) + std * eps).clamp(-1, 1)
    torch.testing.assert_close(area_downsample(cond, 2), want)
    residual = (area_downsample(cond, 2) - area_downsample(x, 2)).flatten(1).std(dim=1)
    torch.testing.assert_close(residual, std.flatten(), rtol=0.15, atol=0)


def test_aug_prob_is_the_share_of_augmented_images() -> None:
    x = _images(b=64, size=8)
    clean = superres_condition(area_downsample(x, 2), 2)[0]
    (cond, _), _ = _run(_sr(aug_prob=0.5, blur_sigma=(0.5, 0.6), cond_noise=(0.05, 0.1)), x, seed=1)
    changed = int((cond != clean).flatten(1).any(dim=1).sum())
    u, _ = _replayed(64, 3, 4, 4, seed=1)
    assert changed == int((u[:, 0] < 0.5).sum()) and 16 < changed < 48


# --- bad input ---------------------------------------------------------------------------------------------

def test_degrade_needs_sides_divisible_by_the_scale() -> None:
    with pytest.raises(ValueError, match=r"^superres scale 4: the image is 18x18 \(W x H\); both sides must be "
                                         r"multiples of 4$"):
        _run(_sr(scale=4), _images(size=18))


def test_superres_condition_bad_inputs() -> None:
    low = _images(b=1, size=8)
    with pytest.raises(ValueError, match=r"^superres: a 8x8 \(W x H\) low-res input upsampled 2x is 16x16, not the "
                                         r"requested 32x32; give a 16x16 input$"):
        superres_condition(low, 2, size=(32, 32))
    for sigma in (-0.1, float("nan"), 100.0, True):
        with pytest.raises(ValueError, match=r"^blur_sigma=.*: must be a number in \[0, 8\]"):
            superres_condition(low, 2, blur_sigma=sigma)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^superres scale=0: must be a whole number in 1\.\.16$"):
        superres_condition(low, 0)
    with pytest.raises(ValueError, match=r"^superres_condition: expected images \(B, C, H, W\)"):
        superres_condition(low[0], 2)


@pytest.mark.parametrize("kwargs, message", [
    ({"scale": 1}, "task.scale=1: must be a whole number in 2..16"),
    ({"scale": 2.0}, "task.scale=2.0: must be a whole number"),
    ({"scale": True}, "task.scale=True: must be a whole number"),
    ({"scale": 17}, "task.scale=17"),
    ({"blur_sigma": (0.6, 0.1)}, "task.blur_sigma=(0.6, 0.1): lo must not exceed hi"),
    ({"blur_sigma": (-0.1, 0.5)},
     "task.blur_sigma=(-0.1, 0.5): each bound must be a number in [0, 8] (low-res pixels)"),
    ({"blur_sigma": (0.0, 9.0)}, "task.blur_sigma=(0.0, 9.0): each bound"),
    ({"blur_sigma": (0.0, float("inf"))}, "task.blur_sigma=(0.0, inf): each bound"),
    ({"blur_sigma": (0.5,)}, "task.blur_sigma=(0.5,): must be two numbers (lo, hi)"),
    ({"cond_noise": (0.2, 0.1)}, "task.cond_noise=(0.2, 0.1): lo must not exceed hi"),
    ({"cond_noise": (0.0, 1.5)}, "task.cond_noise=(0.0, 1.5): each bound must be a number in [0, 1]"),
    ({"cond_noise": "0.1"}, "task.cond_noise='0.1': must be two numbers"),
    ({"aug_prob": 1.5}, "task.aug_prob=1.5: must be a probability in [0, 1]"),
    ({"aug_prob": -0.1}, "task.aug_prob=-0.1"),
])  # fmt: skip
def test_config_errors_name_the_key(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError) as e:
        _sr(**kwargs)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_config_names_superres_and_round_trips() -> None:
    with pytest.raises(ValueError, match=r"use colorize, inpaint, uncrop, jpeg or multi \(those four in one model\), "
                                         r"or superres$"):
        TaskConfig(name="deblur")  # type: ignore[arg-type]
    cfg = _sr(scale=4, blur_sigma=(0.1, 0.4), cond_noise=(0, 0.2), aug_prob=1)
    back = from_dict(TaskConfig, to_dict(cfg))  # YAML / JSON hold the ranges as lists
    assert back == cfg and isinstance(back.blur_sigma, tuple) and back.cond_noise == (0.0, 0.2)
    assert TaskConfig().scale == 2 and TaskConfig().blur_sigma == (0.0, 0.6) and TaskConfig().aug_prob == 0.5


# --- models ------------------------------------------------------------------------------------------------

def test_the_shipped_config_is_a_single_task_upsampler() -> None:
    cfg = load_experiment("unclip_upsampler")
    assert cfg.task is not None and (cfg.task.name, cfg.task.scale) == ("superres", 2)
    assert (cfg.data.image_size, cfg.model.image_size, cfg.model.cond_channels) == (64, 64, 4)
    assert cfg.model.num_classes is None and cfg.model.attention_resolutions == (8,)


def test_a_superres_model_must_be_single_task() -> None:
    model = {"image_size": 16, "cond_channels": 4, "channel_mult": [1, 2], "attention_resolutions": []}
    from_dict(ExperimentConfig, {"task": {"name": "superres"}, "model": model})
    with pytest.raises(ValueError, match="task.name=superres is one task: set model.num_classes=null"):
        from_dict(ExperimentConfig, {"task": {"name": "superres"}, "model": {**model, "num_classes": 4}})


# --- multi is what it was -----------------------------------------------------------------------------------

# Computed with the code before superres existed (seed 7, two batches of 12 of `x` below, default TaskConfig):
# the task ids, each image's mask area, each image's condition sum (JPEG images left out: libjpeg builds may
# differ) and the generator's next draws. A new task must change none of them.
_MULTI_IDS = ([3, 0, 1, 2, 3, 3, 3, 3, 0, 1, 2, 3], [1, 0, 0, 0, 2, 0, 2, 1, 3, 3, 3, 1])
_MULTI_MASKS = ([256, 256, 50, 192, 256, 256, 256, 256, 256, 64, 192, 256],
                [64, 256, 256, 256, 64, 256, 64, 64, 256, 256, 256, 50])
_MULTI_SUMS = ([2.753, -2.026, -0.869, 11.118, -27.012, -11.231, 10.267, -2.816, 3.21, -12.543, 6.992, 2.839],
               [-5.152, -2.026, 1.085, 1.888, -15.879, -29.598, -1.815, 7.958, 3.396, -14.376, 24.565, -8.629])
_MULTI_NEXT = [157881706, 1394284508, 541570762]


def test_multi_draws_exactly_what_it_drew_before_superres() -> None:
    assert TASK_NAMES == ("colorize", "inpaint", "uncrop", "jpeg") == SINGLE_TASKS[:4]
    x = torch.rand(12, 3, 16, 16, generator=torch.Generator().manual_seed(123)) * 2 - 1
    g = torch.Generator().manual_seed(7)
    for k in range(2):
        (cond, mask), ids = degrade(x, TaskConfig(name="multi"), g)
        assert ids.tolist() == _MULTI_IDS[k]
        assert mask.sum(dim=(1, 2, 3)).long().tolist() == _MULTI_MASKS[k]
        sums = cond.double().sum(dim=(1, 2, 3)).tolist()
        for i, task in enumerate(ids.tolist()):
            if TASK_NAMES[task] != "jpeg":
                assert sums[i] == pytest.approx(_MULTI_SUMS[k][i], abs=2e-3)
    assert torch.randint(0, 2**31, (3,), generator=g).tolist() == _MULTI_NEXT
