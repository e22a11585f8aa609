"""DataConfig -> build_dataset, strict configs and dataset_info."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pakhsh.data import DataConfig, Truncated, build_dataset, dataset_info
from pakhsh.config import ConfigError, from_dict


def test_config_is_strict():
    cfg = from_dict(DataConfig, {"name": "digits", "image_size": "16", "length": 10})
    assert cfg.image_size == 16 and cfg.length == 10
    with pytest.raises(ConfigError, match="imagesize"):
        from_dict(DataConfig, {"imagesize": 16})
    with pytest.raises(ConfigError, match="split"):
        from_dict(DataConfig, {"split": "val"})


def test_unknown_name_and_folder_without_path():
    with pytest.raises(ValueError, match="shapes, fashion_mnist, digits, photos, folder"):
        build_dataset(DataConfig(name="cifar"))
    with pytest.raises(ValueError, match="path"):
        build_dataset(DataConfig(name="folder"))
    with pytest.raises(ValueError, match="random_flip"):
        build_dataset(DataConfig(name="shapes", random_flip=True))


def test_channels_and_length():
    digits = build_dataset(DataConfig(name="digits", length=7))
    assert isinstance(digits, Truncated) and len(digits) == 7 and digits[6]["image"].shape == (1, 32, 32)
    with pytest.raises(IndexError):
        digits[7]
    assert build_dataset(DataConfig(name="digits", channels=3, image_size=16))[0]["image"].shape == (3, 16, 16)
    shapes = build_dataset(DataConfig(name="shapes", split="test", length=5))
    assert len(shapes) == 5 and shapes[0]["image"].shape == (3, 32, 32)
    info = dataset_info(shapes)
    assert info.to_dict() == {
        "name": "shapes", "image_size": 32, "channels": 3, "num_classes": 6, "length": 5,
        "class_names": ["circle", "square", "triangle", "star", "diamond", "cross"],
    }  # fmt: skip


def test_folder(tmp_path):
    for i in range(3):
        Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    ds = build_dataset(DataConfig(name="folder", path=str(tmp_path), image_size=8, crop="random", length=2))
    assert len(ds) == 2 and ds[1]["image"].shape == (3, 8, 8) and dataset_info(ds).num_classes is None
