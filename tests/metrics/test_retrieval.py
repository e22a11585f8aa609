"""CLIP metrics (metrics/retrieval.py): retrieval recall R@k in both directions on matrices whose ranks are known by
hand (ties counted against the pair), and the CLIP score's closed form."""

from __future__ import annotations

import pytest
import torch

from pakhsh.metrics.retrieval import clip_score, pairwise_cosine, retrieval_recall


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    """One torch thread (after conftest's two): tiny nets gain nothing from more, and the CPU is shared."""
    torch.set_num_threads(1)


def test_identity_pairs_are_all_found() -> None:
    e = torch.eye(5)
    r = retrieval_recall(e, e * 3.0, ks=(1, 2, 5))  # the scale of an embedding does not matter
    assert r == {f"{d}_R@{k}": 1.0 for k in (1, 2, 5) for d in ("t2i", "i2t")}


def test_a_permutation_with_two_fixed_points() -> None:
    """Caption j describes image perm[j]: only the 2 fixed points are found at any k < N (the other captions'
    own images score 0, tied with every other image but one: counted against them)."""
    images = torch.eye(6)
    perm = torch.tensor([0, 2, 1, 3, 5, 4])  # fixed: 0 and 3
    texts = images[perm]
    r = retrieval_recall(images, texts, ks=(1, 3, 5, 6))
    for k in (1, 3, 5):
        assert r[f"t2i_R@{k}"] == pytest.approx(2 / 6) and r[f"i2t_R@{k}"] == pytest.approx(2 / 6)
    assert r["t2i_R@6"] == r["i2t_R@6"] == 1.0  # k = N finds everything


def test_graded_similarities_by_hand() -> None:
    """Images e_0, e_1, e_2; texts (3,2,1), (3,1,2), (1,3,2) (equal norms): sim[i, j] = text_j[i] / sqrt(14).
    text -> image: text 0's own image scores 3 (rank 0), text 1's scores 1 (rank 2), text 2's scores 2 (rank 1).
    image -> text: rows (3,3,1), (2,1,3), (1,2,2): image 0 ties its own caption (rank 1, ties count against),
    image 1's own is the lowest (rank 2), image 2 ties (rank 1)."""
    images = torch.eye(3)
    texts = torch.tensor([[3.0, 2.0, 1.0], [3.0, 1.0, 2.0], [1.0, 3.0, 2.0]])
    r = retrieval_recall(images, texts, ks=(1, 2, 3))
    assert r["t2i_R@1"] == pytest.approx(1 / 3)
    assert r["t2i_R@2"] == pytest.approx(2 / 3)
    assert r["t2i_R@3"] == 1.0
    assert r["i2t_R@1"] == 0.0
    assert r["i2t_R@2"] == pytest.approx(2 / 3)
    assert r["i2t_R@3"] == 1.0


def test_constant_embeddings_score_zero() -> None:
    """Every pair ties with every other: a collapsed encoder finds nothing below k = N (chance would be k / N)."""
    c = torch.ones(8, 4)
    r = retrieval_recall(c, c, ks=(1, 7, 8))
    assert r["t2i_R@1"] == r["i2t_R@1"] == r["t2i_R@7"] == r["i2t_R@7"] == 0.0
    assert r["t2i_R@8"] == r["i2t_R@8"] == 1.0


def test_random_embeddings_against_themselves_and_shuffled() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 16, generator=g)
    assert retrieval_recall(x, x, ks=(1,)) == {"t2i_R@1": 1.0, "i2t_R@1": 1.0}
    shifted = retrieval_recall(x, x.roll(1, 0), ks=(1,))  # caption i is image i-1's: no own pair on top
    assert shifted == {"t2i_R@1": 0.0, "i2t_R@1": 0.0}


@pytest.mark.parametrize("k", [0, 5, -1])
def test_k_out_of_range(k: int) -> None:
    with pytest.raises(ValueError, match=rf"k={k}: must be in 1\.\.4"):
        retrieval_recall(torch.eye(4), torch.eye(4), ks=(1, k))


@pytest.mark.parametrize("fn", [retrieval_recall, clip_score])
def test_unpaired_inputs(fn) -> None:
    with pytest.raises(ValueError, match=r"paired \(N, D\)"):
        fn(torch.zeros(3, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"paired \(N, D\)"):
        fn(torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match="at least one"):
        fn(torch.zeros(0, 4), torch.zeros(0, 4))


def test_clip_score_known_values() -> None:
    a = torch.tensor([[1.0, 0.0]])
    assert clip_score(a, a * 5) == pytest.approx(100.0)
    assert clip_score(a, torch.tensor([[0.0, 2.0]])) == pytest.approx(0.0)
    assert clip_score(a, -a) == 0.0  # negative cosines are clipped at 0
    half = torch.tensor([[0.5, 3 ** 0.5 / 2]])  # cos 60 degrees = 0.5
    assert clip_score(a, half) == pytest.approx(50.0)
    # the mean over pairs of 100 * max(cos, 0): (100 + 50 + 0) / 3
    imgs = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    txts = torch.tensor([[2.0, 0.0], [0.5, 3 ** 0.5 / 2], [-1.0, 0.0]])
    assert clip_score(imgs, txts) == pytest.approx(50.0)
    torch.testing.assert_close(pairwise_cosine(imgs, txts), torch.tensor([1.0, 0.5, -1.0]))
