"""TaskConfig validation: every bad value is a one-line ValueError naming its key; YAML lists are accepted."""

from __future__ import annotations

import pytest

from pakhsh.config import from_dict, to_dict
from pakhsh.tasks import TASK_NAMES, TaskConfig


def test_task_names_order_is_the_label_order() -> None:
    assert TASK_NAMES == ("colorize", "inpaint", "uncrop", "jpeg")


def test_defaults() -> None:
    cfg = TaskConfig()
    assert (cfg.name, cfg.mask, cfg.uncrop_side, cfg.uncrop_fraction, cfg.jpeg_quality) == (
        "colorize", "mixed", "random", 0.25, (5, 30))


@pytest.mark.parametrize("kwargs, key", [
    ({"name": "foo"}, "task.name='foo' is not a task: use colorize, inpaint, uncrop, jpeg or multi"),
    ({"mask": "square"}, "task.mask='square'"),
    ({"uncrop_side": "middle"}, "task.uncrop_side='middle'"),
    ({"uncrop_fraction": 0.0}, "task.uncrop_fraction=0.0"),
    ({"uncrop_fraction": 1.0, "uncrop_side": "left"}, "task.uncrop_fraction=1.0"),
    ({"uncrop_fraction": 0.5, "uncrop_side": "all"}, "task.uncrop_fraction=0.5"),
    ({"uncrop_fraction": 0.6, "uncrop_side": "random"}, "task.uncrop_fraction=0.6"),
    ({"jpeg_quality": (0, 30)}, "task.jpeg_quality"),
    ({"jpeg_quality": (5, 101)}, "task.jpeg_quality"),
    ({"jpeg_quality": (30, 5)}, "task.jpeg_quality"),
    ({"jpeg_quality": (5.5, 10)}, "task.jpeg_quality"),
    ({"jpeg_quality": (5,)}, "task.jpeg_quality"),
])
def test_bad_values_name_the_key(kwargs: dict, key: str) -> None:
    with pytest.raises(ValueError, match="^" + key.replace("(", r"\(").replace(".", r"\.")) as e:
        TaskConfig(**kwargs)
    assert "\n" not in str(e.value)


def test_valid_edges() -> None:
    TaskConfig(uncrop_side="left", uncrop_fraction=0.9)
    TaskConfig(uncrop_side="all", uncrop_fraction=0.49)
    TaskConfig(jpeg_quality=(1, 100))
    TaskConfig(jpeg_quality=(7, 7))


def test_yaml_round_trip() -> None:
    cfg = TaskConfig(name="multi", mask="freeform", uncrop_side="top", uncrop_fraction=0.4, jpeg_quality=(10, 20))
    back = from_dict(TaskConfig, to_dict(cfg))  # to_dict turns the tuple into a list, as YAML/JSON hold it
    assert back == cfg and isinstance(back.jpeg_quality, tuple)
    assert TaskConfig(jpeg_quality=[3, 9]).jpeg_quality == (3, 9)  # type: ignore[arg-type]
