"""Image-to-image (Palette) restoration metrics: one `RestorationScores` row of the Palette paper's Table 2.

Outputs are scored against the originals they restore, pairwise (PSNR, SSIM, perceptual distance) and as a set
(FID, Inception Score, classification accuracy), all under one FeatureNet, plus a "fool rate": the error of a small
classifier trained to tell originals from outputs, an offline stand-in for the paper's human fool rate.
`diversity` and `pairwise_ssim` measure how different several samples of the same input are (the L1-vs-L2
ablation). Images are float (N, C, H, W) in [-1, 1] throughout, so PSNR and SSIM use a data range of 2.
"""

from __future__ import annotations

import copy
import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from pakhsh.metrics.featnet import FeatureNet
from pakhsh.metrics.features import FeatureExtractor, FeatureNetExtractor, extract
from pakhsh.metrics.fid import Stats, compute_statistics, fid_from_features, frechet_distance
from pakhsh.metrics.inception_score import inception_score

__all__ = [
    "RestorationScores",
    "diversity",
    "fool_rate",
    "pairwise_ssim",
    "perceptual_distance",
    "psnr",
    "restoration_scores",
    "ssim",
]

DATA_RANGE = 2.0  # max - min of pakhsh images ([-1, 1])
# Samplers may overshoot [-1, 1] a little before clipping; anything past this bound is another convention
# (e.g. [0, 255]) and would make PSNR/SSIM silently meaningless.
_RANGE_LIMIT = 1.5
_SSIM_KERNEL = 11  # torchmetrics' (and Wang et al.'s) Gaussian window; smaller images get a smaller odd window


class RestorationScores(NamedTuple):
    """One row of the Palette Table 2 for one task and model."""

    fid: float  # FID of outputs vs the originals' features (or the given reference statistics), feature net
    inception_score: float  # IS (mean over splits) of the feature net's class probabilities on the outputs
    ca: float  # top-1 accuracy of the feature net on outputs against the originals' labels; nan without labels
    pd: float  # perceptual distance: mean L2 between feature-net features of each output and its original
    psnr: float  # dB, mean over images, data range 2; inf when every output equals its original
    ssim: float  # mean over images
    fool_rate: float  # test error of a classifier trained to tell originals from outputs; 0.5 = indistinguishable
    n: int  # number of (output, original) pairs


# ----------------------------------------------------------------------------- input checks


def _check_images(x: Tensor, what: str) -> None:
    """Float (N, C, H, W) with N >= 2, finite, in [-1, 1] (up to sampler overshoot)."""
    if not isinstance(x, Tensor) or x.ndim != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{what}: expected images (N, C, H, W), got {shape}")
    if not x.is_floating_point():
        raise ValueError(f"{what}: expected float images in [-1, 1], got dtype {x.dtype}")
    if len(x) < 2:
        raise ValueError(f"{what}: need at least 2 images, got {len(x)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{what}: images contain NaN or inf")
    lo, hi = float(x.min()), float(x.max())
    if lo < -_RANGE_LIMIT or hi > _RANGE_LIMIT:
        raise ValueError(f"{what}: expected values in [-1, 1], got values in [{lo:.4g}, {hi:.4g}]")


def _check_pair(outputs: Tensor, originals: Tensor) -> None:
    """Both valid image sets of the same shape (pairs are matched by index)."""
    _check_images(outputs, "outputs")
    _check_images(originals, "originals")
    if outputs.shape != originals.shape:
        raise ValueError(
            f"outputs {tuple(outputs.shape)} and originals {tuple(originals.shape)} must have the same shape"
        )


# ----------------------------------------------------------------------------- paired pixel metrics


def psnr(outputs: Tensor, originals: Tensor) -> float:
    """Mean over images of each image's PSNR in dB (data range 2). (N, C, H, W) x2 -> float; inf if all equal."""
    _check_pair(outputs, originals)
    per_image = peak_signal_noise_ratio(outputs.double(), originals.double(), data_range=DATA_RANGE,
                                        dim=(1, 2, 3), reduction="none")
    return float(per_image.mean())


def _ssim_kernel(height: int, width: int) -> int:
    """The standard 11-px window, or the largest odd window that fits smaller images."""
    side = min(height, width, _SSIM_KERNEL)
    return side if side % 2 == 1 else side - 1


def _ssim_per_image(a: Tensor, b: Tensor) -> Tensor:
    """(N, C, H, W) x2 -> (N,) SSIM, Gaussian window (sigma 1.5), data range 2.

    In float32, as everyone reports it: float64 convs are ~6x slower on CPU, and the round-off of E[x^2] - E[x]^2
    on flat regions costs at most ~1e-4 (identical flat images score 0.9999x), far below the digits reported.
    """
    k = _ssim_kernel(a.shape[-2], a.shape[-1])
    if k < 3:
        raise ValueError(f"SSIM needs images of at least 3x3 pixels, got {tuple(a.shape[-2:])}")
    return structural_similarity_index_measure(a.float(), b.float(), data_range=DATA_RANGE, kernel_size=k,
                                               reduction="none")


