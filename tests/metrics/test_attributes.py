"""Shapes attribute classifier: caption parsing, the shipped net's accuracy, the metric, held-out prompts, loading."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from pakhsh.data.builtin.shapes import ShapesDataset, caption
from pakhsh.metrics.attributes import (
    ATTRIBUTES,
    CHANCE,
    NUM_CLASSES,
    SHIPPED_DIR,
    AttributeNet,
    AttributeNetConfig,
    attribute_accuracy,
    caption_for,
    heldout_prompts,
    load_attribute_net,
    one_object_indices,
    parse_caption,
    render_one_object,
    save_attribute_net,
    scene_attributes,
)
from pakhsh.metrics.weights import WeightsMismatchError, WeightsNotFoundError

N_EVAL = 200


@pytest.fixture(scope="module")
def shipped() -> AttributeNet:
    torch.set_num_threads(1)
    return load_attribute_net()


@pytest.fixture(scope="module")
def real_64() -> tuple[torch.Tensor, list[dict[str, int]]]:
    images, targets = render_one_object("test", N_EVAL, image_size=64)
    return images.float() / 127.5 - 1.0, [dict(zip(ATTRIBUTES, row.tolist())) for row in targets]


# --- captions ---------------------------------------------------------------------------------------------------


def test_parse_caption_inverts_shapes_caption_on_many_scenes():
    for split in ("train", "test"):
        ds = ShapesDataset(split=split, size=64, length=600)
        seen = 0
        for i in range(len(ds)):
            scene = ds.scene(i)
            if len(scene.objects) != 1:
                continue
            text = caption(scene)
            attrs = parse_caption(text)
            assert attrs == scene_attributes(scene)
            assert caption_for(attrs) == text
            seen += 1
        assert seen > 250


def test_parse_caption_examples_and_forgiven_forms():
    a = parse_caption("a large red circle at the top left on a gray background")
    assert a == {"shape": 0, "color": 0, "size": 1, "position": 0, "background": 8}
    b = parse_caption("a small blue cross in the center on an orange background")
    assert b == {"shape": 5, "color": 2, "size": 0, "position": 4, "background": 5}
    assert caption_for(b).endswith("on an orange background")
    assert parse_caption("  A Small  blue cross in the center on an orange background. ") == b


@pytest.mark.parametrize(
    "text",
    [
        "a large red circle at the top left and a small blue square on a gray background",  # two objects
        "a large red circle at the top left",  # no background
        "a huge red circle at the top left on a gray background",  # unknown size
        "a large red hexagon at the top left on a gray background",  # unknown shape
        "a large red circle in the middle on a gray background",  # unknown position phrase
        "a large red circle at the top left on a red background",  # object colour = background colour
        "",
    ],
)
def test_bad_captions_raise_one_line_naming_the_caption(text):
    with pytest.raises(ValueError) as info:
        parse_caption(text)
    msg = str(info.value)
    assert "\n" not in msg and repr(text) in msg


def test_caption_for_rejects_bad_attributes():
    good = {"shape": 0, "color": 0, "size": 1, "position": 0, "background": 8}
    with pytest.raises(ValueError, match="keys"):
        caption_for({k: v for k, v in good.items() if k != "size"})
    with pytest.raises(ValueError, match="position.*out of range"):
        caption_for(dict(good, position=9))
    with pytest.raises(ValueError, match="background's colour"):
        caption_for(dict(good, background=0))


# --- the shipped net --------------------------------------------------------------------------------------------


def test_shipped_files_and_size(shipped):
    for name in ("config.json", "model.safetensors", "train_metrics.json", "README.md"):
        assert (SHIPPED_DIR / name).is_file()
    assert sum(p.numel() for p in shipped.parameters()) < 1_000_000
    metrics = json.loads((SHIPPED_DIR / "train_metrics.json").read_text())
    assert all(metrics["test_accuracy"][k] >= 0.95 for k in ATTRIBUTES)


def test_shipped_net_is_accurate_on_real_scenes_at_64_px(shipped, real_64):
    images, targets = real_64
    acc = attribute_accuracy(shipped, images, targets)
    assert set(acc) == {*ATTRIBUTES, "all", "mean"}
    assert all(acc[k] >= 0.9 for k in ATTRIBUTES), acc
    assert acc["mean"] == pytest.approx(sum(acc[k] for k in ATTRIBUTES) / len(ATTRIBUTES))


def test_shipped_net_is_accurate_on_real_scenes_at_32_px(shipped, real_64):
    images, targets = real_64
    small = F.interpolate(images, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    acc = attribute_accuracy(shipped, small, targets)
    assert all(acc[k] >= 0.9 for k in ATTRIBUTES), acc
    native, native_targets = render_one_object("test", N_EVAL, image_size=32)  # the same scenes drawn at 32 px
    assert [dict(zip(ATTRIBUTES, r.tolist())) for r in native_targets] == targets
    acc = attribute_accuracy(shipped, native.float() / 127.5 - 1.0, native_targets)
    assert all(acc[k] >= 0.9 for k in ATTRIBUTES), acc


def test_shuffled_targets_score_near_chance(shipped, real_64):
    images, targets = real_64
    perm = torch.randperm(len(targets), generator=torch.Generator().manual_seed(0)).tolist()
    acc = attribute_accuracy(shipped, images, [targets[i] for i in perm])
    for k in ATTRIBUTES:
        assert acc[k] < CHANCE[k] + 0.25, (k, acc[k])
    assert acc["all"] < 0.05


def test_attribute_accuracy_rejects_bad_input(shipped, real_64):
    images, targets = real_64
    with pytest.raises(ValueError, match="2 images but 3 targets"):
        attribute_accuracy(shipped, images[:2], targets[:3])
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        attribute_accuracy(shipped, images[:2, :1], targets[:2])
    with pytest.raises(ValueError, match=r"targets\[0\]"):
        attribute_accuracy(shipped, images[:1], [{"shape": 0}])
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        attribute_accuracy(shipped, (images[:2] + 1) * 127.5, targets[:2])


def test_chance_levels():
    assert CHANCE["shape"] == pytest.approx(1 / 6) and CHANCE["color"] == pytest.approx(1 / 10)
    assert NUM_CLASSES == {"shape": 6, "color": 10, "size": 2, "position": 9, "background": 10}


# --- held-out prompts -------------------------------------------------------------------------------------------


def test_heldout_prompts_are_fixed_and_disjoint_from_training():
    prompts = heldout_prompts(300)
    assert prompts == heldout_prompts(300)
    assert heldout_prompts(50) == prompts[:50]
    assert heldout_prompts(50, seed=1) != prompts[:50]
    for text, attrs in prompts:
        assert parse_caption(text) == attrs
    # The test split is another stream: its i-th one-object scene is not the train split's.
    train = ShapesDataset(split="train", size=64)
    train_captions = [caption(train.scene(i)) for i in one_object_indices("train", 300)]
    assert sum(a == b for a, b in zip(train_captions, (t for t, _ in prompts))) < 3
    assert one_object_indices("test", 300) != one_object_indices("train", 300)


# --- saving and loading -----------------------------------------------------------------------------------------


def test_save_load_round_trip_and_other_sizes(tmp_path):
    torch.manual_seed(0)
    net = AttributeNet(AttributeNetConfig(width=8)).eval()
    save_attribute_net(net, tmp_path, {"test_accuracy": {}})
    loaded = load_attribute_net(tmp_path)
    x = torch.rand(2, 3, 48, 48) * 2 - 1
    out = loaded(x)
    assert {k: v.shape[1] for k, v in out.items()} == NUM_CLASSES
    torch.testing.assert_close(out["shape"], net(x)["shape"])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        net(torch.zeros(1, 1, 64, 64))


def test_load_errors_are_one_line_naming_the_file(tmp_path):
    with pytest.raises(WeightsNotFoundError) as info:
        load_attribute_net(tmp_path)
    assert "config.json" in str(info.value) and "\n" not in str(info.value)

    shutil.copy(SHIPPED_DIR / "config.json", tmp_path / "config.json")
    with pytest.raises(WeightsNotFoundError) as info:
        load_attribute_net(tmp_path)
    assert "model.safetensors" in str(info.value) and "\n" not in str(info.value)

    save_attribute_net(AttributeNet(AttributeNetConfig(width=8)), tmp_path)  # weights of another width
    shutil.copy(SHIPPED_DIR / "config.json", tmp_path / "config.json")
    with pytest.raises(WeightsMismatchError) as info:
        load_attribute_net(tmp_path)
    assert str(tmp_path / "model.safetensors") in str(info.value) and "\n" not in str(info.value)

    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsMismatchError) as info:
        load_attribute_net(tmp_path)
    assert "model.safetensors" in str(info.value) and "\n" not in str(info.value)

    (tmp_path / "config.json").write_text(json.dumps({"width": 16, "depth": 3}))
    with pytest.raises(WeightsMismatchError) as info:
        load_attribute_net(tmp_path)
    assert "config.json" in str(info.value) and "depth" in str(info.value) and "\n" not in str(info.value)
