"""Checkpoints of openai/improved-diffusion and openai/guided-diffusion as pakhsh models.

Their `.pt` files hold a plain state dict in their layout (`input_blocks.N.P...`, `middle_block`, `output_blocks`,
`out`, `time_embed`, `label_emb`) and nothing else: what the network and the diffusion are comes from the flags
their scripts were run with (`--image_size 64 --num_channels 128 --learn_sigma True ...`). `openai_configs`
turns those flags into our UNetConfig + DiffusionConfig; `from_openai_state_dict` renames the tensors onto our
UNet, `to_openai_state_dict` the other way. The architectures are the same network, so the conversion is exact;
the one layout change is the fused qkv projection of attention: their (legacy) order is per head
[q_h | k_h | v_h], ours is [q | k | v], each head-major (guided-diffusion's `use_new_attention_order`).

The `.pt` file is read with `torch.load(weights_only=True)`: a file that needs more (pickled code) is refused.
"""

from __future__ import annotations

import json
import pickle
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..diffusion import DiffusionConfig, ModelOutput, VarianceType
from ..nets.unet import UNet, UNetConfig
from .unet_layout import RESBLOCK_PARTS, Block, qkv_from_head_major, qkv_to_head_major, walk_unet


class OpenAIFlagsError(ValueError):
    """A flag that is unknown, malformed, or describes a network pakhsh cannot build."""


class OpenAICheckpointError(ValueError):
    """A .pt file that is unsafe, unreadable, or does not fit the flags."""


# The flags of improved-diffusion's and guided-diffusion's model_and_diffusion_defaults(), with
# improved-diffusion's defaults (guided-diffusion only added flags; its rescale_timesteps default differs, but
# its released models use 1000 steps, where rescaling changes nothing).
DEFAULTS: dict[str, Any] = {
    "image_size": 64, "num_channels": 128, "num_res_blocks": 2, "num_heads": 4, "num_heads_upsample": -1,
    "num_head_channels": -1, "attention_resolutions": "16,8", "channel_mult": "", "dropout": 0.0,
    "learn_sigma": False, "sigma_small": False, "class_cond": False, "diffusion_steps": 1000,
    "noise_schedule": "linear", "timestep_respacing": "", "use_kl": False, "predict_xstart": False,
    "rescale_timesteps": True, "rescale_learned_sigmas": True, "use_checkpoint": False,
    "use_scale_shift_norm": True, "resblock_updown": False, "use_fp16": False, "use_new_attention_order": False,
}  # fmt: skip

# Flags of their sampling/training scripts that say nothing about the network or the diffusion: accepted so a
# pasted command line works, and ignored (pakhsh has its own --steps, --batch-size, ...).
IGNORED = frozenset({
    "batch_size", "num_samples", "use_ddim", "clip_denoised", "model_path", "classifier_path", "classifier_scale",
    "microbatch", "lr", "weight_decay", "lr_anneal_steps", "ema_rate", "log_interval", "save_interval",
    "resume_checkpoint", "data_dir", "schedule_sampler", "fp16_scale_growth", "classifier_use_fp16",
    "classifier_width", "classifier_depth", "classifier_attention_resolutions", "classifier_use_scale_shift_norm",
    "classifier_resblock_updown", "classifier_pool",
})  # fmt: skip

# Default channel_mult per image size when --channel_mult is "" (both repositories' create_model)
CHANNEL_MULT = {256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4), 32: (1, 2, 2, 2)}


@dataclass
class OpenAIConfig:
    """What the flags say: our network and diffusion configs plus how their model was called."""

    unet: UNetConfig
    diffusion: DiffusionConfig
    rescale_timesteps: bool  # the network saw t * 1000 / T instead of t
    new_attention_order: bool  # guided-diffusion's use_new_attention_order (qkv already in our order)
    flags: dict[str, Any]


# ---------------------------------------------------------------------------------------------- flags
def _str2bool(name: str, text: Any) -> bool:
    if isinstance(text, bool):
        return text
    low = str(text).lower()
    if low in ("yes", "true", "t", "y", "1"):
        return True
    if low in ("no", "false", "f", "n", "0"):
        return False
    raise OpenAIFlagsError(f"--{name}: expected True or False, got {text!r}")


def _coerce(name: str, value: Any) -> Any:
    """A flag value to the type of its default, as their argparse does."""
    default = DEFAULTS[name]
    if isinstance(default, bool):
        return _str2bool(name, value)
    try:
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
    except (TypeError, ValueError):
        raise OpenAIFlagsError(f"--{name}: expected a {type(default).__name__}, got {value!r}") from None
    return str(value)


