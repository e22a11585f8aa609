"""Crops of the sample photos shipped inside scikit-image, scikit-learn and matplotlib (no download).

Photos are located through the installed packages' folders (without importing them); any that are missing
are skipped. Each photo is first shrunk so its shorter side is `photo_side` (default min(native, 8 * size)),
then crops are cut from it:
  mode="random": crop i picks photo i % n_photos and a square window of side `scale` x shorter side at a
                 position drawn from default_rng([seed, split stream, i]); train and test are disjoint
                 streams of the same distribution of crops (an i.i.d. split, as FID reference sets want).
  mode="grid":   all square tiles of side scale[0] x shorter side at half-tile stride, photo by photo;
                 every 5th tile is test.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from pakhsh.data.base import ImageDataset, Sample, check_channels
from pakhsh.data.transforms import normalize_mode, pil_to_tensor, random_hflip

# name -> (package, path inside the package folder)
PHOTO_SOURCES: dict[str, tuple[str, str]] = {
    "astronaut": ("skimage", "data/astronaut.png"),
    "coffee": ("skimage", "data/coffee.png"),
    "chelsea": ("skimage", "data/chelsea.png"),
    "rocket": ("skimage", "data/rocket.jpg"),
    "hubble_deep_field": ("skimage", "data/hubble_deep_field.jpg"),
    "immunohistochemistry": ("skimage", "data/ihc.png"),
    "motorcycle": ("skimage", "data/motorcycle_left.png"),
    "china": ("sklearn", "datasets/images/china.jpg"),
    "flower": ("sklearn", "datasets/images/flower.jpg"),
    "grace_hopper": ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
}
GRID_TEST_EVERY = 5


def photo_path(name: str) -> Path | None:
    """File of sample photo `name`, or None when its package or file is not installed."""
    package, rel = PHOTO_SOURCES[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    return path if path.is_file() else None


def available_photos() -> list[str]:
    """Names of the sample photos present on this machine, in PHOTO_SOURCES order."""
    return [n for n in PHOTO_SOURCES if photo_path(n) is not None]


@functools.lru_cache(maxsize=32)
def load_photo(name: str, side: int | None) -> Image.Image:
    """RGB photo with its shorter side shrunk to `side` (never enlarged); cached per process."""
    path = photo_path(name)
    if path is None:
        raise FileNotFoundError(f"sample photo {name!r} is not installed ({PHOTO_SOURCES[name][0]} missing?)")
    with Image.open(path) as im:
        im.load()  # decode before the file closes
        img = normalize_mode(im, channels=3)
    if side is not None and min(img.size) > side:
        s = side / min(img.size)
        img = img.resize((round(img.width * s), round(img.height * s)), Image.Resampling.BICUBIC)
    return img


def grid_boxes(width: int, height: int, tile: int) -> list[tuple[int, int, int, int]]:
    """Square tiles of side `tile` at stride tile // 2, row by row: (x0, y0, x1, y1)."""
    stride = max(1, tile // 2)
    return [
        (x, y, x + tile, y + tile)
        for y in range(0, height - tile + 1, stride)
        for x in range(0, width - tile + 1, stride)
    ]


class PhotosDataset(ImageDataset):
    """Square crops of the bundled sample photos, resized to `size` (see the module docstring for modes).

    Sample keys: "image" (C, size, size) in [-1, 1]; "label" int: index of the source photo in
    `class_names`; "box" float32 (4,): the crop x0, y0, x1, y1 in pixels of the shrunk photo.
    """

    name = "photos"

    def __init__(
        self,
        split: Literal["train", "test"] = "train",
        size: int = 32,
        length: int | None = None,
        seed: int = 0,
        mode: Literal["random", "grid"] = "random",
        scale: tuple[float, float] = (0.15, 0.5),
        photo_side: int | None = None,
        channels: int = 3,
        random_flip: bool = False,
        photos: list[str] | None = None,
    ) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if mode not in ("random", "grid"):
            raise ValueError(f"mode must be 'random' or 'grid', got {mode!r}")
        if not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {scale}")
        unknown = sorted(set(photos or []) - set(PHOTO_SOURCES))
        if unknown:
            raise ValueError(f"unknown photo(s) {unknown}; known: {', '.join(PHOTO_SOURCES)}")
        names = [n for n in (photos or available_photos()) if photo_path(n) is not None]
        if not names:
            raise FileNotFoundError("no sample photos found (install scikit-image, scikit-learn or matplotlib)")
        self.split, self.mode, self.scale = split, mode, scale
        self.image_size = size
        self.channels = check_channels(channels)
        self.seed = int(seed)
        self.random_flip = random_flip
        self.class_names = names
        self.num_classes = len(names)
        self.images = [load_photo(n, photo_side or 8 * size) for n in names]
        self._stream = 0 if split == "train" else 1
        self._tiles = self._grid_tiles() if mode == "grid" else []
        natural = len(self._tiles) if mode == "grid" else (10_000 if split == "train" else 2_000)
        if length is None:
            self.length = natural
        else:  # random crops are unlimited; the grid has as many tiles as it has
            self.length = min(int(length), natural) if mode == "grid" else int(length)

    def _grid_tiles(self) -> list[tuple[int, tuple[int, int, int, int]]]:
        """(photo index, box) of every tile in this split."""
        tiles = []
        for p, img in enumerate(self.images):
            tile = max(1, round(self.scale[0] * min(img.size)))
            tiles += [(p, b) for b in grid_boxes(img.width, img.height, tile)]
        is_test = [i % GRID_TEST_EVERY == 0 for i in range(len(tiles))]
        return [t for t, test in zip(tiles, is_test) if test == (self.split == "test")]

    def __len__(self) -> int:
        return self.length

    def crop_box(self, index: int) -> tuple[int, tuple[float, float, float, float]]:
        """(photo index, crop box) of sample `index`; a pure function of seed, split and index."""
        if self.mode == "grid":
            p, box = self._tiles[index]
            return p, (float(box[0]), float(box[1]), float(box[2]), float(box[3]))
        rng = np.random.default_rng([self.seed, self._stream, index])
        p = index % len(self.images)  # balanced over photos
        img = self.images[p]
        side = rng.uniform(*self.scale) * min(img.size)
        x0, y0 = rng.uniform(0, img.width - side), rng.uniform(0, img.height - side)
        return p, (x0, y0, x0 + side, y0 + side)

    def _get(self, index: int) -> Sample:
        p, box = self.crop_box(index)
        size = (self.image_size, self.image_size)
        crop = self.images[p].resize(size, Image.Resampling.BICUBIC, box=box)  # antialiased when shrinking
        if self.random_flip:
            crop = random_hflip(crop, self.sample_rng(index))
        if self.channels == 1:
            crop = crop.convert("L")
        return {"image": pil_to_tensor(crop), "label": p, "box": torch.tensor(box, dtype=torch.float32)}
