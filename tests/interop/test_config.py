"""Typed configs from YAML and --set: YAML 1.1 booleans that are really option names."""

from __future__ import annotations

import pytest

from pakhsh.config import ConfigError
from pakhsh.training import load_experiment


@pytest.mark.parametrize("text", ["no", "No", "bf16"])
def test_mixed_precision_no_from_set_and_yaml(tmp_path, text):
    cfg = load_experiment(None, [f"train.mixed_precision={text}"])
    assert cfg.train.mixed_precision == text.lower()
    yml = tmp_path / "c.yaml"
    yml.write_text(f"train: {{mixed_precision: {text}}}\n")
    assert load_experiment(yml).train.mixed_precision == text.lower()


def test_a_real_boolean_is_still_refused_where_no_option_means_it():
    with pytest.raises(ConfigError, match="train.timestep_sampler"):
        load_experiment(None, ["train.timestep_sampler=no"])
