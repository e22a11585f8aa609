"""LoRA (Hu et al. 2021) on pakhsh's UNet through `peft`, and the adapters in diffusers' layout.

`inject_lora` puts rank-r adapters on every attention projection of the UNet's transformer blocks (self-attention
qkv and output, cross-attention q, kv and output) and leaves only them trainable. `lora_weights` reads them back
under our module names with the scale alpha / r folded into B (the delta is B @ A); `lora_to_diffusers` and
`lora_from_diffusers` convert to and from the state dict diffusers' `load_lora_weights` reads (keys
`unet.<diffusers module>.lora_A/B.weight`; a fused q/k/v projection becomes to_q / to_k / to_v sharing A, each
with its rows of B: the same delta); `set_lora_weights` loads them into a wrapped net. DreamBooth
(training/dreambooth.py) is the first user; nothing here knows about it.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

LORA_TARGETS = r".*\.blocks\.\d+\.attn[12]\.(qkv|q|kv|out)"  # peft regex over our UNet's module names
LORA_FILE = "pytorch_lora_weights.safetensors"  # what diffusers' load_lora_weights reads
# our attention projections -> diffusers' (a fused projection becomes several)
_DIFFUSERS_PROJ = {"attn1.qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"), "attn1.out": ("attn1.to_out.0",),
                   "attn2.q": ("attn2.to_q",), "attn2.kv": ("attn2.to_k", "attn2.to_v"),
                   "attn2.out": ("attn2.to_out.0",)}


class LoraError(ValueError):
    """Adapters that do not fit a net (keys, shapes, rank, layout); the message names what and where."""


def inject_lora(unet: nn.Module, rank: int, alpha: float | None = None) -> nn.Module:
    """Add rank-r LoRA adapters (peft) to every attention projection of the UNet's transformer blocks, in place;
    only the adapters stay trainable. B starts at zero, so the net computes what it computed before."""
    from peft import LoraConfig, inject_adapter_in_model

    if not any(re.fullmatch(LORA_TARGETS, n) for n, _ in unet.named_modules()):
        raise LoraError("LoRA: the UNet has no transformer blocks to put adapters on "
                              "(model.context_dim is null)")
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, target_modules=LORA_TARGETS,
                        lora_dropout=0.0, bias="none")
    return inject_adapter_in_model(config, unet)


def base_key(key: str) -> str:
    """A (LoRA-wrapped) net's key -> the plain UNet's key: `x.qkv.base_layer.weight` -> `x.qkv.weight`."""
    return key.replace(".base_layer.", ".")


def is_lora_key(key: str) -> bool:
    return ".lora_A." in key or ".lora_B." in key


def lora_weights(net: nn.Module) -> dict[str, Tensor]:
    """The adapters of a LoRA-wrapped UNet under our module names: `<module>.lora_A.weight` (r, in) and
    `<module>.lora_B.weight` (out, r), with the scale alpha / r folded into B (so the delta is B @ A)."""
    scales: dict[str, float] = {}
    for name, module in net.named_modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, dict) and "default" in scaling:
            scales[name] = float(scaling["default"])
    out = {}
    for key, value in net.state_dict().items():
        if not is_lora_key(key):
            continue
        module, rest = key.split(".lora_", 1)
        which = rest.split(".", 1)[0]  # A or B
        v = value.detach().float().cpu()
        out[f"{module}.lora_{which}.weight"] = v * scales[module] if which == "B" else v.clone()
    if not out:
        raise LoraError("this net has no LoRA adapters")
    return out


def _attention_prefixes(unet: nn.Module) -> dict[str, str]:
    """Our SpatialTransformer prefixes (`down.1.1`) -> diffusers' (`down_blocks.0.attentions.0`)."""
    from ..interop.diffusers import _diffusers_prefix
    from ..interop.unet_layout import walk_unet

    return {b.ours: _diffusers_prefix(b) for b in walk_unet(unet) if b.role == "attn"}


_OUR_LORA_KEY = re.compile(r"(?P<block>.+)\.blocks\.(?P<i>\d+)\.(?P<proj>attn[12]\.(?:qkv|q|kv|out))\.lora_(?P<ab>[AB])"
                           r"\.weight")


