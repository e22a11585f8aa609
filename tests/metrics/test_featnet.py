"""FeatureNet: training smoke test, save/load round trip with strict errors, extractor conversions, script."""

from __future__ import annotations

import json

import pytest
import torch

from pakhsh.metrics import (
    FeatureNet,
    FeatureNetConfig,
    FeatureNetExtractor,
    WeightsMismatchError,
    WeightsNotFoundError,
    classification_accuracy,
    load_feature_net,
    save_feature_net,
    train_feature_net,
)
from pakhsh.metrics import train_featnet
from pakhsh.metrics.featnet import infer_feature_net_config

TINY = dict(in_channels=1, image_size=16, num_classes=4, width=8, feature_dim=16)


def test_training_reduces_loss(toy_dataset):
    cfg = FeatureNetConfig(name="toy-net", **TINY)
    model, result = train_feature_net(toy_dataset, cfg, steps=30, batch_size=16, lr=3e-3, seed=0,
                                      progress=False, eval_dataset=toy_dataset, log_every=5)
    assert len(result.loss_history) == 6
    assert result.final_loss < 0.7 * result.first_loss
    assert result.eval_accuracy is not None and result.eval_accuracy > 0.5
    assert not model.training


def test_training_rejects_dataset_that_does_not_fit(toy_dataset):
    cfg = FeatureNetConfig(**dict(TINY, image_size=28))
    with pytest.raises(ValueError, match=r"\(1, 16, 16\).*\(1, 28, 28\)"):
        train_feature_net(toy_dataset, cfg, steps=1, progress=False)


def test_infer_config(toy_dataset):
    cfg = infer_feature_net_config(toy_dataset, name="toy-net", width=8, feature_dim=16)
    assert cfg == FeatureNetConfig(name="toy-net", **TINY)


def test_save_load_round_trip(tmp_path, toy_dataset):
    torch.manual_seed(0)
    model = FeatureNet(FeatureNetConfig(name="toy-net", **TINY)).eval()
    save_feature_net(model, tmp_path / "net")
    assert json.loads((tmp_path / "net" / "config.json").read_text())["name"] == "toy-net"
    loaded = load_feature_net(tmp_path / "net")
    assert loaded.cfg == model.cfg
    x = toy_dataset.images[:5]
    with torch.no_grad():
        a, b = model(x), loaded(x)
    torch.testing.assert_close(a.features, b.features)
    torch.testing.assert_close(a.logits, b.logits)
    assert 0.0 <= classification_accuracy(loaded, toy_dataset) <= 1.0


def test_load_errors_name_the_problem(tmp_path):
    from safetensors.torch import load_file, save_file

    with pytest.raises(WeightsNotFoundError, match="config.json"):
        load_feature_net(tmp_path / "absent")
    d = save_feature_net(FeatureNet(FeatureNetConfig(**TINY)), tmp_path / "net")

    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(cfg, depth=3)))
    with pytest.raises(WeightsMismatchError, match="depth"):
        load_feature_net(d)
    (d / "config.json").write_text(json.dumps(dict(cfg, feature_dim=32)))  # config no longer fits weights
    with pytest.raises(WeightsMismatchError, match=r"shape mismatch for proj.weight: expected \(32, 32\)"):
        load_feature_net(d)

    (d / "config.json").write_text(json.dumps(cfg))
    state = load_file(str(d / "model.safetensors"))
    del state["head.bias"]
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(WeightsMismatchError, match="missing keys.*head.bias"):
        load_feature_net(d)


def test_extractor_converts_with_warnings_or_raises_when_strict(make_toy):
    ext = FeatureNetExtractor(FeatureNet(FeatureNetConfig(name="toy-net", **TINY)))
    assert (ext.name, ext.feature_dim, ext.num_classes) == ("toy-net", 16, 4)
    rgb = make_toy(n=3, size=16, channels=3).images
    with pytest.warns(UserWarning, match="3-channel images converted to 1"):
        assert ext.features(rgb).shape == (3, 16)
    big = make_toy(n=3, size=32).images
    with pytest.warns(UserWarning, match=r"resized to \(16, 16\)"):
        assert ext.logits(big).shape == (3, 4)
    uint8 = ((make_toy(n=2).images + 1) * 127.5).round().to(torch.uint8)
    assert ext.features(uint8).shape == (2, 16)
    strict = FeatureNetExtractor(ext.model, strict=True)
    with pytest.raises(ValueError, match="strict"):
        strict.features(big)


def test_script_help_and_smoke_run(tmp_path, monkeypatch, make_toy, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_featnet.main(["--help"])
    assert exit_info.value.code == 0
    assert "--dataset" in capsys.readouterr().out

    monkeypatch.setattr(train_featnet, "load_datasets", lambda *a: (make_toy(n=32), make_toy(n=16, seed=1)))
    out = tmp_path / "fashion-net"
    code = train_featnet.main(["--dataset", "fashion_mnist", "--out", str(out), "--steps", "3", "--batch-size",
                               "8", "--width", "8", "--feature-dim", "16", "--no-progress"])
    assert code == 0
    ext = FeatureNetExtractor.from_dir(out)
    assert ext.name == "fashion-net" and ext.image_size == 16
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["eval_accuracy"] is not None
