"""Feature extractors for the metrics: one interface over the FID InceptionV3 and the built-in FeatureNets.

Convention: every `FeatureExtractor` takes pakhsh images, float (B, C, H, W) in [-1, 1] (what datasets and samplers
produce; uint8 in [0, 255] is also accepted), and converts them to what its network wants:
  * channels: 1 -> 3 by repetition, 3 -> 1 by averaging (a warning, unless the network defines the conversion:
    Inception takes grayscale by repetition, as standard FID does for grayscale datasets);
  * size: resized (bilinear, antialiased when shrinking) to the network's training size, with a warning.
With `strict=True` such conversions raise instead. The networks themselves live in `inception.py`, `featnet.py`.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from pakhsh.metrics.featnet import (
    FeatureNet,
    FeatureNetConfig,
    FeatureNetTrainResult,
    classification_accuracy,
    load_feature_net,
    save_feature_net,
    train_feature_net,
)
from pakhsh.metrics.inception import (
    FIDInceptionV3,
    InceptionOutput,
    default_inception_path,
    load_fid_inception,
)

__all__ = [
    "Extracted",
    "FeatureExtractor",
    "FeatureNetExtractor",
    "InceptionExtractor",
    "ImageSource",
    "convert_images",
    "extract",
    "item_image",
    "iter_image_batches",
    "unit_to_model_range",
    "model_to_unit_range",
    # re-exported networks
    "FIDInceptionV3",
    "InceptionOutput",
    "default_inception_path",
    "load_fid_inception",
    "FeatureNet",
    "FeatureNetConfig",
    "FeatureNetTrainResult",
    "classification_accuracy",
    "train_feature_net",
    "save_feature_net",
    "load_feature_net",
]

# A tensor (N, C, H, W), a Dataset of {"image": (C, H, W)} dicts or of tensors, or an iterable of batches.
ImageSource = Union[Tensor, Dataset, Iterable[Any]]


class Extracted(NamedTuple):
    """Features (and logits) of a whole image set, float64 on CPU."""

    features: Tensor  # (N, D)
    logits: Tensor | None  # (N, K), None when the extractor gives none


def unit_to_model_range(x: Tensor) -> Tensor:
    """Images in [0, 1] -> pakhsh's [-1, 1]."""
    return 2.0 * x - 1.0


def model_to_unit_range(x: Tensor) -> Tensor:
    """pakhsh's [-1, 1] -> [0, 1] (the range pytorch-fid's and our FIDInceptionV3 take)."""
    return (x + 1.0) / 2.0


def convert_images(x: Tensor, channels: int | None = None, size: int | None = None) -> Tensor:
    """(B, C, H, W) -> (B, channels, size, size): 1 -> 3 channels by repetition, 3 -> 1 by averaging; bilinear
    resize, antialiased when shrinking. None keeps that property."""
    c = x.shape[1]
    if channels is not None and c != channels:
        if (c, channels) not in ((1, 3), (3, 1)):
            raise ValueError(f"cannot convert {c}-channel images to {channels} channels")
        x = x.repeat(1, 3, 1, 1) if c == 1 else x.mean(dim=1, keepdim=True)
    if size is not None and x.shape[-2:] != (size, size):
        shrink = x.shape[-1] > size or x.shape[-2] > size
        x = F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
    return x


