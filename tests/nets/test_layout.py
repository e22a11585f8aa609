"""Layout tokens (LayoutEncoder) and the UNet's layout input (UNetConfig.layout_classes, boxes / box_labels)."""

from __future__ import annotations

import hashlib

import pytest
import torch

from pakhsh.config import from_dict, to_dict
from pakhsh.nets.layout import LayoutEncoder
from pakhsh.nets.unet import UNet, UNetConfig
from pakhsh.samplers.guidance import ClassifierFreeGuidance
from tests.nets.test_cross_attention import build as build_unet

CTX = 24
K = 6  # layout classes


def tiny(**overrides) -> UNetConfig:
    base = dict(image_size=16, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                attention_resolutions=(8,), dropout=0.0, num_heads=2, context_dim=CTX, layout_classes=K,
                layout_max_objects=4)
    base.update(overrides)
    return UNetConfig(**base)


def build(cfg: UNetConfig, seed: int = 0, randomize: bool = True) -> UNet:
    """The cross-attention tests' UNet (zero-initialised projections randomised), in eval mode."""
    return build_unet(cfg, seed, randomize).eval()


def layout(b: int = 2, n: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xy0 = torch.rand(b, n, 2, generator=g) * 0.5
    boxes = torch.cat([xy0, xy0 + 0.1 + torch.rand(b, n, 2, generator=g) * 0.4], dim=-1)  # (B, N, 4)
    labels = torch.randint(0, K, (b, n), generator=g)
    labels[1, -1] = -1  # one padding row
    return boxes, labels


def xt(b: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 16, 16, generator=g), torch.randint(0, 1000, (b,), generator=g)


# --- LayoutEncoder ------------------------------------------------------------------------------------------
def encoder(**kw) -> LayoutEncoder:
    torch.manual_seed(0)
    return LayoutEncoder(K, 16, max_objects=4, hidden=32, **kw)


def test_encoder_shapes_and_mask() -> None:
    enc = encoder()
    boxes, labels = layout()
    tokens, mask = enc(boxes, labels)
    assert tokens.shape == (2, 4, 16) and mask.shape == (2, 4) and mask.dtype == torch.bool
    assert mask[:, 0].all(), "the null token is always valid"
    assert torch.equal(mask[:, 1:], labels >= 0)
    assert torch.equal(tokens[1, -1], torch.zeros(16)), "an absent object's token is zero"
    assert torch.equal(tokens[:, 0], enc.null_token.detach().expand(2, 16))
    assert (tokens[0, 1:].abs().sum(-1) > 0).all()


def test_no_objects_keeps_the_null_token() -> None:
    enc = encoder()
    tokens, mask = enc(torch.zeros(2, 0, 4), torch.zeros(2, 0, dtype=torch.long))
    assert tokens.shape == (2, 1, 16) and mask.all()
    tokens, mask = enc(torch.full((2, 3, 4), -1.0), torch.full((2, 3), -1))  # all padding (pixel-style -1 boxes)
    assert mask[:, 0].all() and not mask[:, 1:].any()
    assert torch.equal(tokens[:, 1:], torch.zeros(2, 3, 16))


def test_padding_rows_are_ignored_even_when_nan() -> None:
    enc = encoder()
    boxes, labels = layout()
    tokens, _ = enc(boxes, labels)
    boxes2 = boxes.clone()
    boxes2[1, -1] = float("nan")  # padding row: its box is never read
    boxes2.requires_grad_(True)
    tokens2, _ = enc(boxes2, labels)
    assert torch.equal(tokens, tokens2.detach())
    tokens2.sum().backward()
    assert torch.isfinite(boxes2.grad).all()


def test_object_tokens_are_permutation_equivariant() -> None:
    enc = encoder()
    boxes, labels = layout()
    perm = torch.tensor([2, 0, 1])
    tokens, mask = enc(boxes, labels)
    tokens_p, mask_p = enc(boxes[:, perm], labels[:, perm])
    torch.testing.assert_close(tokens_p[:, 1:], tokens[:, 1:][:, perm])
    assert torch.equal(mask_p[:, 1:], mask[:, 1:][:, perm])
    torch.testing.assert_close(tokens_p[:, 0], tokens[:, 0])


def test_tokens_depend_on_box_and_class() -> None:
    enc = encoder()
    boxes, labels = layout()
    tokens, _ = enc(boxes, labels)
    moved = boxes.clone()
    moved[0, 0, [0, 2]] += 0.05
    assert not torch.allclose(enc(moved, labels)[0][0, 1], tokens[0, 1])
    relabelled = labels.clone()
    relabelled[0, 0] = (labels[0, 0] + 1) % K
    assert not torch.allclose(enc(boxes, relabelled)[0][0, 1], tokens[0, 1])
    torch.testing.assert_close(enc(moved, labels)[0][0, 2:], tokens[0, 2:])  # other objects untouched


def test_gradients_reach_every_encoder_parameter() -> None:
    enc = encoder()
    boxes, labels = layout()
    boxes.requires_grad_(True)
    tokens, _ = enc(boxes, labels)
    (tokens**2).sum().backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert boxes.grad[0].abs().sum() > 0


@pytest.mark.parametrize(
    "boxes, labels, match",
    [
        (torch.rand(2, 3), torch.zeros(2, 3, dtype=torch.long), r"boxes must be float \(B, N, 4\).*\(2, 3\)"),
        (torch.zeros(2, 3, 4, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), "boxes must be float"),
        (torch.rand(2, 3, 4), torch.zeros(2, 2, dtype=torch.long), r"box_labels must be integer \(2, 3\).*\(2, 2\)"),
        (torch.rand(2, 3, 4), torch.zeros(2, 3), r"box_labels must be integer.*torch.float32"),
        (torch.rand(2, 5, 4), torch.zeros(2, 5, dtype=torch.long), "5 objects per image, more than max_objects=4"),
        (torch.rand(2, 3, 4), torch.full((2, 3), K), rf"box_labels must be in \[0, {K - 1}\] or -1.*got {K}"),
        (torch.rand(2, 3, 4), torch.full((2, 3), -2), r"or -1 \(no object\), got -2"),
        (torch.rand(2, 3, 4) * 32, torch.zeros(2, 3, dtype=torch.long), r"fractions of the image in \[0, 1\].*pixel"),
        (torch.full((2, 3, 4), -0.1), torch.zeros(2, 3, dtype=torch.long), r"got values in \[-0.1"),
        (torch.full((2, 3, 4), float("nan")), torch.zeros(2, 3, dtype=torch.long), "finite"),
    ],
)
def test_encoder_refuses_bad_input_in_one_line(boxes, labels, match) -> None:
    with pytest.raises(ValueError, match=match) as info:
        encoder()(boxes, labels)
    assert "\n" not in str(info.value)


def test_encoder_tolerates_rounding_just_outside_the_unit_square() -> None:
    boxes = torch.tensor([[[-1e-4, 0.0, 1.0 + 1e-4, 1.0]]])
    tokens, _ = encoder()(boxes, torch.zeros(1, 1, dtype=torch.long))
    assert torch.isfinite(tokens).all()


@pytest.mark.parametrize("kw", [dict(num_classes=0), dict(dim=0), dict(max_objects=0), dict(hidden=0)])
def test_encoder_constructor_checks(kw) -> None:
    args = dict(num_classes=K, dim=16, max_objects=4, hidden=32) | kw
    with pytest.raises(ValueError, match=f"LayoutEncoder {next(iter(kw))} must be"):
        LayoutEncoder(**args)


# --- the UNet with layout -----------------------------------------------------------------------------------
def test_output_changes_with_the_boxes() -> None:
    model = build(tiny())
    x, t = xt()
    boxes, labels = layout()
    with torch.no_grad():
        out = model(x, t, boxes=boxes, box_labels=labels)
        moved = boxes.clone()
        moved[0, 0] = torch.tensor([0.6, 0.6, 0.9, 0.9])
        out_moved = model(x, t, boxes=moved, box_labels=labels)
        out_none = model(x, t)
    assert out.shape == (2, 3, 16, 16)
    assert not torch.allclose(out[0], out_moved[0], atol=1e-5)
    torch.testing.assert_close(out[1], out_moved[1])  # the other image's layout did not change
    assert not torch.allclose(out, out_none, atol=1e-5)


def test_layout_only_model_runs_without_context() -> None:
    model = build(tiny())
    x, t = xt()
    boxes, labels = layout()
    with torch.no_grad():
        out = model(x, t, context=None, boxes=boxes, box_labels=labels)
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all()


def test_no_boxes_equals_all_absent_labels() -> None:
    """Both are the classifier-free-guidance null: the null token alone (masked rows get no attention)."""
    model = build(tiny())
    x, t = xt()
    boxes, _ = layout()
    with torch.no_grad():
        out_none = model(x, t)
        out_absent = model(x, t, boxes=boxes, box_labels=torch.full((2, 3), -1))
        out_empty = model(x, t, boxes=torch.zeros(2, 0, 4), box_labels=torch.zeros(2, 0, dtype=torch.long))
    torch.testing.assert_close(out_absent, out_none, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_empty, out_none, atol=1e-5, rtol=1e-5)


def test_object_order_does_not_matter() -> None:
    model = build(tiny())
    x, t = xt()
    boxes, labels = layout()
    perm = torch.tensor([1, 2, 0])
    with torch.no_grad():
        a = model(x, t, boxes=boxes, box_labels=labels)
        b = model(x, t, boxes=boxes[:, perm], box_labels=labels[:, perm])
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_text_and_layout_together() -> None:
    model = build(tiny())
    x, t = xt()
    boxes, labels = layout()
    context = torch.randn(2, 5, CTX, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        both = model(x, t, context=context, boxes=boxes, box_labels=labels)
        masked = model(x, t, context=context, context_mask=torch.ones(2, 5, dtype=torch.bool), boxes=boxes,
                       box_labels=labels)
        layout_only = model(x, t, boxes=boxes, box_labels=labels)
        # text padding stays out of attention when the text mask says so
        padded = torch.cat([context, torch.randn(2, 2, CTX)], dim=1)
        pad_mask = torch.tensor([[True] * 5 + [False] * 2] * 2)
        both_padded = model(x, t, context=padded, context_mask=pad_mask, boxes=boxes, box_labels=labels)
    torch.testing.assert_close(both, masked)  # no text mask == an all-True text mask
    assert not torch.allclose(both, layout_only, atol=1e-5)
    torch.testing.assert_close(both_padded, both, atol=1e-5, rtol=1e-5)


def test_guidance_null_is_labels_minus_one() -> None:
    model = build(tiny())
    x, t = xt()
    boxes, labels = layout()
    guided = ClassifierFreeGuidance(model, 3.0, {"box_labels": -1})
    with torch.no_grad():
        out = guided(x, t, boxes=boxes, box_labels=labels)
        cond, uncond = model(x, t, boxes=boxes, box_labels=labels), model(x, t)
    torch.testing.assert_close(out, uncond + 3.0 * (cond - uncond), atol=1e-4, rtol=1e-4)


def test_gradients_reach_the_layout_encoder() -> None:
    model = build(tiny()).train()
    x, t = xt()
    boxes, labels = layout()
    model(x, t, boxes=boxes, box_labels=labels).square().mean().backward()
    for name, p in model.layout.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# Fingerprint of tiny(layout_classes=None) (a text model) built with seed 0, computed with unet.py as it was before
# layout existed: its state-dict keys, shapes and initial weights must not change.
_TEXT_KEYS_SHA = "b8fba10a3d86cd39a671715f789d889a19239df297204ddad25fd6b00b4442f9"
_TEXT_PARAMS_SHA = "3c69b89a7dcd4d9da15f93ea9a86fb443aa1d72eb115e8ef1dcc3da5a62099c3"


def _fingerprint(sd: dict) -> tuple[str, str]:
    h = hashlib.sha256()
    for k, v in sd.items():
        h.update(f"{k} {tuple(v.shape)}\n".encode())
    keys = h.hexdigest()
    for v in sd.values():
        h.update(v.numpy().tobytes())
    return keys, h.hexdigest()


def test_model_without_layout_keeps_its_state_dict() -> None:
    text = build(tiny(layout_classes=None), randomize=False)
    assert text.layout is None
    assert _fingerprint(text.state_dict()) == (_TEXT_KEYS_SHA, _TEXT_PARAMS_SHA)
    # The layout encoder is built last: everything else of a layout model is the text model's, init included.
    with_layout = build(tiny(), randomize=False).state_dict()
    rest = {k: v for k, v in with_layout.items() if not k.startswith("layout.")}
    assert list(rest) == list(text.state_dict())
    assert all(torch.equal(rest[k], v) for k, v in text.state_dict().items())
    assert any(k.startswith("layout.") for k in with_layout)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(context_dim=None), r"UNetConfig\.layout_classes: needs context_dim"),
        (dict(layout_classes=0), r"UNetConfig\.layout_classes: must be None or >= 1"),
        (dict(layout_max_objects=0), r"UNetConfig\.layout_max_objects: must be >= 1"),
    ],
)
def test_config_validation(overrides, match) -> None:
    with pytest.raises(ValueError, match=match):
        tiny(**overrides)


