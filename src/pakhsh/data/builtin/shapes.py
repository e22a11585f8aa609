"""Procedural scenes of coloured shapes with captions, labels, segmentation and boxes (no files needed).

A scene is a background colour plus one or two objects, each with a shape, colour, size and position on a
3x3 grid (with a little jitter in place and scale, so no two images are pixel-identical). Scenes are a pure
function of (seed, split, index): the train split draws from the stream `default_rng([seed, 0, index])`, the
test split from `[seed, 1, index]`, so the splits are disjoint streams of the same distribution.

Rendering draws at `supersample` times the resolution with PIL and box-filters down, which antialiases the
edges; segmentation takes the majority label of each pixel's sub-samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageDraw

from pakhsh.data.base import ImageDataset, Sample, check_channels
from pakhsh.data.transforms import uint8_to_tensor

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "cyan": (40, 200, 220),
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "black": (20, 20, 20),
}
COLOR_NAMES = tuple(COLORS)
SIZES = ("small", "large")
POSITIONS = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
_POSITION_PHRASES = (
    "at the top left", "at the top", "at the top right",
    "on the left", "in the center", "on the right",
    "at the bottom left", "at the bottom", "at the bottom right",
)  # fmt: skip
ATTRIBUTE_NAMES = ("shape", "color", "size", "position")  # column order of "attributes" / "objects"
MAX_OBJECTS = 2

# Geometry as fractions of the image side: grid centres, object radii, jitter.
_GRID = (0.2, 0.5, 0.8)  # keeps a large object at a corner (nearly) inside the frame
_RADIUS = {0: 0.10, 1: 0.17}  # small, large
_JITTER = 0.03  # +- centre offset
_SCALE_JITTER = 0.1  # +- relative radius change


@dataclass(frozen=True)
class ShapeObject:
    """One object: attribute indices into SHAPES/COLOR_NAMES/SIZES/POSITIONS plus pixel geometry."""

    shape: int
    color: int
    size: int
    position: int
    cx: float  # centre x in output pixels (continuous; pixel j spans [j, j + 1))
    cy: float
    radius: float


@dataclass(frozen=True)
class Scene:
    background: int  # colour index
    objects: tuple[ShapeObject, ...]  # drawing order: later objects cover earlier ones


@dataclass(frozen=True)
class RenderedScene:
    image: np.ndarray  # uint8 (H, W, 3)
    segmentation: np.ndarray  # int64 (H, W): 0 background, shape index + 1 elsewhere
    boxes: np.ndarray  # float32 (num_objects, 4): x0, y0, x1, y1 in pixels, clipped to the image


def make_scene(rng: np.random.Generator, image_size: int) -> Scene:
    """Draw a random scene; object colours always differ from the background colour."""
    background = int(rng.integers(len(COLORS)))
    n = 1 + int(rng.random() < 0.5)
    positions = rng.permutation(len(POSITIONS))[:n]  # distinct cells keep captions unambiguous
    objects = []
    for pos in positions:
        color = int(rng.integers(len(COLORS) - 1))
        color += color >= background  # skip the background colour
        shape, size = int(rng.integers(len(SHAPES))), int(rng.integers(len(SIZES)))
        jx, jy, js = rng.uniform(-1.0, 1.0, 3)
        row, col = divmod(int(pos), 3)
        objects.append(
            ShapeObject(
                shape=shape,
                color=color,
                size=size,
                position=int(pos),
                cx=(_GRID[col] + _JITTER * jx) * image_size,
                cy=(_GRID[row] + _JITTER * jy) * image_size,
                radius=_RADIUS[size] * (1.0 + _SCALE_JITTER * js) * image_size,
            )
        )
    return Scene(background=background, objects=tuple(objects))


def caption(scene: Scene) -> str:
    """E.g. "a large red circle at the top left and a small blue square on a gray background"."""
    parts = [
        f"a {SIZES[o.size]} {COLOR_NAMES[o.color]} {SHAPES[o.shape]} {_POSITION_PHRASES[o.position]}"
        for o in scene.objects
    ]
    bg = COLOR_NAMES[scene.background]
    article = "an" if bg[0] in "aeiou" else "a"  # "an orange background"
    return f"{' and '.join(parts)} on {article} {bg} background"


def _star(r: float) -> np.ndarray:
    angles = -np.pi / 2 + np.arange(10) * np.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, 1.15 * r, 0.5 * r)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], 1)


def _cross(r: float) -> np.ndarray:
    a, b = r, 0.36 * r  # half-length, half-width of the arms
    quarter = [(-b, -a), (b, -a), (b, -b)]  # one arm's outline; rotating it by 90 degrees gives the rest
    return np.array([(x * c - y * s, x * s + y * c) for c, s in ((1, 0), (0, 1), (-1, 0), (0, -1)) for x, y in quarter])


def shape_polygon(shape: int, cx: float, cy: float, r: float) -> np.ndarray | None:
    """(N, 2) polygon vertices in pixels, bounding box centred on (cx, cy); None for the circle."""
    name = SHAPES[shape]
    if name == "circle":
        return None
    if name == "square":
        s = 0.85 * r  # similar area to the circle of radius r
        v = np.array([(-s, -s), (s, -s), (s, s), (-s, s)])
    elif name == "triangle":
        angles = -np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        v = 1.2 * r * np.stack([np.cos(angles), np.sin(angles)], 1)
    elif name == "star":
        v = _star(r)
    elif name == "diamond":
        v = 1.1 * r * np.array([(0, -1), (1, 0), (0, 1), (-1, 0)])
    else:
        v = _cross(r)
    v = v - (v.min(0) + v.max(0)) / 2  # centre the bounding box (triangle and star are top-heavy)
    return v + np.array([cx, cy])


def object_box(obj: ShapeObject, image_size: int) -> np.ndarray:
    """(4,) x0, y0, x1, y1 of the object's full outline (also where covered), clipped to the image."""
    poly = shape_polygon(obj.shape, obj.cx, obj.cy, obj.radius)
    if poly is None:
        box = np.array([obj.cx - obj.radius, obj.cy - obj.radius, obj.cx + obj.radius, obj.cy + obj.radius])
    else:
        box = np.concatenate([poly.min(0), poly.max(0)])
    return np.clip(box, 0.0, float(image_size)).astype(np.float32)