def ssim(outputs: Tensor, originals: Tensor) -> float:
    """Mean SSIM over images (N, C, H, W) x2 -> float in [-1, 1]; 1 when identical."""
    _check_pair(outputs, originals)
    return float(_ssim_per_image(outputs, originals).mean())


# ----------------------------------------------------------------------------- feature metrics


def perceptual_distance(feats_out: Tensor, feats_orig: Tensor) -> float:
    """Mean over pairs of ||f_out - f_orig||_2 for paired features (N, D) x2 -> float."""
    a, b = torch.as_tensor(feats_out).double(), torch.as_tensor(feats_orig).double()
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(
            f"perceptual_distance: expected paired features (N, D) of equal shape, got {tuple(a.shape)} and "
            f"{tuple(b.shape)}"
        )
    if len(a) == 0:
        raise ValueError("perceptual_distance: no features")
    return float(torch.linalg.vector_norm(a - b, dim=1).mean())


# ----------------------------------------------------------------------------- fool rate


class _FoolNet(nn.Module):
    """(B, C, H, W) -> (B,) logit of "original": three strided 3x3 convs (GroupNorm, SiLU), global pool, linear."""

    def __init__(self, in_channels: int, width: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for cout in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.GroupNorm(8, cout), nn.SiLU()]
            cin = cout
        self.trunk = nn.Sequential(*layers)
        self.head = nn.Linear(cin, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.trunk(x).mean(dim=(2, 3))).squeeze(1)


