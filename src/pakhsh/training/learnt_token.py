"""The identifier's learnt input embedding (textual inversion, Gal et al. 2022), as DreamBooth's train_token uses it.

The text encoder stays frozen; the vocabulary rows of the identifier's tokenizer pieces are replaced by learnt
vectors (`encode_with_token`, differentiable in them). A model that learnt them keeps them as its UNet's
`dreambooth_token` weight (so optimizer, EMA, checkpoints and resume carry it), and `TokenTextEncoder` feeds them
to the encoder at generation time.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .experiment import DreamBoothConfig, ExperimentConfig

TOKEN_PARAM = "dreambooth_token"  # the learnt input embedding of the identifier's pieces (dreambooth.train_token)


def token_pieces(tokenizer: Any, token: str) -> list[str]:
    """What the text encoder's tokenizer makes of the identifier (MiniLM: "sks" -> ["sk", "##s"])."""
    return [str(p) for p in tokenizer.tokenize(token)]


def piece_ids(text_encoder: Any, db: DreamBoothConfig) -> list[int]:
    """The vocabulary ids of the identifier's tokenizer pieces."""
    return [int(i) for i in text_encoder.tokenizer.convert_tokens_to_ids(token_pieces(text_encoder.tokenizer,
                                                                                      db.token))]


def encode_with_token(text_encoder: Any, prompts: list[str], ids: list[int], embeds: Tensor) -> tuple[Tensor, Tensor]:
    """Prompts through the frozen encoder with every occurrence of the identifier's pieces `ids` (in order) fed the
    learnt input embeddings `embeds` (pieces, width) instead of the vocabulary's: (tokens (B, L, D), mask (B, L)),
    differentiable in `embeds`. With `embeds` equal to the vocabulary rows this is the encoder's own encoding."""
    L = text_encoder.max_length
    batch = text_encoder.tokenizer(prompts, padding="max_length", truncation=True, max_length=L, return_tensors="pt")
    device = embeds.device
    tok = batch["input_ids"].to(device)
    mask = batch["attention_mask"].to(device).bool()
    p = len(ids)
    hit = torch.zeros(tok.shape, dtype=torch.bool, device=device)
    which = torch.zeros(tok.shape, dtype=torch.long, device=device)
    want = torch.tensor(ids, device=device)
    for j in range(tok.shape[1] - p + 1):  # every start where the pieces follow each other
        at = (tok[:, j:j + p] == want).all(1)
        for k in range(p):
            hit[:, j + k] |= at
            which[:, j + k] = torch.where(at, k, which[:, j + k])
    model = text_encoder.model
    words = model.get_input_embeddings()(tok)
    words = torch.where(hit[..., None], embeds.to(words.dtype)[which], words)
    states = model(inputs_embeds=words, attention_mask=mask.long()).last_hidden_state
    return states.float() * mask.unsqueeze(-1), mask


class TokenTextEncoder(nn.Module):
    """The frozen text encoder with the identifier's learnt input embedding (the `dreambooth_token` weight of
    `owner`, read at every call, so it follows the net's device and weights): what a train_token model generates
    with. `encode` as TextEncoder's."""

    def __init__(self, text_encoder: Any, ids: list[int], owner: nn.Module) -> None:
        super().__init__()
        self.inner, self.ids = text_encoder, ids
        object.__setattr__(self, "_owner", owner)  # not a submodule: the net is moved and saved on its own

    @property
    def tokenizer(self) -> Any:
        return self.inner.tokenizer

    @property
    def config(self) -> Any:
        return self.inner.config

    @property
    def dim(self) -> int:
        return self.inner.dim

    @property
    def max_length(self) -> int:
        return self.inner.max_length

    @property
    def device(self) -> torch.device:
        return self.inner.device

    def encode(self, prompts: list[str]) -> Any:
        from ..conditioning.text import TextEmbedding

        emb = self.inner.encode(prompts)  # the checks, the truncation flags; replaced where the token occurs
        with torch.no_grad():
            embeds = getattr(self._owner, TOKEN_PARAM).detach().to(self.inner.device)
            tokens, mask = encode_with_token(self.inner, list(prompts), self.ids, embeds)
        return TextEmbedding(tokens=tokens, mask=mask, truncated=emb.truncated)


def with_learnt_token(text_encoder: Any, cfg: ExperimentConfig, net: nn.Module) -> Any:
    """The text encoder a DreamBooth model generates with: wrapped when it learnt its token's embedding."""
    db = cfg.dreambooth
    if db is None or not db.train_token:
        return text_encoder
    return TokenTextEncoder(text_encoder, piece_ids(text_encoder, db), net)
