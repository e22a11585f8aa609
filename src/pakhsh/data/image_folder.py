"""A folder of images (recursive), with class labels from first-level subfolders, optional captions and
corrupt-file handling."""

from __future__ import annotations

import json
import logging
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

from PIL import Image

from pakhsh.data.base import ImageDataset, Sample, check_channels
from pakhsh.data.transforms import CropMode, ImageTransform

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_JPEG_EOI = b"\xff\xd9"
_JPEG_TAIL_BYTES = 64 * 1024  # some encoders/cameras append padding or metadata after the end marker
_LOAD_RETRIES = 16  # consecutive unreadable files tolerated before giving up on a __getitem__
# Images over this many pixels are refused before decoding: 64 MP of RGB is ~200 MB, and conversions and the
# resize multiply that, while PIL's own bomb check only starts at ~89 MP (warning) and ~179 MP (error).
MAX_PIXELS = 64_000_000
_JPEG_MAX_REDUCTION = 64  # JPEG DCT scaling (Image.draft) decodes at down to 1/8 per side
# Shorter side below this fraction of the target size: the upscaled result is mostly blur, so say so.
SMALL_IMAGE_FRACTION = 0.5
_GREY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F")
_LISTED = 5  # files named in a notice before "... and N more"
# Caption files at the folder root, one JSON object per line: {"file": "sub/a.png", "caption": "..."}; the keys of
# Hugging Face imagefolder metadata ({"file_name": ..., "text": ...}) work too. Read in this order.
CAPTION_FILES = ("captions.jsonl", "metadata.jsonl")
_FILE_KEYS = ("file", "file_name")  # the first one present is used
_TEXT_KEYS = ("caption", "text")


class CorruptImageError(ValueError):
    """An image file that cannot be read or decoded; the message names the file."""


class ImageTooLargeError(CorruptImageError):
    """An image with more pixels than pakhsh decodes (MAX_PIXELS); the message names the file and its size."""


class CaptionError(ValueError):
    """A caption that cannot be used (a bad .jsonl line, a file that is not UTF-8, ...); the message names the file
    and, for .jsonl files, the line."""


class ImageHeader(NamedTuple):
    """What the header of an image file says, read without decoding pixels; `problem` is None for a good file."""

    size: tuple[int, int] | None  # (width, height)
    mode: str | None
    problem: str | None

    @property
    def channels(self) -> int | None:
        """1 for grey modes (16-bit included), else 3: what the file holds, not what it will be read as."""
        return None if self.mode is None else 1 if self.mode in _GREY_MODES else 3


def _megapixels(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]} ({size[0] * size[1] / 1e6:.0f} MP)"


def too_large_message(path: Path, size: tuple[int, int]) -> str:
    limit = f"{MAX_PIXELS / 1e6:.0f} MP"
    return f"image {path} is {_megapixels(size)}, over the {limit} pakhsh decodes; downscale it first"


def _bomb_message(path: Path, error: Exception) -> str:
    """PIL refused the file at open time (its size is in PIL's message)."""
    return f"image {path} is too large to decode safely ({error}); downscale it first"


def open_image(path: str | os.PathLike, size: int | None = None) -> Image.Image:
    """Decode one image file, refusing decompression bombs before any pixel is decoded.

    A JPEG over MAX_PIXELS is decoded at a reduced scale (DCT scaling, never below `size` per side) when `size` is
    given; anything still over the limit raises ImageTooLargeError naming the file and its size.
    """
    p = Path(path)
    try:
        with warnings.catch_warnings():
            # PIL warns from ~89 MP; our own limit is lower and its message names the file
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(p)
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(_bomb_message(p, e)) from None
    with im:
        if im.width * im.height > MAX_PIXELS and size and im.format == "JPEG":
            im.draft(im.mode, (size, size))  # changes the decode scale only: no pixels are read yet
        if im.width * im.height > MAX_PIXELS:
            raise ImageTooLargeError(too_large_message(p, im.size))
        im.load()
        return im


def is_small(size: tuple[int, int], target: int) -> bool:
    """Whether an image of `size` would be upscaled a lot (shorter side < SMALL_IMAGE_FRACTION of `target`)."""
    return min(size) < SMALL_IMAGE_FRACTION * target