def _split_pairs(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Random halves of the pair indices 0..n-1 (train gets the extra one when n is odd)."""
    perm = torch.randperm(n, generator=generator)
    n_train = (n + 1) // 2
    return perm[:n_train], perm[n_train:]


def _train_fool_net(originals: Tensor, outputs: Tensor, steps: int, batch_size: int, lr: float,
                    generator: torch.Generator, device: torch.device) -> _FoolNet:
    """Adam on binary cross-entropy, original = 1, output = 0; batches drawn with `generator`."""
    model = _FoolNet(originals.shape[1]).to(device)  # init from the caller's (seeded, forked) CPU RNG
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    images = torch.cat([originals, outputs])  # (2M, C, H, W)
    targets = torch.cat([torch.ones(len(originals)), torch.zeros(len(outputs))])
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(images), (batch_size,), generator=generator)
        x, y = images[idx].to(device, torch.float32), targets[idx].to(device)
        loss = F.binary_cross_entropy_with_logits(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def _error_rate(model: _FoolNet, originals: Tensor, outputs: Tensor, batch_size: int, device: torch.device
                ) -> float:
    """Balanced error: mean of the miss rates on originals and on outputs (equal counts, so the plain error)."""
    def predicted_original(x: Tensor) -> Tensor:
        return torch.cat([model(b.to(device, torch.float32)).cpu() > 0 for b in x.split(batch_size)])

    miss_orig = (~predicted_original(originals)).float().mean()
    miss_out = predicted_original(outputs).float().mean()
    return float((miss_orig + miss_out) / 2)


def fool_rate(
    outputs: Tensor,
    originals: Tensor,
    *,
    seed: int = 0,
    steps: int = 300,
    batch_size: int = 64,
    lr: float = 2e-3,
    device: str | torch.device = "cpu",
) -> float:
    """Error rate of a small CNN trained to tell originals (label 1) from outputs (label 0): an offline stand-in
    for the Palette paper's human fool rate. 0.5: indistinguishable; 0: always told apart.

    The pairs are split at random into halves, both images of a pair in the same half (so the classifier never
    sees the original of an output it is tested on); the net trains `steps` Adam steps of `batch_size` images on
    one half and is tested on the other. Deterministic under `seed` (on CPU); the global RNG is left untouched.
    outputs, originals: (N, C, H, W) in [-1, 1], N >= 2.
    """
    _check_pair(outputs, originals)
    if steps < 1 or batch_size < 1:
        raise ValueError(f"fool_rate: steps and batch_size must be positive, got {steps} and {batch_size}")
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    train, test = _split_pairs(len(outputs), generator)
    # The net's initialisation draws from the global CPU RNG: seed it inside a fork, which restores it afterwards.
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        model = _train_fool_net(originals[train], outputs[train], steps, batch_size, lr, generator, device)
    return _error_rate(model, originals[test], outputs[test], 256, device)


# ----------------------------------------------------------------------------- sample diversity


def _check_samples(samples: Tensor) -> None:
    """(K, N, C, H, W) with K >= 2 samples per input."""
    if not isinstance(samples, Tensor) or samples.ndim != 5:
        shape = tuple(samples.shape) if isinstance(samples, Tensor) else type(samples).__name__
        raise ValueError(f"samples: expected (K, N, C, H, W), K samples of N inputs, got {shape}")
    if samples.shape[0] < 2:
        raise ValueError(f"samples: need at least 2 samples per input (K >= 2), got K = {samples.shape[0]}")
    _check_images(samples.flatten(0, 1), "samples")


def diversity(samples: Tensor) -> float:
    """Mean over inputs and pixels of the standard deviation (unbiased, K - 1) across the K samples of each input.

    samples: (K, N, C, H, W) in [-1, 1], K >= 2 outputs per input from different seeds. 0: all samples equal.
    """
    _check_samples(samples)
    return float(samples.double().std(dim=0, correction=1).mean())


def pairwise_ssim(samples: Tensor) -> float:
    """Mean SSIM over all pairs of samples of the same input; lower = more diverse, 1 = all samples equal.

    samples: (K, N, C, H, W) in [-1, 1], K >= 2.
    """
    _check_samples(samples)
    i, j = torch.triu_indices(len(samples), len(samples), offset=1)  # the K (K - 1) / 2 pairs
    a, b = samples[i].flatten(0, 1), samples[j].flatten(0, 1)  # (pairs * N, C, H, W)
    return float(_ssim_per_image(a, b).mean())


# ----------------------------------------------------------------------------- the table row


def _extractor(featnet: FeatureNet | FeatureExtractor, device: torch.device) -> FeatureExtractor:
    """A FeatureExtractor on `device`; a FeatureNet elsewhere is copied there, never moved under its owner."""
    if isinstance(featnet, FeatureExtractor):
        return featnet
    if not isinstance(featnet, FeatureNet):
        raise ValueError(f"featnet must be a FeatureNet or FeatureExtractor, got {type(featnet).__name__}")
    if featnet.head.weight.device != device:
        featnet = copy.deepcopy(featnet).to(device)
    return FeatureNetExtractor(featnet)


def _check_labels(labels: Tensor, n: int, num_classes: int) -> Tensor:
    """(N,) integer class indices in [0, num_classes) -> int64 CPU tensor."""
    y = torch.as_tensor(labels).cpu()
    if y.shape != (n,) or y.is_floating_point():
        raise ValueError(f"labels: expected {n} integer class indices (N,), got {y.dtype} {tuple(y.shape)}")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels: expected class indices in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]")
    return y.long()


def _as_stats(ref_stats: Stats | tuple[np.ndarray, np.ndarray], n: int) -> Stats:
    """Stats, or a bare (mu, sigma) pair (its count is unknown and unused by the Fréchet distance)."""
    if isinstance(ref_stats, Stats):
        return ref_stats
    mu, sigma = ref_stats
    return Stats(np.asarray(mu, dtype=np.float64), np.asarray(sigma, dtype=np.float64), n)


def restoration_scores(
    outputs: Tensor,
    originals: Tensor,
    labels: Tensor | None,
    featnet: FeatureNet | FeatureExtractor,
    *,
    ref_stats: Stats | tuple[np.ndarray, np.ndarray] | None = None,
    batch_size: int = 250,
    device: str | torch.device = "cpu",
    fool_steps: int = 300,
    is_splits: int = 10,
    seed: int = 0,
) -> RestorationScores:
    """All Table 2 metrics of restored `outputs` against their `originals`, both (N, C, H, W) in [-1, 1].

    labels: (N,) classes of the originals, for the classification accuracy (None: ca = nan).
    featnet: a loaded FeatureNet (or any FeatureExtractor); images of another size or channel count are converted
    as the feature extractors do, with a warning. FID compares the outputs' features with `ref_stats` (Stats or
    (mu, sigma)) when given, else with the originals' features. IS uses min(is_splits, N) splits.
    `fool_steps` and `seed` go to `fool_rate`, which (with the feature net) runs on `device`.
    """
    _check_pair(outputs, originals)
    n = len(outputs)
    dev = torch.device(device)
    extractor = _extractor(featnet, dev)
    y = None if labels is None else _check_labels(labels, n, extractor.num_classes)  # before any slow work
    with torch.no_grad():
        out = extract(extractor, outputs, batch_size)
        orig = extract(extractor, originals, batch_size)
    assert out.logits is not None  # every FeatureExtractor returns logits
    if ref_stats is None:
        fid = fid_from_features(orig.features, out.features)
    else:
        fid = frechet_distance(_as_stats(ref_stats, n), compute_statistics(out.features))
    ca = math.nan if y is None else float((out.logits.argmax(dim=1) == y).double().mean())
    return RestorationScores(
        fid=fid,
        inception_score=inception_score(out.logits, splits=min(is_splits, n)).mean,
        ca=ca,
        pd=perceptual_distance(out.features, orig.features),
        psnr=psnr(outputs, originals),
        ssim=ssim(outputs, originals),
        fool_rate=fool_rate(outputs, originals, seed=seed, steps=fool_steps, device=dev),
        n=n,
    )