def _tokens_to_dict(tokens: list[str]) -> dict[str, str]:
    """['--image_size', '64', '--learn_sigma=True'] -> {'image_size': '64', 'learn_sigma': 'True'}."""
    out: dict[str, str] = {}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--"):
            raise OpenAIFlagsError(f"expected a flag such as --image_size, got {tok!r}")
        if "=" in tok:
            key, value = tok[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(tokens):
                raise OpenAIFlagsError(f"{tok} has no value")
            key, value = tok[2:], tokens[i + 1]
            i += 2
        out[key.replace("-", "_")] = value
    return out


def parse_openai_flags(spec: str | dict[str, Any]) -> dict[str, Any]:
    """Their flags from a dict, a JSON file (an object), a text file of flags, or a string of flags.

    Returns every model/diffusion flag (defaults filled in) with their types; unknown flags raise, naming the flag.
    """
    if isinstance(spec, dict):
        raw: dict[str, Any] = dict(spec)
    else:
        text, where = spec, "--openai-flags"
        path = Path(spec)
        if len(spec) < 4096 and not spec.lstrip().startswith("-") and path.is_file():
            text, where = path.read_text(), str(path)
        if text.lstrip().startswith("{"):
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as e:
                raise OpenAIFlagsError(f"{where}: not valid JSON: {e}") from None
            if not isinstance(raw, dict):
                raise OpenAIFlagsError(f"{where}: JSON must be an object of flag: value")
        else:
            raw = _tokens_to_dict(shlex.split(text, comments=True))
    flags = dict(DEFAULTS)
    for key, value in raw.items():
        name = str(key).lstrip("-").replace("-", "_")
        if name in IGNORED:
            continue
        if name not in DEFAULTS:
            raise OpenAIFlagsError(f"unknown improved/guided-diffusion flag --{name}; known: {', '.join(DEFAULTS)}")
        flags[name] = _coerce(name, value)
    return flags


def _channel_mult(flags: dict[str, Any]) -> tuple[int, ...]:
    text = str(flags["channel_mult"]).strip()
    if not text:
        size = flags["image_size"]
        if size not in CHANNEL_MULT:
            raise OpenAIFlagsError(f"--image_size {size}: no default channel_mult for this size "
                                   f"(defaults exist for {sorted(CHANNEL_MULT)}); give --channel_mult")
        return CHANNEL_MULT[size]
    try:
        return tuple(int(m) for m in text.split(","))
    except ValueError:
        raise OpenAIFlagsError(f"--channel_mult {text}: pakhsh needs whole-number multipliers "
                               "(guided-diffusion's 512 model starts at 0.5, which it cannot build)") from None


def _attention_resolutions(flags: dict[str, Any], levels: int) -> tuple[int, ...]:
    """Their --attention_resolutions are resolutions; ones no level has are silently unused there, so here too."""
    try:
        wanted = [int(r) for r in str(flags["attention_resolutions"]).split(",") if r.strip()]
    except ValueError:
        raise OpenAIFlagsError(f"--attention_resolutions {flags['attention_resolutions']!r}: "
                               "expected comma-separated numbers such as 16,8") from None
    reachable = {flags["image_size"] // 2**i for i in range(levels)}
    return tuple(r for r in wanted if r in reachable)


def openai_configs(flags: dict[str, Any] | str) -> OpenAIConfig:
    """Their flags -> our UNetConfig + DiffusionConfig (errors name the flag)."""
    f = parse_openai_flags(flags) if not isinstance(flags, dict) or set(flags) != set(DEFAULTS) else flags
    mult = _channel_mult(f)
    heads_up = f["num_heads_upsample"]
    if f["num_head_channels"] == -1 and heads_up not in (-1, f["num_heads"]):
        raise OpenAIFlagsError(f"--num_heads_upsample {heads_up}: pakhsh's UNet uses one head count "
                               f"(--num_heads {f['num_heads']}) in the encoder and decoder")
    if f["noise_schedule"] not in ("linear", "cosine"):
        raise OpenAIFlagsError(f"--noise_schedule {f['noise_schedule']}: use linear or cosine")
    try:
        unet = UNetConfig(
            image_size=f["image_size"], in_channels=3, model_channels=f["num_channels"], out_channels=3,
            num_res_blocks=f["num_res_blocks"], attention_resolutions=_attention_resolutions(f, len(mult)),
            channel_mult=mult, dropout=f["dropout"], num_classes=1000 if f["class_cond"] else None,
            learn_sigma=f["learn_sigma"], num_heads=f["num_heads"], num_head_channels=f["num_head_channels"],
            use_scale_shift_norm=f["use_scale_shift_norm"], resblock_updown=f["resblock_updown"], num_groups=32,
        )  # fmt: skip
    except ValueError as e:
        raise OpenAIFlagsError(f"these flags describe a network pakhsh cannot build: {e}") from None
    return OpenAIConfig(unet, _diffusion_config(f), f["rescale_timesteps"], f["use_new_attention_order"], f)


def _diffusion_config(f: dict[str, Any]) -> DiffusionConfig:
    """improved-diffusion's create_gaussian_diffusion, in our terms."""
    if f["learn_sigma"]:
        variance = VarianceType.LEARNED_RANGE
    else:
        variance = VarianceType.FIXED_SMALL if f["sigma_small"] else VarianceType.FIXED_LARGE
    loss = "rescaled_kl" if f["use_kl"] else ("hybrid" if f["learn_sigma"] else "simple")
    return DiffusionConfig(num_steps=f["diffusion_steps"], schedule=f["noise_schedule"],
                           model_output=ModelOutput.X0 if f["predict_xstart"] else ModelOutput.EPS,
                           variance=variance, loss=loss)


# ---------------------------------------------------------------------------------------------- key layout
_RES = dict(zip(RESBLOCK_PARTS, ("in_layers.0", "in_layers.2", "emb_layers.1", "out_layers.0", "out_layers.3",
                                 "skip_connection")))
_TOP = {"time_embed.0": "time_embed.0", "time_embed.2": "time_embed.2", "label_emb": "label_emb",
        "conv_in": "input_blocks.0.0", "norm_out": "out.0", "conv_out": "out.2"}


def _their_prefix(b: Block) -> str:
    if b.section == "down":
        return f"input_blocks.{b.step + 1}.{b.pos}"
    if b.section == "mid":
        return f"middle_block.{b.pos}"
    return f"output_blocks.{b.step}.{b.pos}"


def _local_names(b: Block) -> dict[str, str]:
    """Our local tensor name -> theirs, for one block (attention qkv/proj_out are reshaped as well)."""
    names: dict[str, str] = {}
    for local in b.module.state_dict():
        part, _, leaf = local.rpartition(".")
        if b.role == "attn":
            names[local] = local  # norm, qkv, proj_out: same names
        elif part in _RES:
            names[local] = f"{_RES[part]}.{leaf}"
        elif part == "conv":  # Downsample's conv is their `op`, Upsample's conv is their `conv`
            names[local] = f"{'op' if b.role == 'down' else 'conv'}.{leaf}"
        else:
            raise KeyError(f"no improved-diffusion name for {b.ours}.{local}")
    return names


def openai_key_map(net: UNet) -> dict[str, str]:
    """Every tensor name of our UNet -> its name in improved-diffusion's UNetModel."""
    out: dict[str, str] = {}
    for key in net.state_dict():
        prefix = key.rsplit(".", 1)[0]
        if prefix in _TOP:
            out[key] = f"{_TOP[prefix]}.{key.rsplit('.', 1)[1]}"
    for b in walk_unet(net):
        for local, theirs in _local_names(b).items():
            out[f"{b.ours}.{local}"] = f"{_their_prefix(b)}.{theirs}"
    return out


def _attention_heads(net: UNet) -> dict[str, int]:
    """Our attention block prefix -> its head count (needed to reorder qkv)."""
    return {b.ours: b.module.num_heads for b in walk_unet(net) if b.role == "attn"}


def _attention_layer(key: str, heads: dict[str, int]) -> tuple[str, str]:
    """("down.3.1", "qkv") for "down.3.1.qkv.weight" of an attention block; ("", "") for any other tensor."""
    parts = key.split(".")
    block = ".".join(parts[:-2])
    if block in heads and parts[-2] in ("qkv", "proj_out"):
        return block, parts[-2]
    return "", ""


def to_openai_state_dict(net: UNet, *, new_attention_order: bool = False,
                         null_class: bool = False) -> dict[str, Tensor]:
    """Our UNet's weights in improved-diffusion's layout (label_emb without our null row unless `null_class`)."""
    heads = _attention_heads(net)
    own = net.state_dict()
    out: dict[str, Tensor] = {}
    for ours, theirs in openai_key_map(net).items():
        t = own[ours].detach().clone()
        block, layer = _attention_layer(ours, heads)
        if layer == "qkv" and not new_attention_order:
            t = qkv_to_head_major(t, heads[block])
        if layer and t.ndim == 2:
            t = t.unsqueeze(-1)  # their qkv and proj_out are 1x1 conv1d: (out, in, 1)
        if ours == "label_emb.weight" and not null_class:
            t = t[:-1]
        out[theirs] = t
    return out


def from_openai_state_dict(state: dict[str, Tensor], net: UNet, *, new_attention_order: bool = False,
                           where: str = "checkpoint") -> dict[str, Tensor]:
    """Their state dict -> ours for `net` (built from the same flags). Keys that are missing, unexpected or
    mis-shaped raise OpenAICheckpointError naming them and `where`."""
    key_map = openai_key_map(net)
    own = net.state_dict()
    heads = _attention_heads(net)
    _check_keys(state, set(key_map.values()), where)
    out: dict[str, Tensor] = {}
    bad: list[str] = []
    for ours, theirs in key_map.items():
        t = state[theirs].float()
        block, layer = _attention_layer(ours, heads)
        if layer and t.ndim == 3:
            t = t.squeeze(-1)
        if layer == "qkv" and not new_attention_order and t.shape[0] % (3 * heads[block]) == 0:
            t = qkv_from_head_major(t, heads[block])
        if ours == "label_emb.weight" and t.shape[0] == own[ours].shape[0] - 1:
            t = torch.cat([t, torch.zeros_like(t[:1])])  # our null-class row: unused (their models have none)
        if t.shape != own[ours].shape:
            bad.append(f"{theirs}: {tuple(state[theirs].shape)} vs flags {tuple(own[ours].shape)}")
        out[ours] = t
    if bad:
        raise OpenAICheckpointError(f"{where} does not fit the flags (check --num_channels, --channel_mult, "
                                    f"--num_res_blocks, --learn_sigma, --class_cond): {'; '.join(bad[:5])}")
    return out


def _check_keys(state: dict[str, Tensor], expected: set[str], where: str) -> None:
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {', '.join(unexpected[:6])}{' ...' if len(unexpected) > 6 else ''}")
        raise OpenAICheckpointError(f"{where} does not fit the flags (check --attention_resolutions, "
                                    f"--num_res_blocks, --channel_mult, --resblock_updown, --class_cond): "
                                    + "; ".join(parts))


# ---------------------------------------------------------------------------------------------- loading
class OpenAIModel(nn.Module):
    """Our UNet called as their model was: t scaled by 1000 / T when they trained with rescale_timesteps."""

    def __init__(self, net: UNet, time_scale: float = 1.0) -> None:
        super().__init__()
        self.net = net
        self.time_scale = float(time_scale)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """x: (B, C, H, W), t: (B,) training steps, y: (B,) labels or None -> (B, C or 2C, H, W)."""
        if self.time_scale != 1.0:
            t = t.float() * self.time_scale
        return self.net(x, t, y)


def read_openai_state_dict(path: str | Path) -> dict[str, Tensor]:
    """A .pt state dict read with weights_only=True; a wrapped {'state_dict': ...} and DDP 'module.' are undone."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise OpenAICheckpointError(f"{p} is not a plain state dict: it contains pickled code/objects that "
                                    "pakhsh will not execute") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise OpenAICheckpointError(f"{p} is not a readable .pt file: {str(e).splitlines()[0][:120]}") from None
    if isinstance(obj, dict) and not any(isinstance(v, Tensor) for v in obj.values()):
        obj = next((obj[k] for k in ("state_dict", "model", "ema") if isinstance(obj.get(k), dict)), obj)
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise OpenAICheckpointError(f"{p} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_openai_checkpoint(path: str | Path, flags: dict[str, Any] | str) -> tuple[OpenAIModel, OpenAIConfig]:
    """An improved/guided-diffusion .pt checkpoint + its flags -> our UNet (wrapped for their time scale)."""
    cfg = openai_configs(flags)
    state = read_openai_state_dict(path)
    if cfg.unet.num_classes is not None and "label_emb.weight" in state:
        cfg.unet.num_classes = int(state["label_emb.weight"].shape[0])  # their NUM_CLASSES, usually 1000
    net = UNet(cfg.unet)
    net.load_state_dict(from_openai_state_dict(state, net, new_attention_order=cfg.new_attention_order,
                                               where=str(path)))
    scale = 1000.0 / cfg.diffusion.num_steps if cfg.rescale_timesteps else 1.0
    return OpenAIModel(net, scale).eval(), cfg
