"""A folder of images (recursive), with class labels from first-level subfolders and corrupt-file handling."""

from __future__ import annotations

import logging
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from pakhsh.data.base import ImageDataset, Sample, check_channels
from pakhsh.data.transforms import CropMode, ImageTransform

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_JPEG_EOI = b"\xff\xd9"
_JPEG_TAIL_BYTES = 64 * 1024  # some encoders/cameras append padding or metadata after the end marker
_LOAD_RETRIES = 16  # consecutive unreadable files tolerated before giving up on a __getitem__


class CorruptImageError(ValueError):
    """An image file that cannot be read or decoded; the message names the file."""


def scan_images(root: Path) -> list[Path]:
    """All image files under `root` (recursive, sorted, case-insensitive extensions, hidden entries skipped).

    Symlinked folders are followed once each (a link back up the tree would otherwise loop forever).
    """
    found: list[Path] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            # "._x.jpg" (macOS resource forks) and other dotfiles are never images
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS):
                found.append(Path(dirpath) / f)
    return sorted(found)


def _jpeg_truncated(path: Path) -> bool:
    """A JPEG without an end-of-image marker near its end was cut short (verify() does not notice)."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        n = f.tell()
        f.seek(max(0, n - _JPEG_TAIL_BYTES))
        tail = f.read()
    return _JPEG_EOI not in tail


def verify_image(path: Path) -> str | None:
    """Cheap integrity check without decoding pixels: None if fine, else the reason.

    PIL's verify() walks the PNG chunk CRCs; for JPEG we check the end marker; other formats get a header
    check only, and the load-time guard in `ImageFolderDataset` catches the rest.
    """
    try:
        with Image.open(path) as im:
            fmt = im.format
            im.verify()
        if fmt == "JPEG" and _jpeg_truncated(path):
            return "truncated JPEG (no end-of-image marker)"
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ... on bad files
        return f"{type(e).__name__}: {e}"
    return None


def _verify_all(paths: list[Path], workers: int) -> list[str | None]:
    """verify_image over many files; threads overlap file I/O (large folders, network disks)."""
    if len(paths) < 64 or workers <= 1:
        return [verify_image(p) for p in paths]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(verify_image, paths, chunksize=32))


def _class_names(root: Path, paths: list[Path]) -> list[str] | None:
    """Sorted first-level subfolder names when every image lives in one; None (unlabelled) otherwise."""
    firsts = {p.relative_to(root).parts[0] if len(p.relative_to(root).parts) > 1 else None for p in paths}
    if None in firsts:
        if len(firsts) > 1:
            warnings.warn(
                f"{root}: images both at the top level and in subfolders; treating the folder as unlabelled",
                stacklevel=3,
            )
        return None
    return sorted(firsts)  # type: ignore[arg-type]


class ImageFolderDataset(ImageDataset):
    """Images found recursively under `root`, resized (shorter side) and cropped to `size`.

    Labels: when every image sits inside a first-level subfolder, `label` is the index of that subfolder
    in the sorted list `class_names` (classes come from the scan, so a corrupt file never shifts them);
    otherwise there are no labels (`num_classes` is None).

    Corrupt files: each file is checked cheaply at construction (`verify_image`); failures are warned
    about and listed in `.skipped`, or raise `CorruptImageError` when `strict`. A file that passes that
    check but fails to decode later is handled the same way at load time: strict raises, otherwise it is
    warned about, appended to `.skipped` (in that worker process) and the next file is returned instead.

    Sample keys: "image" (C, size, size) in [-1, 1], "label" (when labelled), "path" (str).
    """

    name = "folder"

    def __init__(
        self,
        root: str | os.PathLike,
        size: int,
        channels: int = 3,
        crop: CropMode = "center",
        random_flip: bool = False,
        strict: bool = False,
        seed: int | None = 0,
        verify: bool = True,
        verify_workers: int = 8,
    ) -> None:
        self.root = Path(root).expanduser()
        if not self.root.exists():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        if not self.root.is_dir():
            raise NotADirectoryError(f"not a folder: {self.root}")
        self.image_size = size
        self.channels = check_channels(channels)
        self.transform = ImageTransform(size=size, channels=channels, crop=crop, random_flip=random_flip)
        self.strict = strict
        self.seed = seed

        paths = scan_images(self.root)
        if not paths:
            raise ValueError(
                f"no images found in {self.root} (searched recursively for {', '.join(IMAGE_EXTENSIONS)}, "
                "any letter case)"
            )
        self.class_names = _class_names(self.root, paths)
        self.num_classes = len(self.class_names) if self.class_names is not None else None
        self.skipped: list[str] = []
        self.paths = self._drop_corrupt(paths, verify_workers) if verify else paths
        if not self.paths:
            raise ValueError(f"no readable images in {self.root}: all {len(paths)} files are corrupt")
        self._class_index = {c: i for i, c in enumerate(self.class_names or [])}

    def _drop_corrupt(self, paths: list[Path], workers: int) -> list[Path]:
        reasons = _verify_all(paths, workers)
        bad = [(p, r) for p, r in zip(paths, reasons) if r is not None]
        if bad and self.strict:
            p, r = bad[0]
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise CorruptImageError(f"corrupt image file {p}: {r}{more}")
        for p, r in bad:
            logger.info("skipping corrupt image %s: %s", p, r)
        if bad:
            listed = "; ".join(f"{p} ({r})" for p, r in bad[:5])
            more = f"; ... and {len(bad) - 5} more (see .skipped)" if len(bad) > 5 else ""
            warnings.warn(f"{self.root}: skipped {len(bad)} corrupt image file(s): {listed}{more}", stacklevel=3)
        self.skipped = [str(p) for p, _ in bad]
        return [p for p, r in zip(paths, reasons) if r is None]

    def __len__(self) -> int:
        return len(self.paths)

    def label_of(self, path: Path) -> int | None:
        """Class index of an image path (None when unlabelled)."""
        if self.class_names is None:
            return None
        return self._class_index[path.relative_to(self.root).parts[0]]

    def _decode(self, path: Path) -> Image.Image:
        try:
            with Image.open(path) as im:
                im.load()
                return im
        except Exception as e:  # truncated data, bad Huffman tables, ... only show up when decoding
            raise CorruptImageError(f"cannot decode image file {path}: {type(e).__name__}: {e}") from e

    def _get(self, index: int) -> Sample:
        for attempt in range(min(_LOAD_RETRIES, len(self.paths))):
            path = self.paths[(index + attempt) % len(self.paths)]
            try:
                img = self._decode(path)
            except CorruptImageError as e:
                if self.strict:
                    raise
                if str(path) not in self.skipped:
                    self.skipped.append(str(path))
                    warnings.warn(f"{e}; using the next image instead", stacklevel=3)
                continue
            sample: Sample = {"image": self.transform(img, self.sample_rng(index)), "path": str(path)}
            label = self.label_of(path)
            if label is not None:
                sample["label"] = label
            return sample
        raise CorruptImageError(f"{self.root}: {_LOAD_RETRIES} consecutive files from index {index} failed to decode")
