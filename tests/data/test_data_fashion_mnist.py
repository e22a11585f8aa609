"""Fashion-MNIST: idx parsing on synthetic files, and the real Debian-packaged data when installed."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from pakhsh.data.builtin.fashion_mnist import DEFAULT_ROOT, FashionMNIST, IdxFormatError, read_idx


def write_idx(path, arr: np.ndarray, type_byte: int = 0x08, compress: bool = False) -> None:
    header = bytes([0, 0, type_byte, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_roundtrip(tmp_path, compress):
    arr = np.arange(3 * 2 * 4, dtype=np.uint8).reshape(3, 2, 4)
    write_idx(tmp_path / "x.idx", arr, compress=compress)
    out = read_idx(tmp_path / "x.idx")
    assert out.dtype == np.uint8 and np.array_equal(out, arr)
    ints = np.array([1, -2, 70000], dtype=np.int32)
    write_idx(tmp_path / "i.idx", ints, type_byte=0x0C, compress=compress)
    assert np.array_equal(read_idx(tmp_path / "i.idx"), ints)


def test_read_idx_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad-magic.idx"
    bad.write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(IdxFormatError, match="bad-magic.idx.*magic"):
        read_idx(bad)
    short = tmp_path / "short.idx"
    short.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x00" * 3)
    with pytest.raises(IdxFormatError, match="short.idx.*declares shape"):
        read_idx(short)
    ok = tmp_path / "labels.idx"
    write_idx(ok, np.zeros(3, np.uint8))
    with pytest.raises(IdxFormatError, match="3 dimensions"):
        read_idx(ok, expect_ndim=3)


def fake_fashion(root, n=5, compress=True):
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        suffix = ".gz" if compress else ""
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", images, compress=compress)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", labels, compress=compress)


@pytest.mark.parametrize("compress", [False, True])
def test_synthetic_folder(tmp_path, compress):
    fake_fashion(tmp_path, compress=compress)
    ds = FashionMNIST(tmp_path, "test", size=32)
    assert len(ds) == 5
    x = ds[0]["image"]
    assert x.shape == (1, 32, 32)
    assert (x[:, :2] == -1).all() and (x[:, :, -2:] == -1).all()  # 2-pixel background border
    raw = FashionMNIST(tmp_path, "test", size=28)[0]["image"]
    assert torch.equal(raw, x[:, 2:-2, 2:-2])
    assert FashionMNIST(tmp_path, size=20, channels=3)[1]["image"].shape == (3, 20, 20)


def test_missing_data_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        FashionMNIST(tmp_path / "nowhere")
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="train-labels-idx1-ubyte"):
        FashionMNIST(tmp_path)


def test_mismatched_counts(tmp_path):
    fake_fashion(tmp_path, compress=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(4, np.uint8))
    with pytest.raises(IdxFormatError, match="5 images but .* 4 labels"):
        FashionMNIST(tmp_path)


needs_debian = pytest.mark.skipif(  # the files, not the folder: an empty or hidden folder is not the dataset
    not any((DEFAULT_ROOT / f"train-images-idx3-ubyte{ext}").is_file() for ext in ("", ".gz")),
    reason=f"Fashion-MNIST not installed at {DEFAULT_ROOT} (apt-get install dataset-fashion-mnist)",
)


@needs_debian
def test_real_fashion_mnist():
    train, test = FashionMNIST(split="train"), FashionMNIST(split="test")
    assert len(train) == 60_000 and len(test) == 10_000
    assert np.bincount(train.labels).tolist() == [6000] * 10
    s = test[0]
    assert s["image"].shape == (1, 32, 32) and s["image"].dtype == torch.float32
    assert s["image"].min() == -1 and s["image"].max() <= 1 and s["image"].max() > 0.5
    assert 0 <= s["label"] < 10 and len(train.class_names) == 10
    assert FashionMNIST(split="test", size=28, channels=3)[0]["image"].shape == (3, 28, 28)
