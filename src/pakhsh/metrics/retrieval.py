"""Metrics of a CLIP: zero-shot retrieval recall and CLIP score.

- Retrieval R@k (CLIP's and ALIGN's zero-shot retrieval tables): over N held-out (image, caption) pairs, the
  share of captions whose own image is among the k images most similar to them (text -> image), and of images
  whose own caption is among their k nearest captions (image -> text). Chance is k / N.
- CLIP score (Hessel et al. 2021 without the 2.5 rescale, as torchmetrics reports it): 100 x the cosine
  similarity of an image's and a caption's embeddings, clipped at 0, averaged.
"""

from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor


def _check_pairs(image_emb: Tensor, text_emb: Tensor) -> None:
    if image_emb.ndim != 2 or image_emb.shape != text_emb.shape:
        raise ValueError(f"need paired (N, D) image and text embeddings, got {tuple(image_emb.shape)} and "
                         f"{tuple(text_emb.shape)}")
    if image_emb.shape[0] < 1:
        raise ValueError("need at least one (image, caption) pair")


def retrieval_recall(image_emb: Tensor, text_emb: Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Row i of each is pair i. Returns {"t2i_R@k": ..., "i2t_R@k": ...} for each k. Ties are counted against the
    pair (a caption whose image ties with another at rank k is not a hit), so a constant embedding scores 0."""
    _check_pairs(image_emb, text_emb)
    n = image_emb.shape[0]
    sim = F.normalize(image_emb.float(), dim=-1) @ F.normalize(text_emb.float(), dim=-1).t()  # (N images, N texts)
    own = sim.diagonal()
    # rank of the own pair = how many others score at least as high (ties count against it)
    t2i_rank = (sim >= own[None, :]).sum(0) - 1  # per text: images scoring >= its own image
    i2t_rank = (sim >= own[:, None]).sum(1) - 1  # per image: texts scoring >= its own text
    out: dict[str, float] = {}
    for k in ks:
        if not 1 <= k <= n:
            raise ValueError(f"k={k}: must be in 1..{n} (the number of pairs)")
        out[f"t2i_R@{k}"] = float((t2i_rank < k).float().mean())
        out[f"i2t_R@{k}"] = float((i2t_rank < k).float().mean())
    return out


def clip_score(image_emb: Tensor, text_emb: Tensor) -> float:
    """Mean over pairs of 100 * max(cos(image_i, text_i), 0)."""
    _check_pairs(image_emb, text_emb)
    cos = F.cosine_similarity(image_emb.float(), text_emb.float(), dim=-1)
    return float(100 * cos.clamp(min=0).mean())


def pairwise_cosine(a: Tensor, b: Tensor) -> Tensor:
    """cos(a_i, b_i) per row: (N,)."""
    return F.cosine_similarity(a.float(), b.float(), dim=-1)


__all__ = ["clip_score", "pairwise_cosine", "retrieval_recall"]

