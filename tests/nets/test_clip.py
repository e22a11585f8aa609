"""unCLIP's small CLIP (nets/clip.py): the symmetric InfoNCE loss against hand-computed values, its symmetry and
batch-permutation equivariance, the learned logit scale (gradient, cap at 100), unit-norm embeddings, input checks,
and a text head that ignores what lies beyond the caption's mask."""

from __future__ import annotations

import math

import pytest
import torch

from pakhsh.nets.clip import CLIP, MAX_LOGIT_SCALE, CLIPConfig, contrastive_loss, scale_embedding

TINY = dict(image_size=8, widths=(8, 16), num_groups=4, embed_dim=8, text_dim=12, text_width=16, text_layers=1,
            text_heads=2, max_text_tokens=6)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    """One torch thread (after conftest's two): tiny nets gain nothing from more, and the CPU is shared."""
    torch.set_num_threads(1)


def tiny_clip(seed: int = 0) -> CLIP:
    torch.manual_seed(seed)
    return CLIP(CLIPConfig(**TINY)).eval()


def inputs(b: int = 3, length: int = 5, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(b, 3, 8, 8, generator=g) * 2 - 1
    tokens = torch.randn(b, length, 12, generator=g)
    mask = torch.zeros(b, length, dtype=torch.bool)
    for i in range(b):
        mask[i, : 2 + i % (length - 1)] = True  # captions of different lengths, each >= 2 real tokens
    return images, tokens, mask


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


# ------------------------------------------------------------------------------------------------ contrastive loss
def test_loss_of_two_orthogonal_pairs_at_scale_one() -> None:
    """logits = I: each row is CE([1, 0], own) = log(1 + e^-1), in both directions."""
    e = torch.eye(2)
    want = math.log(1 + math.exp(-1))
    torch.testing.assert_close(contrastive_loss(e, e, 1.0), torch.full((2,), want))
    # swapped captions: each own logit is 0 against a 1: log(1 + e)
    torch.testing.assert_close(contrastive_loss(e, e.flip(0), 1.0), torch.full((2,), math.log(1 + math.e)))


def test_loss_averages_the_image_and_the_text_direction() -> None:
    """Both texts = e_0: logits [[1, 1], [0, 0]]. Image rows: log 2 each; text rows (the transpose [[1, 0], [1, 0]]):
    log(1 + e^-1) for text 0, log(1 + e) for text 1. Pair i's loss is the mean of its two terms."""
    img = torch.eye(2)
    txt = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    want = torch.tensor([(math.log(2) + math.log(1 + math.exp(-1))) / 2, (math.log(2) + math.log(1 + math.e)) / 2])
    torch.testing.assert_close(contrastive_loss(img, txt, 1.0), want)
    # the scale multiplies the logits: at scale 2, [[2, 2], [0, 0]]
    want2 = torch.tensor([(math.log(2) + math.log(1 + math.exp(-2))) / 2,
                          (math.log(2) + math.log(1 + math.exp(2))) / 2])
    torch.testing.assert_close(contrastive_loss(img, txt, torch.tensor(2.0)), want2)


def test_loss_is_symmetric_in_images_and_texts() -> None:
    g = torch.Generator().manual_seed(0)
    img, txt = unit(torch.randn(5, 8, generator=g)), unit(torch.randn(5, 8, generator=g))
    a, b = contrastive_loss(img, txt, 7.0), contrastive_loss(txt, img, 7.0)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # ... while the two directions differ on their own (so the equality is not trivial)
    logits = 7.0 * img @ txt.t()
    per_image = torch.nn.functional.cross_entropy(logits, torch.arange(5), reduction="none")
    assert (per_image - a).abs().max() > 1e-3
    torch.testing.assert_close(a, (per_image + torch.nn.functional.cross_entropy(logits.t(), torch.arange(5),
                                                                                reduction="none")) / 2)


def test_loss_is_equivariant_under_a_batch_permutation() -> None:
    g = torch.Generator().manual_seed(1)
    img, txt = unit(torch.randn(6, 8, generator=g)), unit(torch.randn(6, 8, generator=g))
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    base = contrastive_loss(img, txt, 10.0)
    torch.testing.assert_close(contrastive_loss(img[perm], txt[perm], 10.0), base[perm], rtol=0, atol=1e-6)
    assert base.std() > 1e-3  # the pairs' losses differ, so a wrong permutation would show
    # pairing image i with text perm[i] instead is a different (worse) loss
    assert contrastive_loss(img, txt[perm], 10.0).mean() != pytest.approx(float(base.mean()), abs=1e-3)


def test_aligned_pairs_at_a_large_scale_have_almost_no_loss() -> None:
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(2)))
    e = q[:4]  # 4 orthonormal embeddings
    loss = contrastive_loss(e, e, 100.0)
    assert loss.max() < 1e-6  # each row: log(1 + 3 e^-100)
    assert contrastive_loss(e, e, 1.0).min() > 0.5  # at scale 1 the same pairs are far from solved


def test_loss_refuses_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match=r"two \(B, D\) embeddings, got \(3, 8\) and \(2, 8\)"):
        contrastive_loss(torch.zeros(3, 8), torch.zeros(2, 8), 1.0)
    with pytest.raises(ValueError, match="two"):
        contrastive_loss(torch.zeros(3), torch.zeros(3), 1.0)


