"""unCLIP's diffusion prior (nets/prior.py): output shape, caption tokens beyond the mask ignored, input checks, and
classifier-free guidance through `pakhsh.samplers.ClassifierFreeGuidance` with the empty caption as the null: scale
1 is the conditional prior, scale 0 the prior on the empty caption's tokens and text embedding."""

from __future__ import annotations

import pytest
import torch

from pakhsh.nets.prior import DiffusionPrior, PriorConfig
from pakhsh.samplers import ClassifierFreeGuidance

D, T, L = 8, 12, 5  # embedding width, caption-token width, caption positions


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    """One torch thread (after conftest's two): tiny nets gain nothing from more, and the CPU is shared."""
    torch.set_num_threads(1)


def tiny_prior(text_dim: int | None = T, seed: int = 0) -> DiffusionPrior:
    torch.manual_seed(seed)
    return DiffusionPrior(PriorConfig(embed_dim=D, text_dim=text_dim, max_text_tokens=6, width=16, depth=2,
                                      heads=2)).eval()


def batch(b: int = 3, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(b, L, dtype=torch.bool)
    for i in range(b):
        mask[i, : 2 + i % (L - 1)] = True
    return {"x": torch.randn(b, D, generator=g), "t": torch.randint(0, 50, (b,), generator=g),
            "text_embed": torch.randn(b, D, generator=g), "context": torch.randn(b, L, T, generator=g),
            "context_mask": mask}


def run(prior: DiffusionPrior, inp: dict[str, torch.Tensor], **change) -> torch.Tensor:
    a = {**inp, **change}
    with torch.no_grad():
        return prior(a["x"], a["t"], a["text_embed"], a["context"], a["context_mask"])


def test_output_is_one_embedding_per_row() -> None:
    prior, inp = tiny_prior(), batch()
    out = run(prior, inp)
    assert out.shape == (3, D) and out.dtype == torch.float32 and torch.isfinite(out).all()
    # every input matters: the noised embedding, the step, the text embedding and the caption tokens
    for key, other in (("x", inp["x"] + 1), ("t", inp["t"] + 7), ("text_embed", inp["text_embed"] + 1),
                       ("context", inp["context"] + 1)):
        assert (run(prior, inp, **{key: other}) - out).abs().max() > 1e-4, key


def test_rows_are_independent() -> None:
    prior, inp = tiny_prior(), batch()
    out = run(prior, inp)
    one = {k: v[1:2] for k, v in inp.items()}
    torch.testing.assert_close(run(prior, one), out[1:2], rtol=0, atol=1e-5)


def test_a_scalar_step_is_every_rows_step() -> None:
    prior, inp = tiny_prior(), batch()
    torch.testing.assert_close(run(prior, inp, t=torch.tensor(17)), run(prior, inp, t=torch.full((3,), 17)))
    torch.testing.assert_close(run(prior, inp, t=17), run(prior, inp, t=torch.full((3,), 17)))


def test_caption_tokens_beyond_the_mask_are_ignored() -> None:
    prior, inp = tiny_prior(), batch()
    out = run(prior, inp)
    junk = torch.randn(inp["context"].shape, generator=torch.Generator().manual_seed(5)) * 100
    masked = torch.where(inp["context_mask"][..., None], inp["context"], junk)
    torch.testing.assert_close(run(prior, inp, context=masked), out, rtol=0, atol=1e-5)
    # fewer padding positions: the same prediction
    torch.testing.assert_close(run(prior, inp, context=inp["context"][:, :4], context_mask=inp["context_mask"][:, :4]),
                               out, rtol=0, atol=1e-5)
    # no mask = every token real: row 0 (2 real tokens) now reads its padding
    assert (run(prior, inp, context_mask=None)[0] - out[0]).abs().max() > 1e-4


def test_a_prior_without_caption_tokens() -> None:
    prior, inp = tiny_prior(text_dim=None), batch()
    with torch.no_grad():
        out = prior(inp["x"], inp["t"], inp["text_embed"])
    assert out.shape == (3, D)
    assert not any("tokens" in k for k in prior.state_dict())
    with pytest.raises(ValueError, match="prior.text_dim is null"):
        prior(inp["x"], inp["t"], inp["text_embed"], inp["context"])
    with pytest.raises(ValueError, match="prior.text_dim is null"):
        prior(inp["x"], inp["t"], inp["text_embed"], None, inp["context_mask"])


@pytest.mark.parametrize(("change", "needle"), [
    ({"x": torch.zeros(3, D + 1)}, r"\(B, 8\) embeddings, got \(3, 9\)"),
    ({"x": torch.zeros(3, 2, D)}, r"got \(3, 2, 8\)"),
    ({"text_embed": torch.zeros(2, D)}, r"text_embed must be \(3, 8\) like x, got \(2, 8\)"),
    ({"context": None}, r"context \(B, L, 12\) is needed"),
    ({"context": torch.zeros(3, L, T + 1)}, r"context must be \(3, L <= 6, 12\), got \(3, 5, 13\)"),
    ({"context": torch.zeros(2, L, T)}, r"got \(2, 5, 12\)"),
    ({"context": torch.zeros(3, 7, T), "context_mask": None}, r"got \(3, 7, 12\)"),
    ({"context_mask": torch.ones(3, L - 1, dtype=torch.bool)}, r"context_mask must be \(3, 5\) bool"),
    ({"context_mask": torch.ones(3, L)}, r"context_mask must be \(3, 5\) bool"),
    ({"t": torch.zeros(2, dtype=torch.long)}, r"t must be a scalar or \(3,\)"),
])
def test_bad_inputs_are_value_errors(change: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        run(tiny_prior(), batch(), **change)


@pytest.mark.parametrize(("change", "key"), [
    ({"width": 15}, "prior.width"), ({"depth": 0}, "prior.depth"), ({"dropout": 1.0}, "prior.dropout"),
    ({"text_dim": 0}, "prior.text_dim"), ({"embed_dim": True}, "prior.embed_dim"),
])
def test_bad_configs_name_the_key(change: dict, key: str) -> None:
    base = dict(embed_dim=D, text_dim=T, width=16, depth=1, heads=2)
    with pytest.raises(ValueError, match=key):
        PriorConfig(**{**base, **change})


# ------------------------------------------------------------------------------------------------ guidance
def null_caption(seed: int = 7) -> dict[str, torch.Tensor]:
    """An empty caption as training substitutes it: its tokens (here [CLS] [SEP]-like: 2 real of L), its mask and
    its CLIP text embedding, each (1, ...)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(1, L, dtype=torch.bool)
    mask[0, :2] = True
    tokens = torch.randn(1, L, T, generator=g) * mask[..., None]
    return {"text_embed": torch.randn(1, D, generator=g), "context": tokens, "context_mask": mask}


def guided(prior: DiffusionPrior, inp: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
    fn = ClassifierFreeGuidance(prior, scale, null_caption())
    with torch.no_grad():
        return fn(inp["x"], inp["t"], text_embed=inp["text_embed"], context=inp["context"],
                  context_mask=inp["context_mask"])


def test_guidance_one_is_the_conditional_prior() -> None:
    prior, inp = tiny_prior(), batch()
    torch.testing.assert_close(guided(prior, inp, 1.0), run(prior, inp), rtol=0, atol=1e-6)


def test_guidance_zero_is_the_prior_on_the_empty_caption() -> None:
    prior, inp = tiny_prior(), batch()
    null = {k: v.expand(3, *v.shape[1:]) for k, v in null_caption().items()}
    uncond = run(prior, inp, **null)
    assert (uncond - run(prior, inp)).abs().max() > 1e-3  # the caption matters
    torch.testing.assert_close(guided(prior, inp, 0.0), uncond, rtol=0, atol=1e-5)
    # and between: uncond + s (cond - uncond)
    cond = run(prior, inp)
    torch.testing.assert_close(guided(prior, inp, 2.5), uncond + 2.5 * (cond - uncond), rtol=0, atol=1e-4)
