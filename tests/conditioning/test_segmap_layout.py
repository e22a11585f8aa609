"""Semantic maps (one_hot_map, PALETTE PNGs, class-id PNGs) and layouts (JSON files, shapes boxes) as conditions."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import default_collate

from pakhsh.conditioning.layout import batch_layout, layout_from_sample, read_layout, write_layout
from pakhsh.conditioning.segmap import COLOR_TOLERANCE, PALETTE, one_hot_map, read_segmap, save_segmap
from pakhsh.data.builtin.shapes import MAX_OBJECTS, SHAPES, ShapesDataset
from pakhsh.nets.unet import UNet, UNetConfig

SIZE = 32
NUM_SEG = len(SHAPES) + 1  # background + one class per shape


@pytest.fixture(scope="module")
def data() -> ShapesDataset:
    return ShapesDataset(size=SIZE, length=16, seed=3)


def two_object_sample(data: ShapesDataset) -> dict:
    for i in range(len(data)):
        s = data[i]
        if s["num_objects"] == 2 and len(s["segmentation"].unique()) == 3:
            return s
    raise AssertionError("no two-object scene in the first 16")


# --- one_hot_map ------------------------------------------------------------------------------------------
def test_one_hot_map_known_values() -> None:
    seg = torch.tensor([[[0, 0, 1, 1],
                         [0, 2, 1, 1],
                         [2, 2, 0, 1],
                         [2, 2, 1, 1]]])  # fmt: skip
    out = one_hot_map(seg, 3, (2, 2))
    assert out.shape == (1, 3, 2, 2) and out.dtype == torch.float32
    expected = torch.tensor([[[0.75, 0.0], [0.0, 0.25]],   # class 0
                             [[0.0, 1.0], [0.0, 0.75]],    # class 1
                             [[0.25, 0.0], [1.0, 0.0]]])   # class 2  # fmt: skip
    torch.testing.assert_close(out[0], expected)
    full = one_hot_map(seg, 3, 4)  # same size: the plain one-hot
    assert torch.equal(full.argmax(1), seg) and torch.equal(full.sum(1), torch.ones(1, 4, 4))


def test_one_hot_map_of_shapes_sums_to_one(data: ShapesDataset) -> None:
    seg = torch.stack([data[i]["segmentation"] for i in range(4)])  # (4, 32, 32)
    for size in [(8, 8), (4, 4), (5, 7)]:
        out = one_hot_map(seg, NUM_SEG, size)
        assert out.shape == (4, NUM_SEG, *size)
        torch.testing.assert_close(out.sum(1), torch.ones(4, *size))
        assert (out >= 0).all()
    # the fraction of each class over the whole image survives exact area averaging
    out = one_hot_map(seg, NUM_SEG, 8)
    frac = torch.stack([(seg == k).float().mean((1, 2)) for k in range(NUM_SEG)], 1)
    torch.testing.assert_close(out.mean((2, 3)), frac)


@pytest.mark.parametrize(
    "seg, classes, size, match",
    [
        (torch.tensor([[[0, 3]]]), 3, 1, r"segmentation holds class 3, outside \[0, 2\]"),
        (torch.tensor([[[0, -1]]]), 3, 1, "holds class -1"),
        (torch.zeros(1, 2, 2), 3, 1, r"integer class ids of shape \(B, H, W\), got torch.float32"),
        (torch.zeros(2, 2, dtype=torch.long), 3, 1, r"\(B, H, W\), got torch.int64 \(2, 2\)"),
        (torch.zeros(1, 2, 2, dtype=torch.long), 0, 1, "num_classes must be an integer >= 1"),
        (torch.zeros(1, 2, 2, dtype=torch.long), 3, (0, 2), r"size must be a positive int or \(h, w\)"),
    ],
)
def test_one_hot_map_refuses_bad_input(seg, classes, size, match) -> None:
    with pytest.raises(ValueError, match=match):
        one_hot_map(seg, classes, size)


# --- segmentation PNGs ------------------------------------------------------------------------------------
def test_palette_is_distinct_with_black_background() -> None:
    assert PALETTE[0] == (0, 0, 0) and len(PALETTE) == len(set(PALETTE)) == 64
    gap = min(max(abs(a - b) for a, b in zip(p, q)) for p, q in itertools.combinations(PALETTE, 2))
    assert gap > 2 * COLOR_TOLERANCE  # every colour within tolerance has one nearest class


def test_colour_round_trip(data: ShapesDataset, tmp_path) -> None:
    seg = two_object_sample(data)["segmentation"]
    path = save_segmap(tmp_path / "seg.png", seg)
    img = Image.open(path)
    assert img.mode == "RGB" and img.size == (SIZE, SIZE)
    assert tuple(np.asarray(img)[0, 0]) in PALETTE
    back = read_segmap(path, NUM_SEG, SIZE)
    assert back.dtype == torch.int64 and torch.equal(back, seg)


def test_grayscale_and_palette_mode_round_trip(data: ShapesDataset, tmp_path) -> None:
    seg = two_object_sample(data)["segmentation"]
    path = save_segmap(tmp_path / "ids.png", seg, ids=True)
    assert Image.open(path).mode == "L"
    assert torch.equal(read_segmap(path, NUM_SEG, SIZE), seg)
    # an indexed ('P') PNG: the indices are the ids, whatever colours its palette gives them
    p_img = Image.fromarray(seg.numpy().astype(np.uint8), mode="L").convert("P")
    p_img.putpalette([255 - v for v in range(256)] * 3)
    p_img.save(tmp_path / "indexed.png")
    assert Image.open(tmp_path / "indexed.png").mode == "P"
    assert torch.equal(read_segmap(tmp_path / "indexed.png", NUM_SEG, SIZE), seg)


def test_colours_near_the_palette_are_accepted(data: ShapesDataset, tmp_path) -> None:
    seg = two_object_sample(data)["segmentation"]
    rgb = np.asarray(PALETTE, dtype=np.int64)[seg.numpy()]
    noise = np.random.default_rng(0).integers(-COLOR_TOLERANCE, COLOR_TOLERANCE + 1, rgb.shape)
    Image.fromarray(np.clip(rgb + noise, 0, 255).astype(np.uint8)).save(tmp_path / "noisy.png")
    assert torch.equal(read_segmap(tmp_path / "noisy.png", NUM_SEG, SIZE), seg)


def test_resize_is_nearest(data: ShapesDataset, tmp_path) -> None:
    seg = two_object_sample(data)["segmentation"]
    path = save_segmap(tmp_path / "seg.png", seg)
    assert torch.equal(read_segmap(path, NUM_SEG, 16), seg[1::2, 1::2])
    assert torch.equal(read_segmap(path, NUM_SEG, 64), seg.repeat_interleave(2, 0).repeat_interleave(2, 1))
    assert read_segmap(path, NUM_SEG).shape == (SIZE, SIZE)  # size=None keeps the file's size
    save_segmap(tmp_path / "wide.png", torch.zeros(8, 16, dtype=torch.long))
    with pytest.warns(UserWarning, match=r"is 16x8: stretched to 8x8"):
        assert read_segmap(tmp_path / "wide.png", NUM_SEG, 8).shape == (8, 8)


def test_off_palette_colour_names_file_colour_and_count(tmp_path) -> None:
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    rgb[0, :3] = (128, 30, 200)
    Image.fromarray(rgb).save(tmp_path / "bad.png")
    with pytest.raises(ValueError, match=r"bad\.png: 3 pixel\(s\) in 1 colour\(s\) are not palette colours, e\.g\. "
                                         r"\(128, 30, 200\) \(3 pixels\)") as info:
        read_segmap(tmp_path / "bad.png", NUM_SEG, 4)
    assert "\n" not in str(info.value)


def test_colour_of_a_class_past_num_classes(tmp_path) -> None:
    save_segmap(tmp_path / "many.png", torch.tensor([[0, 9], [1, 2]]))
    with pytest.raises(ValueError, match=r"many\.png: 1 pixel\(s\) have the colour of class 9 .*outside \[0, 6\]"):
        read_segmap(tmp_path / "many.png", NUM_SEG, 2)


def test_grayscale_ids_out_of_range(tmp_path) -> None:
    save_segmap(tmp_path / "ids.png", torch.tensor([[0, 7], [200, 1]]), ids=True)
    with pytest.raises(ValueError, match=r"ids\.png: grayscale class ids must be in \[0, 6\].*2 pixel\(s\).*200"):
        read_segmap(tmp_path / "ids.png", NUM_SEG, 2)


def test_not_an_image_and_missing_file(tmp_path) -> None:
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match=r"cannot read image .*notes\.png") as info:
        read_segmap(tmp_path / "notes.png", NUM_SEG, 8)
    assert "\n" not in str(info.value)
    with pytest.raises(FileNotFoundError, match=r"image not found: .*absent\.png"):
        read_segmap(tmp_path / "absent.png", NUM_SEG, 8)


def test_save_segmap_refuses_classes_without_a_colour(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"class 64; the colour palette has classes 0\.\.63"):
        save_segmap(tmp_path / "x.png", torch.tensor([[0, 64]]))
    with pytest.raises(ValueError, match=r"integer class ids of shape \(H, W\)"):
        save_segmap(tmp_path / "x.png", torch.zeros(1, 2, 2, dtype=torch.long))


# --- layouts ------------------------------------------------------------------------------------------------
def write_json(path, obj) -> str:
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(path)


def test_read_write_layout_round_trip(tmp_path) -> None:
    boxes = torch.tensor([[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 0.0, 0.0], [0.4, 0.3, 1.0, 0.9]])
    labels = torch.tensor([3, -1, 0])  # the -1 row is padding: not written
    path = write_layout(tmp_path / "sub" / "layout.json", boxes, labels, SHAPES)
    entries = json.loads(path.read_text())
    assert [e["label"] for e in entries] == ["star", "circle"]
    got_boxes, got_labels = read_layout(path, SHAPES, SIZE)
    assert got_boxes.dtype == torch.float32 and got_labels.dtype == torch.int64
    torch.testing.assert_close(got_boxes, boxes[[0, 2]])
    assert torch.equal(got_labels, torch.tensor([3, 0]))


def test_pixel_coordinates_and_integer_labels(tmp_path) -> None:
    path = write_json(tmp_path / "px.json", [{"label": 1, "box": [8, 4, 24, 16.5]},
                                              {"label": "cross", "box": [0, 0, 1, 1], "note": "ignored"}])
    boxes, labels = read_layout(path, SHAPES, SIZE)
    torch.testing.assert_close(boxes, torch.tensor([[0.25, 0.125, 0.75, 16.5 / 32], [0, 0, 1 / 32, 1 / 32]]))
    assert labels.tolist() == [1, 5]


def test_empty_layout(tmp_path) -> None:
    boxes, labels = read_layout(write_json(tmp_path / "e.json", []), SHAPES, SIZE)
    assert boxes.shape == (0, 4) and labels.shape == (0,)


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", r"bad\.json: not JSON \(.* at line 1 column 2\)"),
        ({"label": "circle", "box": [0, 0, 1, 1]}, r"bad\.json: expected a JSON list .* got a JSON dict"),
        (["circle"], r"bad\.json: entry 0: expected an object"),
        ([{"label": "circle", "box": [0, 0, 0.5, 0.5]}, {"box": [0, 0, 1, 1]}], r"entry 1: missing key 'label'"),
        ([{"label": "circle"}], r"entry 0: missing key 'box'"),
        ([{"label": "hexagon", "box": [0, 0, 1, 1]}],
         r"entry 0: unknown label 'hexagon'; known labels: circle, square, triangle, star, diamond, cross"),
        ([{"label": 6, "box": [0, 0, 1, 1]}], r"entry 0: label index 6 outside \[0, 5\]"),
        ([{"label": True, "box": [0, 0, 1, 1]}], r"entry 0: label must be a class name or an integer"),
        ([{"label": "star", "box": [0, 0, 1]}], r"entry 0: box must be 4 finite numbers .* got \[0, 0, 1\]"),
        ([{"label": "star", "box": [0, 0, "1", 1]}], r"entry 0: box must be 4 finite numbers"),
        ("[{\"label\": \"star\", \"box\": [0, 0, NaN, 1]}]", r"entry 0: box must be 4 finite numbers"),
        ([{"label": "star", "box": [0.5, 0, 0.5, 1]}], r"entry 0: box .* is empty \(x1 <= x0\)"),
        ([{"label": "star", "box": [0, 0.6, 1, 0.2]}], r"entry 0: box .* is empty \(y1 <= y0\)"),
        ([{"label": "star", "box": [-0.1, 0, 0.5, 1]}], r"entry 0: box .* is outside \[0, 1\] \(fractions"),
        ([{"label": "star", "box": [0, 0, 8, 8]}, {"label": "star", "box": [0, 0, 40, 8]}],
         r"entry 1: box .* is outside \[0, 32\] \(pixels of a 32x32 image\)"),
        ([{"label": "star", "box": [0, 0, 1, 1]}] * 9, r"bad\.json: 9 objects, more than the 8 the model takes"),
    ],
)
def test_read_layout_errors_name_file_and_entry(tmp_path, content, match) -> None:
    path = write_json(tmp_path / "bad.json", content)
    with pytest.raises(ValueError, match=match) as info:
        read_layout(path, SHAPES, SIZE)
    assert "\n" not in str(info.value)


def test_read_layout_missing_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"layout file not found: .*nope\.json"):
        read_layout(tmp_path / "nope.json", SHAPES, SIZE)


def test_layout_from_sample(data: ShapesDataset) -> None:
    for i in range(6):
        s = data[i]
        boxes, labels = layout_from_sample(s, SIZE)
        assert boxes.shape == (MAX_OBJECTS, 4) and labels.shape == (MAX_OBJECTS,)
        n = s["num_objects"]
        torch.testing.assert_close(boxes[:n], s["boxes"][:n] / SIZE)
        assert torch.equal(labels[:n], s["objects"][:n, 0]) and (labels[n:] == -1).all()
        assert (boxes[n:] == 0).all() and boxes.min() >= 0 and boxes.max() <= 1
        padded_boxes, padded_labels = layout_from_sample(s, SIZE, max_objects=5)
        assert padded_boxes.shape == (5, 4) and (padded_labels[n:] == -1).all()
        torch.testing.assert_close(padded_boxes[:n], boxes[:n])
    with pytest.raises(ValueError, match="sample has no 'boxes'"):
        layout_from_sample({"objects": s["objects"]}, SIZE)


def test_batch_layout_on_a_collated_batch(data: ShapesDataset) -> None:
    batch = default_collate([data[i] for i in range(8)])
    boxes, labels = batch_layout(batch["boxes"], batch["objects"], SIZE)
    assert boxes.shape == (8, MAX_OBJECTS, 4) and labels.shape == (8, MAX_OBJECTS)
    assert torch.equal(labels, batch["objects"][..., 0])
    present = labels >= 0
    assert torch.equal(present.sum(1), batch["num_objects"])
    assert boxes.min() >= 0 and boxes.max() <= 1 and (boxes[~present] == 0).all()
    torch.testing.assert_close(boxes[present], batch["boxes"][present] / SIZE)
    for b in range(8):
        single = layout_from_sample(data[b], SIZE)
        assert torch.equal(single[0], boxes[b]) and torch.equal(single[1], labels[b])
    with pytest.raises(ValueError, match=r"objects must be \(B, M, A\)"):
        batch_layout(batch["boxes"], batch["objects"][:, :1], SIZE)


def test_shapes_conditions_feed_a_unet(data: ShapesDataset) -> None:
    """A semantic-map UNet (one-hot channels stacked on x) that also reads the layout, on a real batch."""
    batch = default_collate([data[i] for i in range(2)])
    cfg = UNetConfig(image_size=16, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                     attention_resolutions=(8,), dropout=0.0, num_heads=2, cond_channels=NUM_SEG, context_dim=16,
                     layout_classes=len(SHAPES), layout_max_objects=MAX_OBJECTS)
    torch.manual_seed(0)
    net = UNet(cfg).eval()
    seg = one_hot_map(batch["segmentation"], NUM_SEG, 16)  # the "latent" grid: 16x16 here
    boxes, labels = batch_layout(batch["boxes"], batch["objects"], SIZE)
    with torch.no_grad():
        out = net(torch.randn(2, 3, 16, 16), torch.tensor([10, 500]), concat=seg, boxes=boxes, box_labels=labels)
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()
