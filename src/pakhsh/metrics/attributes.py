"""Built-in attribute classifier for the procedural `shapes` scenes: measures prompt alignment of text-to-image models.

A one-object shapes caption ("a large red circle at the top left on a gray background") names five attributes:
the object's shape, colour, size and grid position, and the background colour. `AttributeNet` is a small CNN
with one classification head per attribute, trained on rendered one-object scenes of the `shapes` train split.
Prompt alignment of a text-to-image model is then the accuracy of this classifier on the model's images against
the attributes named in their prompts (`attribute_accuracy`), over a fixed held-out prompt set drawn from the test
split (`heldout_prompts`).

    net = load_attribute_net()                         # the shipped net (assets/featnets/shapes_attributes)
    prompts = heldout_prompts(1000)                    # [(caption, {"shape": 2, "color": 0, ...}), ...]
    images = my_model([c for c, _ in prompts])         # (N, 3, H, W) in [-1, 1], any H = W
    print(attribute_accuracy(net, images, [a for _, a in prompts]))   # {"shape": .., ..., "all": .., "mean": ..}

Chance levels (`CHANCE`) are simply 1 / number of classes per attribute. (Strictly, the object's colour is never
the background colour, so a guesser that knows the background would reach 1/9 on colour; `CHANCE` does not
assume that.)
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pakhsh.config import ConfigError, load_json
from pakhsh.data.builtin.shapes import (
    _POSITION_PHRASES,
    COLOR_NAMES,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    ShapesDataset,
    caption,
    render_scene,
)
from pakhsh.metrics.featnet import _stage, random_shift
from pakhsh.metrics.weights import (
    WeightsMismatchError,
    WeightsNotFoundError,
    load_strict,
    read_safetensors,
    save_net_folder,
)

ATTRIBUTES = ("shape", "color", "size", "position", "background")
CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "color": COLOR_NAMES,
    "size": SIZES,
    "position": POSITIONS,
    "background": COLOR_NAMES,
}
NUM_CLASSES: dict[str, int] = {k: len(v) for k, v in CLASS_NAMES.items()}  # 6, 10, 2, 9, 10
# Accuracy of a uniform random guess: 1 / classes per attribute; "all" guesses every attribute right at once,
# "mean" is the mean over attributes (the keys of `attribute_accuracy`).
CHANCE: dict[str, float] = {k: 1.0 / n for k, n in NUM_CLASSES.items()}
CHANCE["all"] = math.prod(CHANCE[k] for k in ATTRIBUTES)
CHANCE["mean"] = sum(CHANCE[k] for k in ATTRIBUTES) / len(ATTRIBUTES)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
METRICS_NAME = "train_metrics.json"
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "assets" / "featnets" / "shapes_attributes"

# ---------------------------------------------------------------------------------------------------------------
# Captions <-> attributes


def _alternation(names: tuple[str, ...]) -> str:
    return "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))  # longest first: "top left"


_CAPTION_RE = re.compile(
    rf"an? (?P<size>{_alternation(SIZES)}) (?P<color>{_alternation(COLOR_NAMES)}) "
    rf"(?P<shape>{_alternation(SHAPES)}) (?P<position>{_alternation(_POSITION_PHRASES)}) "
    rf"on an? (?P<background>{_alternation(COLOR_NAMES)}) background\.?"
)


def parse_caption(caption: str) -> dict[str, int]:
    """Attribute indices of a one-object shapes caption, the inverse of `shapes.caption`.

    "a large red circle at the top left on a gray background" -> {"shape": 0, "color": 0, "size": 1,
    "position": 0, "background": 8}. Case, surrounding/repeated spaces, a final full stop and "a"/"an" are
    forgiven; anything else (two objects, unknown words, object colour = background colour) raises ValueError.
    """
    if not isinstance(caption, str):
        raise ValueError(f"caption must be a string, got {type(caption).__name__}")
    text = " ".join(caption.lower().split())
    m = _CAPTION_RE.fullmatch(text)
    if m is None:
        hint = " (it names two objects; only one-object captions are parsed)" if " and a" in text else ""
        raise ValueError(
            f"not a one-object shapes caption: {caption!r}{hint}; expected e.g. "
            "'a large red circle at the top left on a gray background'"
        )
    attrs = {
        "shape": SHAPES.index(m["shape"]),
        "color": COLOR_NAMES.index(m["color"]),
        "size": SIZES.index(m["size"]),
        "position": _POSITION_PHRASES.index(m["position"]),
        "background": COLOR_NAMES.index(m["background"]),
    }
    if attrs["color"] == attrs["background"]:
        raise ValueError(f"not a shapes caption: {caption!r} gives the object the background's colour")
    return attrs


def _check_attrs(attrs: Any, what: str = "attributes") -> dict[str, int]:
    """Validate a {attribute: index} dict (exactly ATTRIBUTES, indices in range); return it with int values."""
    if not isinstance(attrs, dict):
        raise ValueError(f"{what} must be a dict with keys {list(ATTRIBUTES)}, got {type(attrs).__name__}")
    if set(attrs) != set(ATTRIBUTES):
        raise ValueError(f"{what} must have exactly the keys {list(ATTRIBUTES)}, got {sorted(map(str, attrs))}")
    out = {}
    for k in ATTRIBUTES:
        v = attrs[k]
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) and not (
            isinstance(v, Tensor) and v.numel() == 1 and not v.is_floating_point()
        ):
            raise ValueError(f"{what}[{k!r}] must be an integer class index, got {v!r}")
        v = int(v)
        if not 0 <= v < NUM_CLASSES[k]:
            raise ValueError(f"{what}[{k!r}] = {v} is out of range 0..{NUM_CLASSES[k] - 1}")
        out[k] = v
    return out


def caption_for(attrs: dict[str, int]) -> str:
    """The shapes caption of a one-object scene with these attribute indices (round-trips with parse_caption)."""
    a = _check_attrs(attrs)
    if a["color"] == a["background"]:
        raise ValueError(f"attributes give the object the background's colour ({COLOR_NAMES[a['color']]})")
    obj = ShapeObject(shape=a["shape"], color=a["color"], size=a["size"], position=a["position"],
                      cx=0.0, cy=0.0, radius=0.0)
    return caption(Scene(background=a["background"], objects=(obj,)))


def scene_attributes(scene: Scene) -> dict[str, int]:
    """Attribute indices of a one-object scene."""
    if len(scene.objects) != 1:
        raise ValueError(f"scene_attributes takes one-object scenes, got {len(scene.objects)} objects")
    o = scene.objects[0]
    return {"shape": o.shape, "color": o.color, "size": o.size, "position": o.position,
            "background": scene.background}


def _stream(split: str, image_size: int, seed: int) -> ShapesDataset:
    """The split as an unbounded stream: scenes are a pure function of (seed, split, index), so a longer dataset
    only extends the same sequence (the default lengths, 50k train / 10k test, would cap large requests)."""
    return ShapesDataset(split=split, size=image_size, seed=seed, length=2**62)  # type: ignore[arg-type]


def one_object_indices(split: str, n: int, seed: int = 0) -> list[int]:
    """Indices of the first `n` one-object scenes of ShapesDataset(split, seed=seed) (about half of all scenes)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    ds = _stream(split, 64, seed)
    out: list[int] = []
    i = 0
    while len(out) < n:
        if len(ds.scene(i).objects) == 1:
            out.append(i)
        i += 1
    return out


