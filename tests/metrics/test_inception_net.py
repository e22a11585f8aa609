"""FIDInceptionV3: checkpoint layout, strict loading, error messages and a tiny forward pass."""

from __future__ import annotations

import pytest
import torch

from pakhsh.metrics import (
    FIDInceptionV3,
    InceptionExtractor,
    WeightsMismatchError,
    WeightsNotFoundError,
    default_inception_path,
    load_fid_inception,
)
from pakhsh.metrics.inception import ConvBN


@pytest.fixture(scope="module")
def model() -> FIDInceptionV3:
    return FIDInceptionV3()


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory, model) -> tuple:
    """A random-initialised, perturbed state dict in the checkpoint's layout, saved with torch.save."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for k, v in model.state_dict().items():
        if k.endswith("running_var"):
            state[k] = 1.0 + torch.rand(v.shape, generator=g)  # positive variances
        else:
            state[k] = v + 0.01 * torch.randn(v.shape, generator=g)
    path = tmp_path_factory.mktemp("inception") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(state, path)
    return path, state


def test_layout_matches_the_ported_checkpoint(model):
    state = model.state_dict()
    keys = list(state)
    # 94 conv+BN blocks x (conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var) + fc.weight + fc.bias
    assert sum(isinstance(m, ConvBN) for m in model.modules()) == 94
    assert len(keys) == 94 * 5 + 2
    assert keys[:5] == [
        "Conv2d_1a_3x3.conv.weight",
        "Conv2d_1a_3x3.bn.weight",
        "Conv2d_1a_3x3.bn.bias",
        "Conv2d_1a_3x3.bn.running_mean",
        "Conv2d_1a_3x3.bn.running_var",
    ]
    stem = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3"]
    assert [k.split(".")[0] for k in keys[: 5 * 5 : 5]] == stem
    mixed = ["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
             "Mixed_7a", "Mixed_7b", "Mixed_7c"]
    assert list(dict.fromkeys(k.split(".")[0] for k in keys)) == stem + mixed + ["fc"]
    assert not any("AuxLogits" in k or "num_batches_tracked" in k for k in keys)
    assert state["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    assert state["Mixed_6b.branch7x7_2.conv.weight"].shape == (128, 128, 1, 7)
    assert state["Mixed_7c.branch3x3dbl_3b.conv.weight"].shape == (384, 384, 3, 1)
    assert state["Mixed_7c.branch_pool.conv.weight"].shape == (192, 2048, 1, 1)
    assert state["fc.weight"].shape == (1008, 2048) and state["fc.bias"].shape == (1008,)
    assert all(m.bn.eps == 0.001 for m in model.modules() if isinstance(m, ConvBN))


def test_parameter_count(model):
    # torchvision Inception3 documents 27,161,264 params; minus AuxLogits (3,326,696), plus 8 more fc rows
    # (8 * 2049) gives 23,850,960. With the BN running means/variances the file holds 23,885,392 numbers.
    assert sum(p.numel() for p in model.parameters()) == 23_850_960
    assert sum(v.numel() for v in model.state_dict().values()) == 23_885_392


def test_loads_file_and_gives_features_and_logits(weights_file):
    path, state = weights_file
    net = load_fid_inception(path)
    for k in ("Conv2d_1a_3x3.conv.weight", "Mixed_7c.branch_pool.bn.running_var", "fc.bias"):
        torch.testing.assert_close(net.state_dict()[k], state[k])
    # A grey image (equal channels) as RGB, to check the 1-channel path below. ~6 GFLOPs per image at 299x299:
    # one image per forward keeps this test fast.
    x = torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(0)).repeat(1, 3, 1, 1)
    with torch.no_grad():
        out = net(x)
    assert out.features.shape == (1, 2048) and out.logits.shape == (1, 1008)
    assert torch.isfinite(out.features).all() and (out.features >= 0).all()  # post-ReLU average pool
    torch.testing.assert_close(out.logits, out.logits_unbiased + net.fc.bias)
    net.train()
    assert not net.training  # a metric network never uses batch statistics

    # The extractor takes pakhsh images in [-1, 1], repeats grey to RGB and gives the unbiased logits.
    ext = InceptionExtractor(net)
    feats, logits = ext.features_and_logits(2 * x[:, :1] - 1)
    torch.testing.assert_close(feats, out.features, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits, out.logits_unbiased, rtol=1e-4, atol=1e-4)


def test_default_location_follows_torch_home(tmp_path, monkeypatch, weights_file):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = tmp_path / "hub" / "checkpoints" / "pt_inception-2015-12-05-6726825d.pth"
    assert default_inception_path() == expected
    with pytest.raises(WeightsNotFoundError) as err:
        load_fid_inception()
    assert str(expected) in str(err.value) and "Nothing is downloaded" in str(err.value)
    expected.parent.mkdir(parents=True)
    expected.symlink_to(weights_file[0])
    assert isinstance(load_fid_inception(), FIDInceptionV3)


def test_explicit_missing_path_is_named(tmp_path):
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(WeightsNotFoundError, match="nowhere.pth"):
        load_fid_inception(missing)


def test_missing_key_is_named(tmp_path, weights_file):
    state = dict(weights_file[1])
    del state["Mixed_6c.branch7x7dbl_3.bn.running_mean"]
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(WeightsMismatchError, match=r"missing keys \(1\): Mixed_6c.branch7x7dbl_3.bn.running_mean"):
        load_fid_inception(path)


def test_wrong_shape_and_unexpected_key_are_named(tmp_path, weights_file):
    state = dict(weights_file[1])
    state["fc.weight"] = torch.zeros(1000, 2048)
    state["AuxLogits.fc.weight"] = torch.zeros(1000, 768)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(WeightsMismatchError) as err:
        load_fid_inception(path)
    msg = str(err.value)
    assert "shape mismatch for fc.weight: expected (1008, 2048), got (1000, 2048)" in msg
    assert "unexpected keys (1): AuxLogits.fc.weight" in msg


def test_accepts_batchnorm_counters_and_safetensors(tmp_path, weights_file):
    from safetensors.torch import save_file

    state = dict(weights_file[1])
    with_counters = dict(state, **{"Conv2d_1a_3x3.bn.num_batches_tracked": torch.tensor(0)})
    torch.save(with_counters, tmp_path / "counters.pth")
    load_fid_inception(tmp_path / "counters.pth")
    save_file(state, str(tmp_path / "inception.safetensors"))
    net = load_fid_inception(tmp_path / "inception.safetensors")
    torch.testing.assert_close(net.fc.weight, state["fc.weight"])


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "module.pth"
    torch.save(torch.nn.Linear(2, 2), path)  # a whole pickled module, not a state dict
    with pytest.raises(WeightsMismatchError, match="weights_only"):
        load_fid_inception(path)
