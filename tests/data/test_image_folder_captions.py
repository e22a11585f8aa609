"""ImageFolderDataset captions: .txt beside images, captions.jsonl / metadata.jsonl, precedence, missing captions,
bad .jsonl lines, captions with labels, and folders without captions left exactly as they were."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from pakhsh.data import DataConfig, build_dataset
from pakhsh.data.image_folder import CaptionError, ImageFolderDataset
from tests.conftest import noise


def image(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return noise(path, (12, 12), seed)


def jsonl(path: Path, *rows: object) -> Path:
    """Rows are dicts (written as JSON) or raw strings (written as they are)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def by_name(ds: ImageFolderDataset) -> dict[str, dict]:
    return {Path(s["path"]).name: s for s in (ds[i] for i in range(len(ds)))}


def quiet(*args, **kwargs) -> ImageFolderDataset:
    """Build the dataset, failing on any notice."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return ImageFolderDataset(*args, **kwargs)


def test_txt_beside_each_image(tmp_path):
    image(tmp_path / "a.png")
    image(tmp_path / "b.jpg", 1)
    (tmp_path / "a.txt").write_text("  a red circle\n\non grey \n", encoding="utf-8")
    (tmp_path / "b.TXT").write_text("a blue square", encoding="utf-8")
    ds = quiet(tmp_path, size=8)
    assert len(ds) == 2 and ds.has_captions  # .txt files are captions, never images
    samples = by_name(ds)
    assert samples["a.png"]["caption"] == "a red circle on grey"  # stripped, lines joined with spaces
    assert samples["b.jpg"]["caption"] == "a blue square"  # .TXT: any letter case
    assert set(samples["a.png"]) == {"image", "path", "caption"}
    assert ds.captions == ["a red circle on grey", "a blue square"]


@pytest.mark.parametrize("name, file_key, text_key", [
    ("captions.jsonl", "file", "caption"),
    ("captions.jsonl", "file_name", "text"),
    ("metadata.jsonl", "file_name", "text"),  # Hugging Face imagefolder metadata
])  # fmt: skip
def test_jsonl_at_the_root(tmp_path, name, file_key, text_key):
    image(tmp_path / "top.png")
    image(tmp_path / "sub" / "deep" / "x.png", 1)
    jsonl(tmp_path / name,
          {file_key: "sub/deep/x.png", text_key: "deep\nimage", "score": 3},
          "",  # blank lines are skipped
          {file_key: "./top.png", text_key: "top image"})  # fmt: skip
    with pytest.warns(UserWarning, match="images both at the top level and in subfolders") as record:
        ds = ImageFolderDataset(tmp_path, size=8)
    assert len(record) == 1 and ds.num_classes is None  # the folder's own notice, and no caption notice
    samples = by_name(ds)
    assert samples["x.png"]["caption"] == "deep image" and samples["top.png"]["caption"] == "top image"


def test_jsonl_wins_over_txt_with_a_notice(tmp_path):
    for i, n in enumerate("abc"):
        image(tmp_path / f"{n}.png", i)
        (tmp_path / f"{n}.txt").write_text(f"txt {n}", encoding="utf-8")
    jsonl(tmp_path / "captions.jsonl", {"file": "a.png", "caption": "jsonl a"}, {"file": "b.png", "caption": "jsonl b"})
    with pytest.warns(UserWarning, match=r"2 image\(s\) have both a \.txt caption and an entry in captions\.jsonl; "
                                         r"the captions\.jsonl caption is used: a\.png, b\.png") as record:
        ds = ImageFolderDataset(tmp_path, size=8)
    assert len(record) == 1
    assert [s["caption"] for s in by_name(ds).values()] == ["jsonl a", "jsonl b", "txt c"]


def test_missing_captions_are_empty_with_one_notice(tmp_path):
    for i, n in enumerate("abcd"):
        image(tmp_path / f"{n}.png", i)
    (tmp_path / "a.txt").write_text("only a", encoding="utf-8")
    jsonl(tmp_path / "captions.jsonl", {"file": "b.png", "caption": ""})  # an explicit empty caption is a caption
    with pytest.warns(UserWarning, match=r'2 of 4 image\(s\) have no caption.*empty caption "".*: c\.png, d\.png'
                      ) as record:
        ds = ImageFolderDataset(tmp_path, size=8)
    assert len(record) == 1 and "\n" not in str(record[0].message)
    assert ds.has_captions and ds.captions == ["only a", "", "", ""]
    assert all(isinstance(ds[i]["caption"], str) for i in range(4))
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["caption"] == ["only a", "", "", ""] and batch["image"].shape == (4, 3, 8, 8)


@pytest.mark.parametrize("line, message", [
    ("{not json", r"line 2: not valid JSON"),
    ('["a.png", "x"]', r"line 2: expected a JSON object .* got a JSON list"),
    ('{"caption": "no file"}', r'line 2: no "file" or "file_name" key \(keys present: caption\)'),
    ('{"file": "a.png"}', r'line 2: no "caption" or "text" key'),
    ('{"path": "a.png", "prompt": "x"}', r'line 2: no "file" or "file_name" and "caption" or "text" key'),
    ('{"file": "a.png", "caption": null}', r'line 2: "caption" must be a string, got null'),
    ('{"file": 3, "caption": "x"}', r'line 2: "file" must be a non-empty string'),
])  # fmt: skip
def test_bad_jsonl_lines_name_file_and_line(tmp_path, line, message):
    image(tmp_path / "a.png")
    image(tmp_path / "b.png", 1)
    path = jsonl(tmp_path / "captions.jsonl", {"file": "b.png", "caption": "fine"}, line)
    with pytest.raises(CaptionError, match=rf"{path} {message}") as info:
        ImageFolderDataset(tmp_path, size=8)
    assert "\n" not in str(info.value)
    with pytest.raises(CaptionError, match=message):  # a bad line is an error whether or not strict
        ImageFolderDataset(tmp_path, size=8, strict=True)


def test_jsonl_not_utf8_and_conflicting_duplicates(tmp_path):
    image(tmp_path / "a.png")
    bad = b'{"file": "a.png", "caption": "ok"}\n{"file": "a.png", "caption": "\xff"}\n'
    (tmp_path / "captions.jsonl").write_bytes(bad)
    with pytest.raises(CaptionError, match=r"captions\.jsonl line 2: not UTF-8 text \(byte 0xff"):
        ImageFolderDataset(tmp_path, size=8)
    jsonl(tmp_path / "captions.jsonl", {"file": "a.png", "caption": "one"}, {"file": "a.png", "caption": "one"},
          {"file": "a.png", "caption": "two"})
    with pytest.raises(CaptionError, match=r"captions\.jsonl line 3: a second, different caption for a\.png "
                                           r"\(the first is at line 1\)"):
        ImageFolderDataset(tmp_path, size=8)
    jsonl(tmp_path / "captions.jsonl", {"file": "a.png", "caption": "one"}, {"file": "a.png", "caption": "one"})
    assert quiet(tmp_path, size=8)[0]["caption"] == "one"  # repeating the same caption is harmless


def test_entries_naming_missing_files(tmp_path):
    image(tmp_path / "a.png")
    (tmp_path / "notes.gif").write_bytes(b"GIF89a")  # not an image extension pakhsh reads
    path = jsonl(tmp_path / "captions.jsonl",
                 {"file": "a.png", "caption": "here"},
                 {"file": "gone.png", "caption": "deleted"},
                 {"file": "notes.gif", "caption": "wrong kind"},
                 {"file": "A.PNG", "caption": "wrong case"})  # fmt: skip
    with pytest.raises(CaptionError, match=rf"{path} line 2: 'gone\.png' is not an image in .*"
                                           r"\(and 2 more entries name no image\)$"):
        ImageFolderDataset(tmp_path, size=8, strict=True)
    with pytest.warns(UserWarning, match=r"ignoring 3 caption entries naming files that are not images in .*: "
                                         r"captions\.jsonl line 2 \(gone\.png\), captions\.jsonl line 3"):
        ds = ImageFolderDataset(tmp_path, size=8)
    assert len(ds) == 1 and ds[0]["caption"] == "here"


def test_captions_with_labels(tmp_path):
    image(tmp_path / "dog" / "a.png")
    image(tmp_path / "dog" / "b.png", 1)
    image(tmp_path / "cat" / "c.png", 2)
    (tmp_path / "dog" / "a.txt").write_text("a dog", encoding="utf-8")
    jsonl(tmp_path / "captions.jsonl", {"file": "cat/c.png", "caption": "a cat"},
          {"file": "dog/b.png", "caption": "another dog"})  # fmt: skip
    ds = quiet(tmp_path, size=8)
    assert ds.class_names == ["cat", "dog"] and ds.has_captions  # captions.jsonl at the root does not unlabel
    samples = by_name(ds)
    assert (samples["a.png"]["label"], samples["a.png"]["caption"]) == (1, "a dog")
    assert (samples["b.png"]["label"], samples["b.png"]["caption"]) == (1, "another dog")
    assert (samples["c.png"]["label"], samples["c.png"]["caption"]) == (0, "a cat")
    assert set(samples["c.png"]) == {"image", "path", "label", "caption"}


def test_folder_without_captions_is_unchanged(tmp_path):
    image(tmp_path / "dog" / "a.png")
    image(tmp_path / "cat" / "b.png", 1)
    (tmp_path / "cat" / "notes.txt").write_text("about cats, beside no image of that name", encoding="utf-8")
    jsonl(tmp_path / "other.jsonl", {"file": "cat/b.png", "caption": "not a caption file name"})
    ds = quiet(tmp_path, size=8)
    assert not ds.has_captions and ds.captions is None and len(ds) == 2
    for i in range(2):
        assert set(ds[i]) == {"image", "path", "label"}
    flat = tmp_path / "flat"
    image(flat / "x.png")
    assert set(quiet(flat, size=8)[0]) == {"image", "path"}
    assert not quiet(flat, size=8).has_captions


def test_metadata_jsonl_without_captions_gives_none(tmp_path):
    image(tmp_path / "a.png")
    jsonl(tmp_path / "metadata.jsonl", {"file_name": "a.png", "label": 3})
    with pytest.warns(UserWarning, match=r"metadata\.jsonl: no line has a \"text\" or \"caption\" key"):
        ds = ImageFolderDataset(tmp_path, size=8)
    assert not ds.has_captions and "caption" not in ds[0]


def test_unicode_captions(tmp_path):
    image(tmp_path / "a.png")
    image(tmp_path / "b.png", 1)
    image(tmp_path / "گربه.png", 2)
    (tmp_path / "a.txt").write_bytes("\ufeffگربه‌ای سیاه\r\nروی دیوار 🐈".encode())  # BOM, CRLF, ZWNJ, emoji
    jsonl(tmp_path / "captions.jsonl", {"file": "گربه.png", "caption": "café naïve 日本語"},
          '{"file": "b.png", "caption": "\\u00e9t\\u00e9"}')  # fmt: skip
    ds = quiet(tmp_path, size=8)
    samples = by_name(ds)
    assert samples["a.png"]["caption"] == "گربه‌ای سیاه روی دیوار 🐈"
    assert samples["b.png"]["caption"] == "été"
    assert samples["گربه.png"]["caption"] == "café naïve 日本語"
    (tmp_path / "a.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(CaptionError, match=rf"caption file {tmp_path / 'a.txt'}: not UTF-8 text \(byte 0xe9"):
        ImageFolderDataset(tmp_path, size=8)


def test_caption_follows_the_image_actually_loaded(tmp_path):
    image(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    image(tmp_path / "c.png", 1)
    for n in "abc":
        (tmp_path / f"{n}.txt").write_text(f"caption {n}", encoding="utf-8")
    ds = ImageFolderDataset(tmp_path, size=8, verify=False)
    with pytest.warns(UserWarning, match="b.png"):
        sample = ds[1]
    assert sample["path"].endswith("c.png") and sample["caption"] == "caption c"
    with pytest.warns(UserWarning, match="skipped 1 corrupt"):
        verified = ImageFolderDataset(tmp_path, size=8)
    assert verified.captions == ["caption a", "caption c"]


def test_build_dataset_folder_with_captions(tmp_path):
    image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("hello", encoding="utf-8")
    ds = build_dataset(DataConfig(name="folder", path=str(tmp_path), image_size=8))
    assert ds.has_captions and ds[0]["caption"] == "hello"
    assert isinstance(ds[0]["image"], torch.Tensor)
