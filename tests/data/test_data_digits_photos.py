"""scikit-learn digits and the bundled sample-photo crops."""

from __future__ import annotations

import pytest
import torch

from pakhsh.data.builtin.digits import Digits
from pakhsh.data.builtin.photos import PhotosDataset, available_photos


def test_digits_split_shapes_range():
    train, test = Digits("train"), Digits("test")
    assert len(train) == 1437 and len(test) == 360
    s = train[0]
    assert s["image"].shape == (1, 32, 32) and s["image"].dtype == torch.float32
    assert s["image"].min() >= -1 and s["image"].max() <= 1 and s["image"].min() < -0.9
    assert {test[i]["label"] for i in range(len(test))} == set(range(10))
    assert torch.equal(Digits("test")[5]["image"], test[5]["image"])
    assert Digits("test", size=16, channels=3)[0]["image"].shape == (3, 16, 16)


def test_digits_samples_are_copies():
    ds = Digits("test", size=8)
    ds[0]["image"].fill_(0.5)
    assert not (ds[0]["image"] == 0.5).all()


@pytest.fixture(scope="module")
def photos():
    if not available_photos():
        pytest.skip("no sample photos from scikit-image/scikit-learn/matplotlib installed")
    return PhotosDataset("train", length=200)


def test_photos_shapes_range_labels(photos):
    s = photos[3]
    assert s["image"].shape == (3, 32, 32) and s["image"].dtype == torch.float32
    assert s["image"].min() >= -1 and s["image"].max() <= 1 and s["image"].std() > 0.01
    assert s["label"] == 3 % photos.num_classes and photos.class_names == available_photos()
    assert len(photos) == 200 and len(PhotosDataset("test")) == 2000
    assert PhotosDataset("test", size=16, channels=1, length=2)[1]["image"].shape == (1, 16, 16)


def test_photos_deterministic(photos):
    again = PhotosDataset("train", length=200)
    assert torch.equal(photos[11]["image"], again[11]["image"])
    assert not torch.equal(photos[11]["image"], PhotosDataset("train", seed=1)[11]["image"])
    assert not torch.equal(photos[11]["image"], PhotosDataset("test")[11]["image"])


def test_photos_grid_split_disjoint():
    if not available_photos():
        pytest.skip("no sample photos installed")
    train, test = PhotosDataset("train", mode="grid"), PhotosDataset("test", mode="grid")
    keys = lambda ds: {(ds.crop_box(i)[0], ds.crop_box(i)[1]) for i in range(len(ds))}  # noqa: E731
    assert len(train) >= 4 * len(test) > 0 and keys(train).isdisjoint(keys(test))
    assert train[len(train) - 1]["image"].shape == (3, 32, 32)
