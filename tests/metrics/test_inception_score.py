"""Inception Score on constructed predictions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pakhsh.metrics import inception_score


def _confident_uniform(k: int, per_split: int, splits: int) -> torch.Tensor:
    """One-hot predictions whose classes are uniform within every split: (splits * per_split * k, k)."""
    labels = torch.arange(splits * per_split * k) % k
    return F.one_hot(labels, k).double()


def test_confident_uniform_predictions_score_number_of_classes():
    probs = _confident_uniform(k=7, per_split=3, splits=10)
    out = inception_score(probs, splits=10, kind="probs")
    assert out.mean == pytest.approx(7.0, abs=1e-9)
    assert out.std == pytest.approx(0.0, abs=1e-9)
    assert out.n_splits == 10


def test_confident_uniform_logits_score_number_of_classes():
    logits = 60.0 * _confident_uniform(k=5, per_split=2, splits=10)
    assert inception_score(logits).mean == pytest.approx(5.0, rel=1e-6)


def test_identical_predictions_score_one():
    logits = torch.randn(1, 10).repeat(200, 1)
    out = inception_score(logits)
    assert out.mean == pytest.approx(1.0, abs=1e-9)
    assert out.std == pytest.approx(0.0, abs=1e-9)


def test_score_lies_between_one_and_number_of_classes():
    out = inception_score(torch.randn(500, 6, generator=torch.Generator().manual_seed(0)) * 3)
    assert 1.0 < out.mean < 6.0 and out.std > 0


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="at least 10"):
        inception_score(torch.randn(5, 3))
    with pytest.raises(ValueError, match="sum to 1"):
        inception_score(torch.rand(20, 3), kind="probs")
