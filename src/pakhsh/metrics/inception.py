"""The FID InceptionV3: the TF 2015-12-05 Inception graph ported to PyTorch, as used by standard FID/IS/KID.

Standard FID numbers (TTUR, pytorch-fid, torch-fidelity, clean-fid's legacy mode) all come from this network, which
differs from torchvision's ImageNet InceptionV3 in three places (TF semantics kept by the port):
  * average pools inside Mixed_5b..5d, 6b..6e and 7b ignore zero padding (`count_include_pad=False`);
  * the pool branch of the last block (Mixed_7c) is a 3x3 *max* pool, not an average pool;
  * the classifier has 1008 outputs (TF's softmax layer: 1000 ImageNet classes plus 8 unused).
Module names follow torchvision's Inception3 so that `state_dict()` has exactly the keys and shapes of
`pt_inception-2015-12-05-6726825d.pth` (pytorch-fid release `fid_weights`; torch-fidelity ships the same
layout as `weights-inception-2015-12-05-6726825d.pth`): 94 conv+BN blocks (conv.weight, bn.weight, bn.bias,
bn.running_mean, bn.running_var) plus fc.weight (1008, 2048) and fc.bias (1008,); no AuxLogits and no
`num_batches_tracked` counters. That is 472 tensors holding 23,885,392 numbers: 23,850,960 trainable parameters
(torchvision's documented 27,161,264 minus its 3,326,696-parameter AuxLogits head, plus 8 extra fc rows of 2049)
and 34,432 BatchNorm running statistics (2 x 17,216 channels).

Nothing is downloaded: `load_fid_inception` reads a local file and says where to put it when it is missing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pakhsh.metrics.weights import WeightsNotFoundError, load_strict, read_state_dict

WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
# torch-fidelity's name for a file with the same layout; accepted from the same folder as a fallback.
ALT_WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008


class InceptionOutput(NamedTuple):
    """What one forward pass gives."""

    features: Tensor  # (B, 2048) final average pool: the FID/KID/precision-recall features
    logits: Tensor  # (B, 1008) fc(features), with bias
    logits_unbiased: Tensor  # (B, 1008) features @ fc.weight.T, no bias: torch-fidelity's default for IS


class _TFBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm with TF's eps=1e-3 and no `num_batches_tracked` buffer (the ported file has none)."""

    def __init__(self, num_features: int) -> None:
        super().__init__(num_features, eps=0.001)
        self.num_batches_tracked = None  # a None buffer is left out of state_dict()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        # The base class inserts a num_batches_tracked entry for files without version metadata (such as this
        # one); drop it so that the file's exact layout loads strictly.
        state_dict.pop(prefix + "num_batches_tracked", None)
        nn.Module._load_from_state_dict(self, state_dict, prefix, *args, **kwargs)


class ConvBN(nn.Module):
    """Conv (no bias) -> BatchNorm -> ReLU; named `conv`/`bn` to match the checkpoint's keys."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = _TFBatchNorm2d(cout)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x: Tensor) -> Tensor:
    """3x3/1 average pool that, like TF, averages only over the real (unpadded) pixels."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class BlockA(nn.Module):
    """35x35 block (Mixed_5b/5c/5d): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = ConvBN(cin, 64, 1)
        self.branch5x5_1 = ConvBN(cin, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(cin, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_tf_avg_pool(x))], dim=1)


class BlockB(nn.Module):
    """35 -> 17 reduction (Mixed_6a): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], dim=1)


class BlockC(nn.Module):
    """17x17 block with factorised 7x7 convs (Mixed_6b..6e)."""

    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        self.branch1x1 = ConvBN(cin, 192, 1)
        self.branch7x7_1 = ConvBN(cin, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(cin, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            d = conv(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_tf_avg_pool(x))], dim=1)