def listing(names: list[str], limit: int = _LISTED) -> str:
    """'a, b, c' or 'a, b, c, ... and 7 more': notices name files without flooding the terminal."""
    shown = ", ".join(names[:limit])
    return shown + (f", ... and {len(names) - limit} more" if len(names) > limit else "")


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


def clean_caption(text: str) -> str:
    """Surrounding whitespace stripped, lines joined with single spaces (blank lines dropped)."""
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _not_utf8(e: UnicodeDecodeError) -> str:
    return f"not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})"


def read_caption_txt(path: Path) -> str:
    """The caption in a `.txt` file beside an image: UTF-8 (a byte-order mark is allowed), see `clean_caption`."""
    try:
        return clean_caption(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise CaptionError(f"caption file {path}: {_not_utf8(e)}") from None


def sidecar_captions(paths: list[Path]) -> dict[Path, Path]:
    """image -> its caption file `NAME.txt` in the same folder (any letter case of `.txt`; `.txt` wins a tie).

    Each folder is listed once, so a large folder costs one directory read rather than a stat per image.
    """
    by_dir: dict[Path, dict[str, str]] = {}
    found: dict[Path, Path] = {}
    for p in paths:
        names = by_dir.get(p.parent)
        if names is None:
            names = {}
            try:
                entries = sorted(os.listdir(p.parent))
            except OSError:
                entries = []
            for f in entries:
                stem, ext = os.path.splitext(f)
                if ext.lower() == ".txt" and not f.startswith(".") and (stem not in names or ext == ".txt"):
                    names[stem] = f
            by_dir[p.parent] = names
        name = names.get(p.stem)
        if name is not None and (p.parent / name).is_file():
            found[p] = p.parent / name
    return found


class _Entry(NamedTuple):
    source: Path  # the .jsonl file
    line: int
    file: str  # as written in the line
    caption: str


def _jsonl_key(obj: dict, keys: tuple[str, ...]) -> str | None:
    return next((k for k in keys if k in obj), None)


def read_caption_jsonl(path: Path) -> list[_Entry] | None:
    """The entries of a captions .jsonl file; blank lines are skipped, anything else that is not a JSON object with
    a file key ("file" or "file_name") and a string caption ("caption" or "text") raises CaptionError naming the
    line. A `metadata.jsonl` in which no line has a caption key holds other metadata: None (no captions)."""
    objects: list[tuple[int, dict]] = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise CaptionError(f"{path} line {n}: {_not_utf8(e)}") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise CaptionError(f"{path} line {n}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise CaptionError(
                    f'{path} line {n}: expected a JSON object like {{"file": "a.png", "caption": "..."}}, '
                    f"got a JSON {type(obj).__name__}"
                )
            objects.append((n, obj))
    if path.name == "metadata.jsonl" and not any(_jsonl_key(o, _TEXT_KEYS) for _, o in objects):
        return None
    entries = []
    for n, obj in objects:
        fkey, tkey = _jsonl_key(obj, _FILE_KEYS), _jsonl_key(obj, _TEXT_KEYS)
        if fkey is None or tkey is None:
            missing = " and ".join(
                " or ".join(f'"{k}"' for k in keys) for key, keys in ((fkey, _FILE_KEYS), (tkey, _TEXT_KEYS))
                if key is None
            )
            raise CaptionError(f"{path} line {n}: no {missing} key (keys present: {', '.join(obj) or 'none'})")
        file, text = obj[fkey], obj[tkey]
        if not isinstance(file, str) or not file.strip():
            raise CaptionError(f'{path} line {n}: "{fkey}" must be a non-empty string (a path relative to the '
                               f"folder), got {json.dumps(file)}")
        if not isinstance(text, str):
            raise CaptionError(f'{path} line {n}: "{tkey}" must be a string, got {json.dumps(text)}')
        entries.append(_Entry(path, n, file, clean_caption(text)))
    return entries


def _jpeg_truncated(path: Path) -> bool:
    """A JPEG without an end-of-image marker near its end was cut short (verify() does not notice)."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        n = f.tell()
        f.seek(max(0, n - _JPEG_TAIL_BYTES))
        tail = f.read()
    return _JPEG_EOI not in tail


def inspect_image(path: Path) -> ImageHeader:
    """Cheap integrity check without decoding pixels: the header's size and mode, and the problem if any.

    PIL's verify() walks the PNG chunk CRCs; for JPEG we check the end marker; other formats get a header
    check only, and the load-time guard in `ImageFolderDataset` catches the rest. Images too large to decode
    (see MAX_PIXELS; JPEGs may be 64x larger, they decode at reduced scale) are a problem too.
    """
    try:
        with Image.open(path) as im:
            fmt, size, mode = im.format, im.size, im.mode
            im.verify()
    except Image.DecompressionBombError as e:
        return ImageHeader(None, None, f"too large to decode safely ({e})")
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ... on bad files
        return ImageHeader(None, None, f"{type(e).__name__}: {e}")
    limit = MAX_PIXELS * (_JPEG_MAX_REDUCTION if fmt == "JPEG" else 1)
    if size[0] * size[1] > limit:
        return ImageHeader(size, mode, f"{_megapixels(size)}: too large to decode (limit {MAX_PIXELS / 1e6:.0f} MP)")
    try:
        if fmt == "JPEG" and _jpeg_truncated(path):
            return ImageHeader(size, mode, "truncated JPEG (no end-of-image marker)")
    except OSError as e:
        return ImageHeader(size, mode, f"{type(e).__name__}: {e}")
    return ImageHeader(size, mode, None)


def verify_image(path: Path) -> str | None:
    """`inspect_image`'s problem: None if the file looks fine, else the reason."""
    return inspect_image(path).problem


def _inspect_all(paths: list[Path], workers: int) -> list[ImageHeader]:
    """inspect_image over many files; threads overlap file I/O (large folders, network disks)."""
    if len(paths) < 64 or workers <= 1:
        return [inspect_image(p) for p in paths]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(inspect_image, paths, chunksize=32))


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

    Images much smaller than `size` (see SMALL_IMAGE_FRACTION) are named in a warning: they are upscaled to
    blur. Images over MAX_PIXELS count as unreadable (large JPEGs are decoded at reduced scale instead).
    `headers` holds each kept file's ImageHeader (size, mode) when verified, else is empty.

    Captions (for text-to-image training): from `NAME.txt` beside `NAME.png` (UTF-8; lines joined with spaces), or
    from `captions.jsonl` / `metadata.jsonl` at the folder root, one {"file": "sub/a.png", "caption": "..."} per line
    ("file_name" and "text" work too, as in Hugging Face imagefolder metadata). A .jsonl entry wins over a .txt
    (a notice counts them). When any image has a caption, `has_captions` is True and every sample has "caption":
    images without one get "" (unconditional; a notice counts them). A bad .jsonl line raises CaptionError naming
    the file and line; an entry naming a file that is not an image of the folder raises too when `strict`, else it
    is ignored with a notice. `captions` holds each kept image's caption (aligned with `paths`), or None.

    Sample keys: "image" (C, size, size) in [-1, 1], "label" (when labelled), "caption" (str, when the folder has
    captions), "path" (str).
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
            raise NotADirectoryError(
                f"{self.root} is a file, not a folder: the image-folder dataset (data.path) takes a folder of images"
            )
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
        found = self._read_captions(paths)  # before verification: a bad caption file fails fast
        self.skipped: list[str] = []
        self.headers: list[ImageHeader] = []
        self.paths = self._drop_corrupt(paths, verify_workers) if verify else paths
        self._notice_small()
        if not self.paths:
            raise ValueError(f"no readable images in {self.root}: all {len(paths)} files are corrupt")
        self._class_index = {c: i for i, c in enumerate(self.class_names or [])}
        self.captions = self._fill_captions(found)
        self.has_captions = self.captions is not None

    def _read_captions(self, paths: list[Path]) -> dict[Path, str]:
        """image -> caption from the root's .jsonl files and the .txt files beside images (the .jsonl wins)."""
        index = {os.path.normpath(p): p for p in paths}
        from_jsonl: dict[Path, _Entry] = {}
        unknown: list[_Entry] = []
        for name in CAPTION_FILES:
            source = self.root / name
            if not source.is_file():
                continue
            entries = read_caption_jsonl(source)
            if entries is None:
                warnings.warn(f"{source}: no line has a \"text\" or \"caption\" key; it gives no captions",
                              stacklevel=3)
                continue
            for e in entries:
                image = index.get(os.path.normpath(self.root / e.file))
                if image is None:
                    unknown.append(e)
                    continue
                first = from_jsonl.get(image)
                if first is not None and first.caption != e.caption:
                    where = f"line {first.line}" if first.source == e.source else f"{first.source} line {first.line}"
                    raise CaptionError(f"{e.source} line {e.line}: a second, different caption for {e.file} "
                                       f"(the first is at {where}); give one caption per image")
                from_jsonl.setdefault(image, e)
        if unknown:
            what = f"not an image in {self.root} (looked for {', '.join(IMAGE_EXTENSIONS)}, hidden files skipped)"
            if self.strict:
                e = unknown[0]
                more = f" (and {len(unknown) - 1} more entries name no image)" if len(unknown) > 1 else ""
                raise CaptionError(f"{e.source} line {e.line}: {e.file!r} is {what}{more}")
            named = [f"{e.source.name} line {e.line} ({e.file})" for e in unknown]
            warnings.warn(f"ignoring {len(unknown)} caption entr{'y' if len(unknown) == 1 else 'ies'} naming "
                          f"files that are not images in {self.root}: {listing(named)}", stacklevel=3)
        sidecars = sidecar_captions(paths)
        both = [p for p in paths if p in from_jsonl and p in sidecars]
        if both:
            sources = " / ".join(sorted({from_jsonl[p].source.name for p in both}))
            warnings.warn(f"{self.root}: {len(both)} image(s) have both a .txt caption and an entry in {sources}; "
                          f"the {sources} caption is used: {listing([str(p.relative_to(self.root)) for p in both])}",
                          stacklevel=3)
        captions = {p: e.caption for p, e in from_jsonl.items()}
        for p, txt in sidecars.items():
            if p not in captions:
                captions[p] = read_caption_txt(txt)
        return captions

    def _fill_captions(self, found: dict[Path, str]) -> list[str] | None:
        """Each kept image's caption ("" where it has none, with a notice), or None when none has a caption."""
        captions = [found.get(p) for p in self.paths]
        lacking = [str(p.relative_to(self.root)) for p, c in zip(self.paths, captions) if c is None]
        if len(lacking) == len(captions):
            return None
        if lacking:
            warnings.warn(f"{self.root}: {len(lacking)} of {len(captions)} image(s) have no caption (no .txt beside "
                          f"them, no .jsonl entry); they train with the empty caption \"\" (unconditional): "
                          f"{listing(lacking)}", stacklevel=3)
        return [c if c is not None else "" for c in captions]

    def _drop_corrupt(self, paths: list[Path], workers: int) -> list[Path]:
        headers = _inspect_all(paths, workers)
        reasons = [h.problem for h in headers]
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
        self.headers = [h for h in headers if h.problem is None]
        return [p for p, r in zip(paths, reasons) if r is None]

    def _notice_small(self) -> None:
        """Warn once, naming them, about images that will be upscaled far beyond their own size."""
        small = [f"{p.relative_to(self.root)} ({h.size[0]}x{h.size[1]})"
                 for p, h in zip(self.paths, self.headers) if h.size is not None and is_small(h.size, self.image_size)]
        if small:
            warnings.warn(
                f"{self.root}: {len(small)} image(s) smaller than half of {self.image_size}x{self.image_size} "
                f"will be upscaled (blurry): {listing(small)}", stacklevel=3,
            )

    def __len__(self) -> int:
        return len(self.paths)

    def label_of(self, path: Path) -> int | None:
        """Class index of an image path (None when unlabelled)."""
        if self.class_names is None:
            return None
        return self._class_index[path.relative_to(self.root).parts[0]]

    def _decode(self, path: Path) -> Image.Image:
        try:
            return open_image(path, self.image_size)
        except ImageTooLargeError:
            raise
        except Exception as e:  # truncated data, bad Huffman tables, ... only show up when decoding
            raise CorruptImageError(f"cannot decode image file {path}: {type(e).__name__}: {e}") from e

    def _get(self, index: int) -> Sample:
        for attempt in range(min(_LOAD_RETRIES, len(self.paths))):
            i = (index + attempt) % len(self.paths)
            path = self.paths[i]
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
            if self.captions is not None:
                sample["caption"] = self.captions[i]
            return sample
        raise CorruptImageError(f"{self.root}: {_LOAD_RETRIES} consecutive files from index {index} failed to decode")
