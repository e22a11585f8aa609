"""ShapesDataset: determinism, splits, captions vs attributes, segmentation vs pixels, boxes vs masks."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from pakhsh.data.builtin.shapes import (
    _POSITION_PHRASES,
    COLOR_NAMES,
    COLORS,
    SHAPES,
    SIZES,
    ShapesDataset,
)

N = 150  # scenes checked per property test


@pytest.fixture(scope="module")
def train():
    return ShapesDataset("train", length=1000)


@pytest.fixture(scope="module")
def samples(train):
    return [train[i] for i in range(N)]


def test_sample_format(samples):
    s = samples[0]
    assert s["image"].shape == (3, 32, 32) and s["image"].dtype == torch.float32
    assert s["image"].min() >= -1 and s["image"].max() <= 1
    assert s["segmentation"].shape == (32, 32) and s["segmentation"].dtype == torch.int64
    assert s["boxes"].shape == (2, 4) and s["objects"].shape == (2, 4) and s["attributes"].shape == (4,)
    for s in samples:
        n = s["num_objects"]
        assert n in (1, 2) and s["label"] == s["attributes"][0] == s["objects"][0, 0]
        assert (s["boxes"][n:] == -1).all() and (s["objects"][n:] == -1).all()
        assert (s["objects"][:n, 1] != s["background"]).all()  # objects never vanish into the background
    batch = default_collate(samples[:4])
    assert batch["image"].shape == (4, 3, 32, 32) and isinstance(batch["caption"][0], str)


def test_deterministic_from_seed_and_index(train):
    again = ShapesDataset("train", length=1000)
    assert torch.equal(train[7]["image"], again[7]["image"]) and train[7]["caption"] == again[7]["caption"]
    assert not torch.equal(train[7]["image"], train[8]["image"])
    assert not torch.equal(train[7]["image"], ShapesDataset("train", seed=1)[7]["image"])
    assert len(ShapesDataset("train")) == 50_000 and len(ShapesDataset("test")) == 10_000
    with pytest.raises(IndexError):
        train[1000]


def test_splits_disjoint(samples):
    test = ShapesDataset("test")
    train_keys = {s["image"].numpy().tobytes() for s in samples}
    test_keys = {test[i]["image"].numpy().tobytes() for i in range(N)}
    assert len(train_keys) == N and train_keys.isdisjoint(test_keys)


def test_caption_matches_attributes(samples):
    for s in samples:
        phrases = [
            f"a {SIZES[sz]} {COLOR_NAMES[c]} {SHAPES[sh]} {_POSITION_PHRASES[p]}"
            for sh, c, sz, p in s["objects"][: s["num_objects"]].tolist()
        ]
        bg = COLOR_NAMES[s["background"]]
        article = "an" if bg[0] in "aeiou" else "a"
        assert s["caption"] == " and ".join(phrases) + f" on {article} {bg} background"


def test_segmentation_matches_pixels(samples):
    for s in samples:
        img = ((s["image"] + 1) * 127.5).permute(1, 2, 0).numpy()  # (H, W, 3) 0..255
        seg = s["segmentation"].numpy()
        bg = np.array(COLORS[COLOR_NAMES[s["background"]]])
        assert (seg[np.abs(img - bg).max(-1) < 2] == 0).all()  # pure background colour -> label 0
        n = s["num_objects"]
        for shape, color, _, _ in s["objects"][:n].tolist():
            at_colour = np.abs(img - np.array(COLORS[COLOR_NAMES[color]])).max(-1) < 2
            allowed = {o[0] + 1 for o in s["objects"][:n].tolist() if o[1] == color}
            assert set(np.unique(seg[at_colour]).tolist()) <= allowed
        first = s["objects"][0].tolist()
        if n == 1:  # a lone object is always visible
            assert (seg == first[0] + 1).sum() >= 9


def test_boxes_contain_masks(samples):
    for s in samples:
        seg, n = s["segmentation"].numpy(), s["num_objects"]
        ys, xs = np.nonzero(seg)
        for y, x in zip(ys, xs):  # pixel [x, x+1) x [y, y+1) must overlap the box of an object of its shape
            ok = any(
                s["objects"][k, 0] + 1 == seg[y, x]
                and x + 1 > s["boxes"][k, 0] and x < s["boxes"][k, 2]
                and y + 1 > s["boxes"][k, 1] and y < s["boxes"][k, 3]
                for k in range(n)
            )  # fmt: skip
            assert ok, (s["caption"], y, x)
        b = s["boxes"][:n]
        assert (b[:, 0] < b[:, 2]).all() and (b[:, 1] < b[:, 3]).all() and b.min() >= 0 and b.max() <= 32


def test_other_sizes_and_grey():
    s = ShapesDataset("test", size=64, channels=1, length=4)[3]
    assert s["image"].shape == (1, 64, 64) and s["segmentation"].shape == (64, 64)
    assert s["boxes"][: s["num_objects"]].max() <= 64


def test_render_speed():
    ds = ShapesDataset("train", length=10_000)
    ds[0]
    start = time.perf_counter()
    for i in range(300):
        ds[i]
    rate = 300 / (time.perf_counter() - start)
    assert rate > 200, f"{rate:.0f} images/s"  # ~2500/s on one core; a wide margin for loaded CI machines
