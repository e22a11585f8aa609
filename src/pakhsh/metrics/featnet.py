"""FeatureNet: a small CNN classifier trained on a built-in dataset, used as that dataset's feature extractor.

ImageNet Inception features say little about 28x28 grayscale clothes or digits, and need weights from outside. A
classifier trained on the dataset itself gives features (penultimate layer) for FID/KID/precision-recall and
class probabilities for IS and classification accuracy of generated samples, all offline.
Weights are saved as `model.safetensors` plus `config.json` (FeatureNetConfig); loading is strict.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from pakhsh.config import ConfigError, load_json
from pakhsh.metrics.weights import (
    WeightsMismatchError,
    WeightsNotFoundError,
    load_strict,
    read_safetensors,
    save_net_folder,
)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
METRICS_NAME = "train_metrics.json"


@dataclass
class FeatureNetConfig:
    """Shape of a FeatureNet; saved as config.json next to the weights."""

    name: str = "featnet"  # extractor name used in metric labels and stats-cache keys, e.g. "fashion-net"
    in_channels: int = 1  # channels it was trained on (1 grayscale, 3 RGB)
    image_size: int = 28  # side it was trained on; other sizes are resized with a warning
    num_classes: int = 10
    width: int = 32  # channels of the first stage; stages use width, 2*width, 4*width
    feature_dim: int = 128  # penultimate (feature) layer size


class FeatureOutput(NamedTuple):
    features: Tensor  # (B, feature_dim)
    logits: Tensor  # (B, num_classes)


def _stage(cin: int, cout: int, downsample: bool) -> nn.Sequential:
    """Two 3x3 convs with GroupNorm (batch-size independent, so eval equals train-time behaviour) + SiLU."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=2 if downsample else 1, padding=1),
        nn.GroupNorm(min(8, cout), cout),
        nn.SiLU(),
        nn.Conv2d(cout, cout, 3, padding=1),
        nn.GroupNorm(min(8, cout), cout),
        nn.SiLU(),
    )


class FeatureNet(nn.Module):
    """Image (B, C, H, W) in [-1, 1] -> FeatureOutput(features (B, feature_dim), logits (B, num_classes))."""

    def __init__(self, cfg: FeatureNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.trunk = nn.Sequential(
            _stage(cfg.in_channels, w, downsample=False),
            _stage(w, 2 * w, downsample=True),
            _stage(2 * w, 4 * w, downsample=True),
        )
        self.proj = nn.Linear(4 * w, cfg.feature_dim)
        self.head = nn.Linear(cfg.feature_dim, cfg.num_classes)

    def forward(self, x: Tensor) -> FeatureOutput:
        if x.ndim != 4 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"FeatureNet expects (B, {self.cfg.in_channels}, H, W), got {tuple(x.shape)}")
        h = self.trunk(x).mean(dim=(2, 3))  # (B, 4w): global average pool makes any size valid
        feats = F.silu(self.proj(h))  # (B, feature_dim)
        return FeatureOutput(feats, self.head(feats))


@dataclass
class FeatureNetTrainResult:
    """What `train_feature_net` reports."""

    steps: int
    first_loss: float  # mean cross-entropy of the first logging window
    final_loss: float  # mean cross-entropy of the last logging window
    train_accuracy: float  # accuracy on the training batches of the last logging window
    eval_accuracy: float | None = None  # accuracy on `eval_dataset`, when one is given
    loss_history: list[float] = field(default_factory=list)  # one mean per logging window

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def infer_feature_net_config(
    dataset: Dataset, name: str = "featnet", width: int = 32, feature_dim: int = 128
) -> FeatureNetConfig:
    """FeatureNetConfig fitting `dataset`: channels and size from its first image, classes from its
    `num_classes` attribute (pakhsh datasets have one) or else from the largest label."""
    item = dataset[0]
    c, h, w = item["image"].shape
    if h != w:
        raise ValueError(f"FeatureNet takes square images, got {(h, w)}")
    num_classes = getattr(dataset, "num_classes", None)
    if num_classes is None:
        num_classes = 1 + max(int(dataset[i]["label"]) for i in range(len(dataset)))  # type: ignore[arg-type]
    return FeatureNetConfig(name=name, in_channels=c, image_size=h, num_classes=int(num_classes), width=width,
                            feature_dim=feature_dim)