# ------------------------------------------------------------------------------------------------ logit scale
def test_logit_scale_starts_at_one_over_the_temperature_and_gets_a_gradient() -> None:
    clip = tiny_clip()
    assert float(clip.logit_scale.detach()) == pytest.approx(1 / 0.07, rel=1e-6)
    images, tokens, mask = inputs()
    img, txt, scale = clip(images, tokens, mask)
    contrastive_loss(img, txt, scale).mean().backward()
    assert clip.log_scale.grad is not None and clip.log_scale.grad.abs() > 0
    # the towers learn too
    assert clip.image.proj.weight.grad.abs().sum() > 0 and clip.text.proj_out.weight.grad.abs().sum() > 0


def test_logit_scale_is_capped_at_100() -> None:
    clip = tiny_clip()
    with torch.no_grad():
        clip.log_scale.fill_(math.log(1000.0))
    assert float(clip.logit_scale.detach()) == MAX_LOGIT_SCALE == 100.0
    with torch.no_grad():
        clip.log_scale.fill_(math.log(50.0))
    assert float(clip.logit_scale.detach()) == pytest.approx(50.0, rel=1e-6)
    _, _, scale = clip(*inputs())
    assert float(scale.detach()) == pytest.approx(50.0, rel=1e-6)


def test_temperature_must_be_in_zero_one() -> None:
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="clip.init_temperature"):
            CLIPConfig(**{**TINY, "init_temperature": bad})


# ------------------------------------------------------------------------------------------------ the towers
def test_embeddings_are_unit_vectors() -> None:
    clip = tiny_clip()
    img, txt, _ = clip(*inputs(b=4))
    assert img.shape == txt.shape == (4, 8)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(4))
    assert (img[0] - img[1]).abs().max() > 1e-3 and (txt[0] - txt[1]).abs().max() > 1e-3


def test_scale_embedding_has_norm_sqrt_d_and_keeps_the_direction() -> None:
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(3)) * 5
    s = scale_embedding(x)
    torch.testing.assert_close(s.norm(dim=-1), torch.full((3,), 4.0))
    torch.testing.assert_close(s / 4.0, unit(x))


def test_padding_beyond_the_mask_does_not_change_the_text_embedding() -> None:
    clip = tiny_clip()
    _, tokens, mask = inputs(b=3, length=5)
    base = clip.encode_text(tokens, mask)
    noise = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(9)) * 50
    junk = torch.where(mask[..., None], tokens, noise)
    torch.testing.assert_close(clip.encode_text(junk, mask), base, rtol=0, atol=1e-5)
    # ... nor do extra padding positions: the first caption (2 real tokens) alone, cut to 2 or 3 positions
    torch.testing.assert_close(clip.encode_text(tokens[:1, :2], mask[:1, :2]), base[:1], rtol=0, atol=1e-5)
    torch.testing.assert_close(clip.encode_text(tokens[:1, :3], mask[:1, :3]), base[:1], rtol=0, atol=1e-5)
    # a real token does change it
    changed = tokens.clone()
    changed[0, 1] += 1.0
    assert (clip.encode_text(changed, mask)[0] - base[0]).abs().max() > 1e-4


def test_the_image_encoder_keeps_positions() -> None:
    """The last map is flattened, not pooled: a scene mirrored left-right is another embedding."""
    clip = tiny_clip()
    images, _, _ = inputs(b=2)
    a, b = clip.encode_image(images), clip.encode_image(images.flip(-1))
    assert (a - b).abs().max() > 1e-3


@pytest.mark.parametrize(("shape", "needle"), [
    ((2, 1, 8, 8), r"\(B, 3, 8, 8\), got \(2, 1, 8, 8\)"),
    ((2, 3, 16, 16), r"got \(2, 3, 16, 16\)"),
    ((3, 8, 8), r"got \(3, 8, 8\)"),
])
def test_image_shape_errors(shape: tuple[int, ...], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        tiny_clip().encode_image(torch.zeros(shape))


def test_text_shape_errors() -> None:
    clip = tiny_clip()
    ok = torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"\(B, L <= 6, 12\), got \(2, 4, 10\)"):
        clip.encode_text(torch.zeros(2, 4, 10), ok)
    with pytest.raises(ValueError, match=r"got \(2, 7, 12\)"):  # more tokens than positions
        clip.encode_text(torch.zeros(2, 7, 12), torch.ones(2, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must be"):
        clip.encode_text(torch.zeros(2, 4, 12), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must be"):  # a float mask is refused, not inverted
        clip.encode_text(torch.zeros(2, 4, 12), torch.ones(2, 4))
    empty = ok.clone()
    empty[1] = False
    with pytest.raises(ValueError, match="at least one real token"):
        clip.encode_text(torch.zeros(2, 4, 12), empty)


@pytest.mark.parametrize(("change", "key"), [
    ({"image_size": 9}, "clip.image_size"),
    ({"text_width": 17}, "clip.text_width"),
    ({"embed_dim": 0}, "clip.embed_dim"),
    ({"widths": ()}, "clip.widths"),
    ({"widths": (8, 10)}, "clip.widths"),
])
def test_bad_configs_name_the_key(change: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        CLIPConfig(**{**TINY, **change})
