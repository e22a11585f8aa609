"""Inception Score (Salimans et al. 2016): IS = exp(E_x KL(p(y|x) || p(y))), mean and std over splits.

High when each sample is classified confidently (low-entropy p(y|x)) and the classes are varied (high-entropy
marginal p(y)); it ranges from 1 (all samples alike) to the number of classes. The marginal p(y) is estimated
within each split, and the splits are taken in order (no shuffling), as in the original implementation.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor


class ISResult(NamedTuple):
    mean: float
    std: float  # over splits, ddof=0 (as the original and torch-fidelity)
    n_splits: int


def _probabilities(values: Tensor | np.ndarray, kind: Literal["logits", "probs"]) -> Tensor:
    """(N, K) logits or probabilities -> (N, K) float64 probabilities."""
    x = torch.as_tensor(values).detach().cpu().double()
    if x.ndim != 2:
        raise ValueError(f"expected (N, K) {kind}, got shape {tuple(x.shape)}")
    if kind == "logits":
        return torch.softmax(x, dim=1)
    if (x < 0).any() or not torch.allclose(x.sum(dim=1), torch.ones(len(x), dtype=x.dtype), atol=1e-4):
        raise ValueError("probabilities must be non-negative and sum to 1 along dim 1")
    return x


def split_score(p: Tensor) -> float:
    """exp of the mean KL(p(y|x) || p(y)) for one split of probabilities (n, K); xlogy makes 0 log 0 = 0."""
    marginal = p.mean(dim=0, keepdim=True)  # (1, K)
    kl = (torch.xlogy(p, p) - torch.xlogy(p, marginal)).sum(dim=1)  # (n,)
    return float(torch.exp(kl.mean()))


def inception_score(
    values: Tensor | np.ndarray, splits: int = 10, kind: Literal["logits", "probs"] = "logits"
) -> ISResult:
    """IS of (N, K) classifier outputs (logits by default, or probabilities with kind="probs")."""
    p = _probabilities(values, kind)
    if len(p) < splits:
        raise ValueError(f"need at least {splits} samples for {splits} splits, got {len(p)}")
    scores = np.array([split_score(chunk) for chunk in torch.tensor_split(p, splits)])
    return ISResult(float(scores.mean()), float(scores.std()), splits)