class FeatureExtractor(ABC):
    """A named feature network: `features(x) -> (B, D)`, `logits(x) -> (B, K)`, x (B, C, H, W) in [-1, 1]."""

    name: str  # shows up in metric labels (FID[name]-5k) and stats-cache keys
    in_channels: int  # channels the network is fed
    accepted_channels: tuple[int, ...]  # channel counts taken without a warning
    image_size: int | None  # side the network was trained on; None: any size (the network resizes itself)
    feature_dim: int
    num_classes: int

    def __init__(self, strict: bool = False) -> None:
        self.strict = strict

    @abstractmethod
    def _run(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Prepared (B, C, H, W) in [-1, 1] -> (features (B, D), logits (B, K))."""

    @property
    @abstractmethod
    def device(self) -> torch.device:
        """Where the network runs (inputs are moved there)."""

    @torch.no_grad()
    def features(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, feature_dim)."""
        return self._run(self.prepare(x))[0]

    @torch.no_grad()
    def logits(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, num_classes)."""
        return self._run(self.prepare(x))[1]

    @torch.no_grad()
    def features_and_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Both in one forward pass."""
        return self._run(self.prepare(x))

    def prepare(self, x: Tensor) -> Tensor:
        """Convert dtype, channels and size to what the network takes (warn, or raise when strict)."""
        if x.ndim != 4:
            raise ValueError(f"{self.name}: expected images (B, C, H, W), got {tuple(x.shape)}")
        if x.dtype == torch.uint8:
            x = x.float() / 127.5 - 1.0
        x = x.to(self.device, torch.float32)
        x = self._convert_channels(x)
        return self._convert_size(x)

    def _convert_channels(self, x: Tensor) -> Tensor:
        c = x.shape[1]
        if c in self.accepted_channels:
            return x
        self._notice(f"{self.name}: {c}-channel images converted to {self.in_channels} channel(s)")
        return convert_images(x, channels=self.in_channels)

    def _convert_size(self, x: Tensor) -> Tensor:
        s = self.image_size
        if s is None or x.shape[-2:] == (s, s):
            return x
        self._notice(f"{self.name}: images of size {tuple(x.shape[-2:])} resized to ({s}, {s})")
        return convert_images(x, size=s)

    def _notice(self, message: str) -> None:
        if self.strict:
            raise ValueError(message + " (strict=True forbids conversions)")
        warnings.warn(message, stacklevel=4)


class InceptionExtractor(FeatureExtractor):
    """Standard FID features: FIDInceptionV3 pool3 (2048-d) and its 1008-way logits.

    `logits` are torch-fidelity's `logits_unbiased` (no fc bias), the default for its Inception Score; pass
    `use_fc_bias=True` for the biased logits (pytorch-fid does not compute IS).
    """

    name = "inception"
    in_channels = 3
    accepted_channels = (1, 3)  # grayscale is repeated inside the network: the standard FID treatment
    image_size = None  # always resized to 299 inside the network, as standard FID does
    feature_dim = 2048
    num_classes = 1008

    def __init__(
        self,
        model: FIDInceptionV3 | None = None,
        path: str | Path | None = None,
        device: str | torch.device = "cpu",
        use_fc_bias: bool = False,
        strict: bool = False,
    ) -> None:
        super().__init__(strict)
        self.model = (model if model is not None else load_fid_inception(path)).to(device).eval()
        self.use_fc_bias = use_fc_bias

    @property
    def device(self) -> torch.device:
        return self.model.fc.weight.device

    def _run(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = self.model(model_to_unit_range(x))
        return out.features, out.logits if self.use_fc_bias else out.logits_unbiased


class FeatureNetExtractor(FeatureExtractor):
    """Features from a trained FeatureNet: penultimate layer (feature_dim) and class logits."""

    def __init__(self, model: FeatureNet, name: str | None = None, strict: bool = False) -> None:
        super().__init__(strict)
        self.model = model.eval()
        cfg = model.cfg
        self.name = name or cfg.name
        self.in_channels = cfg.in_channels
        self.accepted_channels = (cfg.in_channels,)
        self.image_size = cfg.image_size
        self.feature_dim = cfg.feature_dim
        self.num_classes = cfg.num_classes

    @classmethod
    def from_dir(cls, directory: str | Path, device: str | torch.device = "cpu", strict: bool = False
                 ) -> "FeatureNetExtractor":
        """Load a FeatureNet saved by `save_feature_net`."""
        return cls(load_feature_net(directory, device=device), strict=strict)

    @property
    def device(self) -> torch.device:
        return self.model.head.weight.device

    def _run(self, x: Tensor) -> tuple[Tensor, Tensor]:
        out = self.model(x)
        return out.features, out.logits


def item_image(item: Any) -> Tensor:
    """The image of a dataset item: {"image": ...} dicts, (image, label) pairs or bare tensors."""
    if isinstance(item, dict):
        return item["image"]
    return item[0] if isinstance(item, (tuple, list)) else item


def _collate_images(items: list[Any]) -> Tensor:
    """Stack only the images of dataset items (other fields, e.g. captions or boxes, need not batch)."""
    return torch.stack([item_image(it) for it in items])


def iter_image_batches(source: ImageSource, batch_size: int = 64) -> Iterator[Tensor]:
    """Yield (B, C, H, W) image batches from a tensor, a Dataset (items: dict with "image", or tensor), or batches."""
    if isinstance(source, Tensor):
        if source.ndim != 4:
            raise ValueError(f"expected an image tensor (N, C, H, W), got {tuple(source.shape)}")
        yield from source.split(batch_size)
        return
    if isinstance(source, Dataset) and hasattr(source, "__len__"):
        source = DataLoader(source, batch_size=batch_size, shuffle=False, collate_fn=_collate_images)
    for batch in source:
        batch = item_image(batch)
        if batch.ndim == 3:  # a single image
            batch = batch.unsqueeze(0)
        yield batch


def extract(
    extractor: FeatureExtractor,
    source: ImageSource,
    batch_size: int = 64,
    max_items: int | None = None,
    progress: bool = False,
) -> Extracted:
    """Run `extractor` over an image set; returns float64 CPU features (N, D) and logits (N, K)."""
    from tqdm.auto import tqdm

    feats: list[Tensor] = []
    logits: list[Tensor] = []
    seen = 0
    for batch in tqdm(iter_image_batches(source, batch_size), desc=f"features[{extractor.name}]",
                      disable=not progress):
        if max_items is not None:
            batch = batch[: max_items - seen]
        f, lg = extractor.features_and_logits(batch)
        feats.append(f.double().cpu())
        logits.append(lg.double().cpu())
        seen += len(batch)
        if max_items is not None and seen >= max_items:
            break
    if not feats:
        raise ValueError("no images in the source")
    return Extracted(torch.cat(feats), torch.cat(logits))