def test_config_round_trips_and_old_configs_load() -> None:
    cfg = tiny()
    assert from_dict(UNetConfig, to_dict(cfg)) == cfg
    old = {k: v for k, v in to_dict(tiny(layout_classes=None)).items() if not k.startswith("layout_")}
    assert from_dict(UNetConfig, old).layout_classes is None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(boxes=torch.rand(2, 3, 4)), "boxes given without box_labels"),
        (dict(box_labels=torch.zeros(2, 3, dtype=torch.long)), "box_labels given without boxes"),
        (dict(boxes=torch.rand(3, 3, 4), box_labels=torch.zeros(3, 3, dtype=torch.long)),
         r"boxes must be \(2, N, 4\).*got \(3, 3, 4\)"),
        (dict(boxes=torch.rand(2, 5, 4), box_labels=torch.zeros(2, 5, dtype=torch.long)), "more than max_objects=4"),
        (dict(boxes=torch.rand(2, 3, 4), box_labels=torch.full((2, 3), K)), r"box_labels must be in \[0, 5\]"),
        (dict(context_mask=torch.ones(2, 5, dtype=torch.bool)), "context_mask given without context"),
        (dict(context=torch.randn(2, 5, 16)), r"context must be \(2, L, 24\)"),
    ],
)
def test_bad_layout_input_raises_one_line(kwargs, match) -> None:
    model = build(tiny(), randomize=False)
    x, t = xt()
    with pytest.raises(ValueError, match=match) as info:
        model(x, t, **kwargs)
    assert "\n" not in str(info.value)


def test_boxes_for_a_model_without_layout_raise() -> None:
    model = build(tiny(layout_classes=None), randomize=False)
    x, t = xt()
    boxes, labels = layout()
    with pytest.raises(ValueError, match="layout_classes is None"):
        model(x, t, context=torch.randn(2, 5, CTX), boxes=boxes, box_labels=labels)
    with pytest.raises(ValueError, match="none given"):  # text models still need their context
        model(x, t)
