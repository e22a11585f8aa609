"""ImageFolderDataset: recursive scan, labels, corrupt files (construction and load time), errors."""

from __future__ import annotations

import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from pakhsh.data.image_folder import CorruptImageError, ImageFolderDataset, scan_images


def write_image(path, mode="RGB", size=(12, 10), seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 4), dtype=np.uint8)
    img = Image.fromarray(arr, "RGBA").convert(mode)
    img.save(path)
    return path


def png_that_verifies_but_fails_to_decode(path):
    """Valid chunk CRCs (so verify() passes) around an IDAT that is not zlib data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"garbage") + chunk(b"IEND", b""))
    return path


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture
def labelled(tmp_path):
    root = tmp_path / "pets"
    write_image(root / "dog" / "a.png")
    write_image(root / "dog" / "deeper" / "b.JPG", seed=1)
    write_image(root / "cat" / "c.JpEg", mode="L", seed=2)
    write_image(root / "cat" / "d.webp", mode="RGBA", seed=3)
    write_image(root / "bird" / "e.bmp", seed=4)
    (root / "cat" / "notes.txt").write_text("not an image")
    write_image(root / "cat" / ".hidden.png", seed=5)
    return root


def test_recursive_scan_and_labels(labelled):
    names = sorted(p.name for p in scan_images(labelled))
    assert names == ["a.png", "b.JPG", "c.JpEg", "d.webp", "e.bmp"]
    ds = ImageFolderDataset(labelled, size=8)
    assert len(ds) == 5 and ds.skipped == []
    assert ds.class_names == ["bird", "cat", "dog"] and ds.num_classes == 3
    by_name = {s["path"].split("/")[-1]: s for s in (ds[i] for i in range(len(ds)))}
    assert by_name["b.JPG"]["label"] == 2 and by_name["c.JpEg"]["label"] == 1 and by_name["e.bmp"]["label"] == 0
    for s in by_name.values():
        assert s["image"].shape == (3, 8, 8) and s["image"].dtype == torch.float32
        assert -1 <= s["image"].min() and s["image"].max() <= 1
    assert ImageFolderDataset(labelled, size=8, channels=1)[0]["image"].shape == (1, 8, 8)


def test_flat_folder_has_no_labels(tmp_path):
    write_image(tmp_path / "x.png")
    write_image(tmp_path / "y.png", seed=1)
    ds = ImageFolderDataset(tmp_path, size=6)
    assert ds.num_classes is None and ds.class_names is None and "label" not in ds[0]


def test_corrupt_files_skipped_with_warning(labelled):
    bad = [
        labelled / "dog" / "empty.png",
        labelled / "cat" / "noise.jpg",
        truncate(write_image(labelled / "cat" / "cut.png", seed=9)),
        truncate(write_image(labelled / "dog" / "cut.jpg", seed=9, size=(64, 64))),
    ]
    bad[0].write_bytes(b"")
    bad[1].write_bytes(np.random.default_rng(0).bytes(300))
    with pytest.warns(UserWarning, match="skipped 4 corrupt"):
        ds = ImageFolderDataset(labelled, size=8)
    assert len(ds) == 5
    assert sorted(ds.skipped) == sorted(str(p) for p in bad)
    assert ds.class_names == ["bird", "cat", "dog"]


def test_strict_raises_naming_the_file(labelled):
    cut = truncate(write_image(labelled / "dog" / "cut.png", seed=9))
    with pytest.raises(CorruptImageError, match="cut.png"):
        ImageFolderDataset(labelled, size=8, strict=True)
    assert cut.exists()


def test_load_time_guard(tmp_path):
    write_image(tmp_path / "a.png")
    bad = png_that_verifies_but_fails_to_decode(tmp_path / "b.png")
    write_image(tmp_path / "c.png", seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # it passes the construction-time check silently
        ds = ImageFolderDataset(tmp_path, size=8)
    assert len(ds) == 3
    with pytest.warns(UserWarning, match="b.png"):
        sample = ds[1]
    assert sample["path"].endswith("c.png") and str(bad) in ds.skipped
    strict = ImageFolderDataset(tmp_path, size=8, strict=True)
    with pytest.raises(CorruptImageError, match="b.png"):
        strict[1]


def test_empty_and_missing_folders(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "readme.txt").write_text("hi")
    with pytest.raises(ValueError, match=r"no images found in .*\.png.*\.jpeg"):
        ImageFolderDataset(tmp_path, size=8)
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        ImageFolderDataset(tmp_path / "does-not-exist", size=8)


def test_random_crop_flip_deterministic_per_seed_and_epoch(tmp_path):
    write_image(tmp_path / "a.png", size=(40, 24))
    make = lambda seed: ImageFolderDataset(tmp_path, size=16, crop="random", random_flip=True, seed=seed)  # noqa: E731
    a, b = make(0), make(0)
    assert torch.equal(a[0]["image"], b[0]["image"])
    seen = set()
    for epoch in range(8):
        a.set_epoch(epoch)
        seen.add(a[0]["image"].numpy().tobytes())
    assert len(seen) > 1  # augmentation varies across epochs