def heldout_prompts(n: int = 1000, seed: int = 0) -> list[tuple[str, dict[str, int]]]:
    """A fixed held-out prompt set: (caption, attributes) of the first `n` one-object scenes of
    ShapesDataset(split="test", size=64, seed=seed). The test split is a stream disjoint from the training data."""
    indices = one_object_indices("test", n, seed)
    ds = _stream("test", 64, seed)
    out = []
    for i in indices:
        scene = ds.scene(i)
        out.append((caption(scene), scene_attributes(scene)))
    return out


def render_one_object(split: str, n: int, image_size: int = 64, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Render the first `n` one-object scenes of a split: uint8 images (n, 3, S, S) and int64 targets (n, 5)
    in ATTRIBUTES order. (uint8 keeps 20k training images at 64 px in 250 MB.)"""
    idx = one_object_indices(split, n, seed)
    ds = _stream(split, image_size, seed)
    images = torch.empty(n, 3, image_size, image_size, dtype=torch.uint8)
    targets = torch.empty(n, len(ATTRIBUTES), dtype=torch.long)
    for j, i in enumerate(idx):
        scene = ds.scene(i)
        images[j] = torch.from_numpy(np.array(render_scene(scene, image_size, ds.supersample).image)).permute(2, 0, 1)
        a = scene_attributes(scene)
        targets[j] = torch.tensor([a[k] for k in ATTRIBUTES])
    return images, targets


def _to_unit(images_u8: Tensor) -> Tensor:
    return images_u8.float() / 127.5 - 1.0


# ---------------------------------------------------------------------------------------------------------------
# The network


@dataclass
class AttributeNetConfig:
    """Shape of an AttributeNet; saved as config.json next to the weights."""

    name: str = "shapes-attributes"
    image_size: int = 64  # side it was trained on; other sizes are resized bilinearly to it
    in_channels: int = 3
    width: int = 16  # channels of the first stage; stages use width, 2*width, 4*width (each halves the side)
    grid: int = 4  # the last feature map is average-pooled to grid x grid cells (keeps where things are)
    hidden_dim: int = 128  # shared layer that feeds the heads


class AttributeNet(nn.Module):
    """Image (B, 3, H, W) in [-1, 1] -> {attribute: logits (B, classes)} for every name in ATTRIBUTES."""

    def __init__(self, cfg: AttributeNetConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or AttributeNetConfig()
        if cfg.image_size < 16 or cfg.width < 8 or cfg.width % 8 or cfg.grid < 1 or cfg.hidden_dim < 1:
            raise ValueError(f"AttributeNetConfig needs image_size >= 16, width a multiple of 8, grid >= 1: {cfg}")
        self.cfg = cfg
        w = cfg.width
        self.trunk = nn.Sequential(
            _stage(cfg.in_channels, w, downsample=True),
            _stage(w, 2 * w, downsample=True),
            _stage(2 * w, 4 * w, downsample=True),
        )
        # grid x grid average cells (where) + a global max over the map (what, wherever it is)
        self.proj = nn.Linear(4 * w * (cfg.grid * cfg.grid + 1), cfg.hidden_dim)
        self.heads = nn.ModuleDict({k: nn.Linear(cfg.hidden_dim, NUM_CLASSES[k]) for k in ATTRIBUTES})

    def resize(self, x: Tensor) -> Tensor:
        """Bilinear resize to image_size x image_size (antialiased when shrinking)."""
        s = self.cfg.image_size
        if x.shape[-2:] == (s, s):
            return x
        shrink = x.shape[-2] > s or x.shape[-1] > s
        return F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=shrink)

    def features(self, x: Tensor) -> Tensor:
        """(B, hidden_dim) penultimate features: what the heads read (shape, colour, size, position and background
        all live here, so they serve as an FID feature space for shapes scenes that sees colour)."""
        if x.ndim != 4 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"AttributeNet expects images (B, {self.cfg.in_channels}, H, W), got {tuple(x.shape)}")
        h = self.trunk(self.resize(x.float()))
        h = torch.cat([F.adaptive_avg_pool2d(h, self.cfg.grid).flatten(1), h.amax(dim=(2, 3))], 1)
        return F.silu(self.proj(h))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h = self.features(x)
        return {k: head(h) for k, head in self.heads.items()}


@torch.no_grad()
def predict_attributes(net: AttributeNet, images: Tensor, batch_size: int = 256) -> dict[str, Tensor]:
    """Predicted class index per attribute: {attribute: int64 (N,)} for images (N, 3, H, W) in [-1, 1]."""
    if not isinstance(images, Tensor) or images.ndim != 4:
        raise ValueError(f"images must be a tensor (N, 3, H, W) in [-1, 1], got "
                         f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not images.is_floating_point() or len(images) and float(images.detach().abs().amax()) > 1.01:
        raise ValueError("images must be float in [-1, 1] (convert uint8 with x / 127.5 - 1)")
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    preds: dict[str, list[Tensor]] = {k: [] for k in ATTRIBUTES}
    for start in range(0, len(images), batch_size):
        logits = net(images[start : start + batch_size].to(device))
        for k in ATTRIBUTES:
            preds[k].append(logits[k].argmax(1).cpu())
    net.train(was_training)
    return {k: torch.cat(v) if v else torch.empty(0, dtype=torch.long) for k, v in preds.items()}


def _targets_tensor(targets: Any, n: int) -> Tensor:
    """list of attribute dicts, or an int tensor (n, 5) in ATTRIBUTES order -> int64 (n, 5)."""
    if isinstance(targets, Tensor):
        if targets.shape != (n, len(ATTRIBUTES)) or targets.is_floating_point():
            raise ValueError(f"targets tensor must be int (N={n}, {len(ATTRIBUTES)}), got {tuple(targets.shape)}")
        for j, k in enumerate(ATTRIBUTES):
            if n and not 0 <= int(targets[:, j].min()) <= int(targets[:, j].max()) < NUM_CLASSES[k]:
                raise ValueError(f"targets column {j} ({k}) must hold class indices 0..{NUM_CLASSES[k] - 1}")
        return targets.long().cpu()
    targets = list(targets)
    if len(targets) != n:
        raise ValueError(f"got {n} images but {len(targets)} targets")
    rows = [[a[k] for k in ATTRIBUTES] for a in (_check_attrs(t, f"targets[{i}]") for i, t in enumerate(targets))]
    return torch.tensor(rows, dtype=torch.long).reshape(n, len(ATTRIBUTES))


def attribute_accuracy(
    net: AttributeNet, images: Tensor, targets: list[dict[str, int]] | Tensor, batch_size: int = 256
) -> dict[str, float]:
    """Per-attribute accuracy of `net` on images (N, 3, H, W) in [-1, 1] against the attributes in `targets`
    (one dict per image, as from parse_caption / heldout_prompts), plus "all" (fraction of images with every
    attribute right) and "mean" (mean over the attributes). Compare with CHANCE."""
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be a tensor (N, 3, H, W) in [-1, 1], got "
                         f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}")
    if len(images) == 0:
        raise ValueError("attribute_accuracy needs at least one image")
    y = _targets_tensor(targets, len(images))
    pred = predict_attributes(net, images, batch_size)
    right = torch.stack([pred[k] == y[:, j] for j, k in enumerate(ATTRIBUTES)], 1)  # (N, 5) bool
    n = len(right)
    out = {k: int(right[:, j].sum()) / n for j, k in enumerate(ATTRIBUTES)}  # exact fractions, not float32 means
    out["all"] = int(right.all(1).sum()) / n
    out["mean"] = sum(out[k] for k in ATTRIBUTES) / len(ATTRIBUTES)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Training


def _augment(x: Tensor, gen: torch.Generator, max_shift: int, lowres_prob: float, noise_prob: float) -> Tensor:
    """Shift by up to max_shift px (small: the grid cells must stay apart); re-sample part of the batch through a
    lower resolution (robustness to small or blurry generated images); add light noise to part of it."""
    x = random_shift(x, max_shift, gen)
    s = x.shape[-1]
    if lowres_prob > 0:
        pick = torch.rand(len(x), generator=gen) < lowres_prob
        if pick.any():
            low = int(torch.randint(s // 3, (3 * s) // 4 + 1, (1,), generator=gen))
            small = F.interpolate(x[pick], size=(low, low), mode="bilinear", align_corners=False, antialias=True)
            x = x.clone()
            x[pick] = F.interpolate(small, size=(s, s), mode="bilinear", align_corners=False)
    if noise_prob > 0:
        std = 0.05 * torch.rand(len(x), 1, 1, 1, generator=gen) * (torch.rand(len(x), 1, 1, 1, generator=gen)
                                                                      < noise_prob)
        x = (x + std * torch.randn(x.shape, generator=gen)).clamp(-1, 1)
    return x


def _accuracy_on(net: AttributeNet, images_u8: Tensor, targets: Tensor) -> dict[str, float]:
    return attribute_accuracy(net, _to_unit(images_u8), targets)


def train_attribute_net(
    steps: int = 3000,
    batch_size: int = 64,
    seed: int = 0,
    image_size: int = 64,
    num_train: int = 20_000,
    num_test: int = 2000,
    width: int = 16,
    lr: float = 3e-3,
    max_shift: int = 1,
    lowres_prob: float = 0.25,
    noise_prob: float = 0.25,
    log_every: int = 100,
    progress: bool = True,
) -> tuple[AttributeNet, dict[str, Any]]:
    """Train an AttributeNet on the first `num_train` one-object scenes of ShapesDataset(split="train"), rendered
    once at `image_size` (data seed 0); `seed` drives initialisation, batches and augmentation. Loss: sum of the
    per-head cross-entropies; AdamW with cosine decay. Returns the net in eval mode and a metrics dict with
    per-attribute accuracy on the first `num_test` one-object test scenes (also rendered at half the size)."""
    from tqdm.auto import tqdm

    for name, v, lo in (("steps", steps, 1), ("batch_size", batch_size, 1), ("num_train", num_train, 1),
                        ("num_test", num_test, 1), ("image_size", image_size, 16)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    t0 = time.perf_counter()
    train_x, train_y = render_one_object("train", num_train, image_size)
    render_s = time.perf_counter() - t0

    torch.manual_seed(seed)
    cfg = AttributeNetConfig(image_size=image_size, width=width)
    net = AttributeNet(cfg)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(seed + 1)
    history: list[float] = []
    window, seen = 0.0, 0
    net.train()
    t1 = time.perf_counter()
    bar = tqdm(range(steps), desc="train shapes-attributes", disable=not progress)
    for _ in bar:
        idx = torch.randint(len(train_x), (batch_size,), generator=gen)
        x = _augment(_to_unit(train_x[idx]), gen, max_shift, lowres_prob, noise_prob)
        y = train_y[idx]
        logits = net(x)
        loss = sum(F.cross_entropy(logits[k], y[:, j]) for j, k in enumerate(ATTRIBUTES))
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[union-attr]
        opt.step()
        sched.step()
        window += float(loss.detach())  # type: ignore[union-attr]
        seen += 1
        if seen == log_every:
            history.append(window / seen)
            bar.set_postfix(loss=f"{history[-1]:.4f}")
            window, seen = 0.0, 0
    if seen:
        history.append(window / seen)
    train_s = time.perf_counter() - t1
    net.eval()

    test_x, test_y = render_one_object("test", num_test, image_size)
    small_x, small_y = render_one_object("test", num_test, max(8, image_size // 2))
    metrics: dict[str, Any] = {
        "name": cfg.name,
        "steps": steps,
        "batch_size": batch_size,
        "seed": seed,
        "lr": lr,
        "image_size": image_size,
        "width": width,
        "num_params": sum(p.numel() for p in net.parameters()),
        "augment": {"max_shift": max_shift, "lowres_prob": lowres_prob, "noise_prob": noise_prob},
        "train_data": f"first {num_train:,} one-object scenes of "
        f"ShapesDataset(split='train', size={image_size}, seed=0)",
        "test_data": f"first {num_test:,} one-object scenes of ShapesDataset(split='test', seed=0)",
        "render_seconds": round(render_s, 1),
        "train_seconds": round(train_s, 1),
        "torch_threads": torch.get_num_threads(),
        "first_loss": history[0],
        "final_loss": history[-1],
        "loss_history": history,
        "test_accuracy": _accuracy_on(net, test_x, test_y),
        f"test_accuracy_rendered_at_{max(8, image_size // 2)}px": _accuracy_on(net, small_x, small_y),
        "chance": dict(CHANCE),
    }
    return net, metrics


# ---------------------------------------------------------------------------------------------------------------
# Save / load


def save_attribute_net(net: AttributeNet, directory: str | Path, metrics: dict[str, Any] | None = None) -> Path:
    """Write model.safetensors + config.json (and train_metrics.json when given) into `directory`."""
    return save_net_folder(net, directory, metrics)


def load_attribute_net(directory: str | Path | None = None, device: str | torch.device = "cpu") -> AttributeNet:
    """Read an AttributeNet saved by `save_attribute_net` (default: the shipped one); strict on config keys,
    weight keys and shapes. A missing or mismatched file raises a one-line error naming it."""
    d = Path(directory) if directory is not None else SHIPPED_DIR
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (d / name).is_file():
            raise WeightsNotFoundError(
                f"{d / name} not found: an attribute-net folder holds {CONFIG_NAME} + {WEIGHTS_NAME}, as written by "
                "save_attribute_net or scripts/train_attribute_net.py"
            )
    try:
        cfg = load_json(AttributeNetConfig, d / CONFIG_NAME)
        net = AttributeNet(cfg)
    except (ConfigError, ValueError) as e:
        msg = " ".join(str(e).split())
        where = str(d / CONFIG_NAME)
        raise WeightsMismatchError(msg if where in msg else f"{where}: {msg}") from None
    try:
        load_strict(net, read_safetensors(d / WEIGHTS_NAME), d / WEIGHTS_NAME)
    except WeightsMismatchError as e:  # load_strict lists problems on several lines: keep one
        raise WeightsMismatchError("; ".join(line.strip() for line in str(e).splitlines())) from None
    net.eval().requires_grad_(False)
    return net.to(device)
