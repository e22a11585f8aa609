"""A CLIP tokenizer and text-model config written offline (no download): GPT-2/CLIP byte alphabet, a few merges,
the two special tokens. Shared by the text-encoder and Stable Diffusion tests."""

from __future__ import annotations

from typing import Any


def byte_alphabet() -> list[str]:
    """GPT-2 / CLIP's printable stand-ins for the 256 byte values, in their vocabulary order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs, extra = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return [chr(c) for c in cs]


def tiny_clip(max_positions: int, model_max_length: int | None = None) -> tuple[Any, Any]:
    """(CLIPTextConfig of a 2-layer, 32-wide text model, CLIPTokenizer) over the offline vocabulary."""
    from transformers import CLIPTextConfig, CLIPTokenizer

    # CLIP's vocabulary layout: bytes, bytes ending a word, merges, then the two special tokens.
    alphabet = byte_alphabet()
    vocab = {c: i for i, c in enumerate(alphabet + [c + "</w>" for c in alphabet])}
    merges = [("r", "e"), ("re", "d</w>"), ("c", "i")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    extra = {} if model_max_length is None else {"model_max_length": model_max_length}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, **extra)
    eot = vocab["<|endoftext|>"]
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=max_positions, bos_token_id=eot - 1,
                            eos_token_id=eot, pad_token_id=eot)
    return config, tokenizer