def random_shift(x: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Light augmentation: translate each image by up to `max_shift` pixels, edges replicated. (B,C,H,W)->same."""
    if max_shift <= 0:
        return x
    b, _, h, w = x.shape
    shifts = torch.randint(-max_shift, max_shift + 1, (b, 2), generator=generator).to(x)
    theta = torch.zeros(b, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = shifts[:, 0] * 2.0 / w  # grid units: the image spans [-1, 1]
    theta[:, 1, 2] = shifts[:, 1] * 2.0 / h
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="border", align_corners=False)


def _collate_image_label(items: list[dict[str, Any]]) -> dict[str, Tensor]:
    """Batch only "image" and "label": other fields (captions, boxes, ...) are not needed and may not stack."""
    return {"image": torch.stack([it["image"] for it in items]),
            "label": torch.tensor([int(it["label"]) for it in items])}


def _batches(dataset: Dataset, batch_size: int, seed: int) -> Any:
    """Endless shuffled batches of {"image": (B,C,H,W), "label": (B,)}."""
    gen = torch.Generator().manual_seed(seed)
    drop_last = len(dataset) >= batch_size  # type: ignore[arg-type]
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=drop_last, generator=gen,
                        collate_fn=_collate_image_label)
    while True:
        yield from loader


def _check_sample(dataset: Dataset, cfg: FeatureNetConfig) -> None:
    """Fail early, naming the mismatch, if the dataset's images do not fit the config."""
    item = dataset[0]
    if not isinstance(item, dict) or "image" not in item or "label" not in item:
        raise ValueError("dataset items must be dicts with 'image' (C,H,W) in [-1,1] and 'label' int")
    c, h, w = item["image"].shape
    if c != cfg.in_channels or h != cfg.image_size or w != cfg.image_size:
        raise ValueError(
            f"dataset images are {(c, h, w)} but FeatureNetConfig expects "
            f"{(cfg.in_channels, cfg.image_size, cfg.image_size)}"
        )


def train_feature_net(
    dataset: Dataset,
    cfg: FeatureNetConfig,
    steps: int = 3000,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    eval_dataset: Dataset | None = None,
    log_every: int = 50,
) -> tuple[FeatureNet, FeatureNetTrainResult]:
    """Train a FeatureNet classifier: cross-entropy, AdamW, cosine LR decay, random-shift augmentation.

    `dataset` yields {"image": (C, H, W) float in [-1, 1], "label": int}. Returns the model in eval mode.
    """
    from tqdm.auto import tqdm

    _check_sample(dataset, cfg)
    torch.manual_seed(seed)
    model = FeatureNet(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    aug_gen = torch.Generator().manual_seed(seed + 1)
    max_shift = max(1, cfg.image_size // 14)  # 2 px at 28x28: small enough to keep the class
    history: list[float] = []
    window_loss, window_correct, window_seen = 0.0, 0, 0
    first_loss = train_acc = float("nan")
    model.train()
    bar = tqdm(range(steps), desc=f"train {cfg.name}", disable=not progress)
    batches = _batches(dataset, batch_size, seed)
    for step in bar:
        batch = next(batches)
        x = random_shift(batch["image"].float(), max_shift, aug_gen).to(device)
        y = torch.as_tensor(batch["label"]).long().to(device)
        logits = model(x).logits
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        window_loss += loss.item() * len(y)
        window_correct += int((logits.argmax(1) == y).sum())
        window_seen += len(y)
        if (step + 1) % log_every == 0 or step + 1 == steps:
            history.append(window_loss / window_seen)
            first_loss = history[0]
            train_acc = window_correct / window_seen
            bar.set_postfix(loss=f"{history[-1]:.4f}", acc=f"{train_acc:.3f}")
            window_loss, window_correct, window_seen = 0.0, 0, 0
    model.eval()
    result = FeatureNetTrainResult(
        steps=steps,
        first_loss=first_loss,
        final_loss=history[-1] if history else float("nan"),
        train_accuracy=train_acc,
        loss_history=history,
    )
    if eval_dataset is not None:
        result.eval_accuracy = classification_accuracy(model, eval_dataset, device=device)
    return model, result


@torch.no_grad()
def classification_accuracy(
    model: FeatureNet, dataset: Dataset, batch_size: int = 256, device: str | torch.device = "cpu"
) -> float:
    """Top-1 accuracy of `model` on a labelled dataset of {"image", "label"} dicts."""
    model.eval()
    correct, seen = 0, 0
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=_collate_image_label):
        logits = model(batch["image"].float().to(device)).logits
        correct += int((logits.argmax(1).cpu() == torch.as_tensor(batch["label"]).long()).sum())
        seen += len(logits)
    return correct / max(seen, 1)


def save_feature_net(model: FeatureNet, directory: str | Path, metrics: FeatureNetTrainResult | None = None) -> Path:
    """Write model.safetensors + config.json (and train_metrics.json when given) into `directory`."""
    return save_net_folder(model, directory, metrics.to_dict() if metrics is not None else None)


def load_feature_net(directory: str | Path, device: str | torch.device = "cpu") -> FeatureNet:
    """Read a FeatureNet saved by `save_feature_net`; strict on config keys, weight keys and shapes."""
    d = Path(directory)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (d / name).is_file():
            raise WeightsNotFoundError(
                f"FeatureNet folder {d} lacks {name} (expected {CONFIG_NAME} + {WEIGHTS_NAME}, as written by "
                "save_feature_net or `python -m pakhsh.metrics.train_featnet --out DIR`)"
            )
    try:
        cfg = load_json(FeatureNetConfig, d / CONFIG_NAME)
    except ConfigError as e:
        raise WeightsMismatchError(f"{d / CONFIG_NAME}: {e}") from None
    model = FeatureNet(cfg)
    load_strict(model, read_safetensors(d / WEIGHTS_NAME), d / WEIGHTS_NAME)
    model.eval().requires_grad_(False)
    return model.to(device)