class BlockD(nn.Module):
    """17 -> 8 reduction (Mixed_7a): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = ConvBN(cin, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], dim=1)


class BlockE(nn.Module):
    """8x8 block with split 1x3/3x1 convs (Mixed_7b: TF average pool; Mixed_7c: max pool, as in the TF graph)."""

    def __init__(self, cin: int, pool: Literal["avg", "max"]) -> None:
        super().__init__()
        self.pool = pool
        self.branch1x1 = ConvBN(cin, 320, 1)
        self.branch3x3_1 = ConvBN(cin, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        s = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(s), self.branch3x3_2b(s)], dim=1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], dim=1)
        if self.pool == "max":
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = _tf_avg_pool(x)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], dim=1)


class FIDInceptionV3(nn.Module):
    """FID InceptionV3. Input: float (B, 3, H, W) in [0, 1] (pytorch-fid's convention); any H, W.

    The input is resized to 299x299 (bilinear, align_corners=False, no antialiasing: as pytorch-fid) and scaled to
    [-1, 1]. Grayscale (B, 1, H, W) is repeated to 3 channels. The network stays in eval mode: BatchNorm uses the
    ported running statistics, never batch statistics.
    """

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = BlockA(192, pool_features=32)
        self.Mixed_5c = BlockA(256, pool_features=64)
        self.Mixed_5d = BlockA(288, pool_features=64)
        self.Mixed_6a = BlockB(288)
        self.Mixed_6b = BlockC(768, c7=128)
        self.Mixed_6c = BlockC(768, c7=160)
        self.Mixed_6d = BlockC(768, c7=160)
        self.Mixed_6e = BlockC(768, c7=192)
        self.Mixed_7a = BlockD(768)
        self.Mixed_7b = BlockE(1280, pool="avg")
        self.Mixed_7c = BlockE(2048, pool="max")
        self.fc = nn.Linear(FEATURE_DIM, NUM_CLASSES)
        self.eval()

    def train(self, mode: bool = True) -> "FIDInceptionV3":
        # A metric network must not switch BatchNorm to batch statistics: stay in eval mode whatever is asked.
        return super().train(False)

    def preprocess(self, x: Tensor) -> Tensor:
        """(B, 1|3, H, W) in [0, 1] -> (B, 3, 299, 299) in [-1, 1]."""
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"expected images (B, 1 or 3, H, W), got {tuple(x.shape)}")
        x = x.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        return 2.0 * x - 1.0

    def pool_features(self, x: Tensor) -> Tensor:
        """Preprocessed (B, 3, 299, 299) -> (B, 2048) final average-pool features."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (B, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (B, 288, 35, 35)
        x = self.Mixed_6a(x)  # (B, 768, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))  # (B, 768, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # (B, 2048, 8, 8)
        return x.mean(dim=(2, 3))  # (B, 2048)

    def forward(self, x: Tensor) -> InceptionOutput:
        """(B, 1|3, H, W) in [0, 1] -> InceptionOutput(features (B, 2048), logits, logits_unbiased (B, 1008))."""
        feats = self.pool_features(self.preprocess(x))
        unbiased = feats @ self.fc.weight.T
        return InceptionOutput(feats, unbiased + self.fc.bias, unbiased)


def default_inception_path() -> Path:
    """Where the weights are looked for: $TORCH_HOME/hub/checkpoints/ (TORCH_HOME defaults to ~/.cache/torch)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILENAME


def find_inception_weights(path: str | Path | None = None) -> Path:
    """The explicit `path` if given, else the torch hub checkpoint folder; WeightsNotFoundError says where to put it."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise WeightsNotFoundError(f"FID InceptionV3 weights not found at {p} (path given explicitly).")
        return p
    primary = default_inception_path()
    for candidate in (primary, primary.with_name(ALT_WEIGHTS_FILENAME)):
        if candidate.is_file():
            return candidate
    raise WeightsNotFoundError(
        f"FID InceptionV3 weights not found. Put {WEIGHTS_FILENAME} (pytorch-fid release 'fid_weights', "
        f"the TF 2015-12-05 Inception ported to PyTorch) at:\n  {primary}\n"
        "or pass path=..., or point $TORCH_HOME at the folder that holds hub/checkpoints/. Nothing is downloaded."
    )


def load_fid_inception(path: str | Path | None = None, device: str | torch.device = "cpu") -> FIDInceptionV3:
    """Build FIDInceptionV3 and load the ported TF weights strictly (.pth via weights_only, or .safetensors).

    Raises WeightsNotFoundError (with the expected location) or WeightsMismatchError (naming each missing or
    unexpected key and each expected-vs-actual shape).
    """
    p = find_inception_weights(path)
    state = read_state_dict(p)
    # Files saved from a torchvision-based module carry BatchNorm step counters; they do not affect inference.
    state = {k: v for k, v in state.items() if not k.endswith(".num_batches_tracked")}
    model = FIDInceptionV3()
    load_strict(model, state, p)
    model.requires_grad_(False)
    return model.to(device)