def _draw(draws: tuple[ImageDraw.ImageDraw, ...], fills: tuple, obj: ShapeObject, ss: int) -> None:
    """Draw `obj` on each canvas (image, label map) at supersampling factor `ss`."""
    poly = shape_polygon(obj.shape, obj.cx, obj.cy, obj.radius)
    if poly is None:  # PIL ellipse boxes are inclusive pixel indices
        r = obj.radius
        xy = [(obj.cx - r) * ss, (obj.cy - r) * ss, (obj.cx + r) * ss - 1, (obj.cy + r) * ss - 1]
        for d, fill in zip(draws, fills):
            d.ellipse(xy, fill=fill)
    else:  # PIL puts pixel centres on integer coordinates, so continuous u maps to u * ss - 0.5
        pts = [tuple(p) for p in (poly * ss - 0.5).tolist()]
        for d, fill in zip(draws, fills):
            d.polygon(pts, fill=fill)


def _majority_downsample(labels: np.ndarray, ss: int, values: list[int]) -> np.ndarray:
    """(H*ss, W*ss) label map -> (H, W) int64: the most frequent of `values` in each ss x ss block."""
    h, w = labels.shape[0] // ss, labels.shape[1] // ss
    blocks = labels.reshape(h, ss, w, ss)
    counts = np.stack([(blocks == v).sum(axis=(1, 3)) for v in values])  # (len(values), H, W)
    return np.asarray(values, dtype=np.int64)[counts.argmax(0)]  # ties go to the earlier value (background)