def lora_to_diffusers(unet: nn.Module, lora: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our adapters (`lora_weights`) -> diffusers' UNet2DConditionModel LoRA state dict (prefix `unet.`). A fused
    projection's adapter (A, B) becomes one per part, each with the same A and its rows of B: the same delta."""
    prefixes = _attention_prefixes(unet)
    out: dict[str, Tensor] = {}
    for key, value in lora.items():
        m = _OUR_LORA_KEY.fullmatch(key)
        if m is None or m["block"] not in prefixes:
            raise LoraError(f"LoRA key {key!r} is not an adapter on an attention projection of this UNet")
        parts = _DIFFUSERS_PROJ[m["proj"]]
        pieces = value.chunk(len(parts), 0) if m["ab"] == "B" else [value] * len(parts)
        for part, piece in zip(parts, pieces):
            name = f"unet.{prefixes[m['block']]}.transformer_blocks.{m['i']}.{part}.lora_{m['ab']}.weight"
            out[name] = piece.contiguous().clone()
    return out


def lora_from_diffusers(unet: nn.Module, state: dict[str, Tensor], where: str = LORA_FILE) -> dict[str, Tensor]:
    """The inverse of `lora_to_diffusers`. The parts of one fused projection must share A (as our export writes
    them); adapters trained in diffusers with separate A's per part do not fit a fused projection at this rank."""
    back = {v: k for k, v in _attention_prefixes(unet).items()}
    key_re = re.compile(r"unet\.(?P<block>.+)\.transformer_blocks\.(?P<i>\d+)\.(?P<part>attn[12]\.(?:to_q|to_k|to_v|"
                        r"to_out\.0))\.lora_(?P<ab>[AB])\.weight")
    groups: dict[tuple[str, str, str], dict[str, Tensor]] = {}
    for key, value in state.items():
        m = key_re.fullmatch(key)
        if m is None or m["block"] not in back:
            raise LoraError(f"{where}: {key!r} is not a LoRA weight of an attention projection of this UNet")
        proj = next(p for p, parts in _DIFFUSERS_PROJ.items() if m["part"] in parts)
        groups.setdefault((f"{back[m['block']]}.blocks.{m['i']}.{proj}", proj, m["ab"]), {})[m["part"]] = value
    out: dict[str, Tensor] = {}
    for (module, proj, ab), found in groups.items():
        parts = _DIFFUSERS_PROJ[proj]
        lacking = [p for p in parts if p not in found]
        if lacking:
            raise LoraError(f"{where}: {module}: lacks the LoRA {ab} of {lacking[0]}")
        if ab == "B":
            out[f"{module}.lora_B.weight"] = torch.cat([found[p] for p in parts], 0)
        else:
            first = found[parts[0]]
            if any(not torch.equal(found[p], first) for p in parts[1:]):
                raise LoraError(f"{where}: {module}: the LoRA A of {', '.join(parts)} differ; a fused "
                                      "projection takes one A (export adapters with pakhsh)")
            out[f"{module}.lora_A.weight"] = first
    return out


def set_lora_weights(net: nn.Module, lora: dict[str, Tensor], where: str = LORA_FILE) -> None:
    """Load `lora_weights`-style adapters (scale folded into B) into a LoRA-wrapped net of the same rank."""
    own = net.state_dict()
    scales = {name: float(m.scaling["default"]) for name, m in net.named_modules()
              if isinstance(getattr(m, "scaling", None), dict) and "default" in m.scaling}
    targets = {}
    for key in own:
        if is_lora_key(key):
            module, rest = key.split(".lora_", 1)
            targets[f"{module}.lora_{rest.split('.', 1)[0]}.weight"] = key
    missing, extra = sorted(set(targets) - set(lora)), sorted(set(lora) - set(targets))
    if missing or extra:
        raise LoraError(f"{where}: the adapters do not fit the net: missing {missing[:2]}, unexpected "
                              f"{extra[:2]}")
    with torch.no_grad():
        for ours, key in targets.items():
            value = lora[ours]
            if value.shape != own[key].shape:
                raise LoraError(f"{where}: {ours} is {tuple(value.shape)}, the net's is {tuple(own[key].shape)} "
                                      "(another rank?)")
            module = key.split(".lora_", 1)[0]
            own[key].copy_(value / scales[module] if ".lora_B." in key else value)