def render_scene(scene: Scene, image_size: int, supersample: int = 4) -> RenderedScene:
    """Antialiased RGB image, segmentation and boxes of `scene` at image_size x image_size."""
    ss, big = supersample, image_size * supersample
    canvas = Image.new("RGB", (big, big), COLORS[COLOR_NAMES[scene.background]])
    labels = Image.new("L", (big, big), 0)
    draws = (ImageDraw.Draw(canvas), ImageDraw.Draw(labels))
    for obj in scene.objects:
        _draw(draws, (COLORS[COLOR_NAMES[obj.color]], obj.shape + 1), obj, ss)
    image = np.asarray(canvas.reduce(ss) if ss > 1 else canvas)  # box filter = area coverage antialiasing
    values = [0] + sorted({o.shape + 1 for o in scene.objects})
    seg = _majority_downsample(np.asarray(labels), ss, values)
    boxes = np.stack([object_box(o, image_size) for o in scene.objects])
    return RenderedScene(image=image, segmentation=seg, boxes=boxes)


class ShapesDataset(ImageDataset):
    """Captioned shape scenes, generated on the fly (deterministic per index; nothing is cached).

    Sample keys:
      "image"        float32 (C, size, size) in [-1, 1] (C = 3, or 1 as luma)
      "label"        int: shape index (into SHAPES) of the *first* object — the class for conditional models
      "caption"      str, e.g. "a large red circle at the top left and a small blue square on a gray background"
      "attributes"   int64 (4,): shape, color, size, position indices of the first object (ATTRIBUTE_NAMES)
      "objects"      int64 (MAX_OBJECTS, 4): the same for every object, rows past num_objects are -1
      "num_objects"  int: 1 or 2
      "boxes"        float32 (MAX_OBJECTS, 4): x0, y0, x1, y1 in pixels of each object's full outline
                     (even where a later object covers it), rows past num_objects are -1
      "segmentation" int64 (size, size): 0 background, shape index + 1 of the visible object elsewhere
      "background"   int: colour index of the background
    """

    name = "shapes"
    num_classes = len(SHAPES)
    class_names = list(SHAPES)

    def __init__(
        self,
        split: Literal["train", "test"] = "train",
        size: int = 32,
        length: int | None = None,
        seed: int = 0,
        channels: int = 3,
        supersample: int = 4,
    ) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if size < 8:
            raise ValueError(f"size must be at least 8, got {size}")
        self.split = split
        self.image_size = size
        self.length = int(length) if length is not None else (50_000 if split == "train" else 10_000)
        self.seed = int(seed)
        self.channels = check_channels(channels)
        self.supersample = supersample
        self._stream = 0 if split == "train" else 1

    def __len__(self) -> int:
        return self.length

    def scene(self, index: int) -> Scene:
        """The scene behind sample `index` (a pure function of seed, split and index)."""
        rng = np.random.default_rng([self.seed, self._stream, self._check_index(index)])
        return make_scene(rng, self.image_size)

    def _get(self, index: int) -> Sample:
        scene = self.scene(index)
        r = render_scene(scene, self.image_size, self.supersample)
        image = uint8_to_tensor(r.image)  # (3, H, W)
        if self.channels == 1:  # ITU-R 601 luma, as PIL's convert("L")
            image = (image * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0, keepdim=True)
        n = len(scene.objects)
        objects = torch.full((MAX_OBJECTS, 4), -1, dtype=torch.long)
        objects[:n] = torch.tensor([[o.shape, o.color, o.size, o.position] for o in scene.objects])
        boxes = torch.full((MAX_OBJECTS, 4), -1.0)
        boxes[:n] = torch.from_numpy(r.boxes)
        return {
            "image": image,
            "label": scene.objects[0].shape,
            "caption": caption(scene),
            "attributes": objects[0].clone(),
            "objects": objects,
            "num_objects": n,
            "boxes": boxes,
            "segmentation": torch.from_numpy(r.segmentation),
            "background": scene.background,
        }
