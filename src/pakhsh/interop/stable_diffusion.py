"""Stable Diffusion from a local diffusers folder, run on pakhsh's own nets: `load_sd_folder(path)`.

A StableDiffusionPipeline folder (model_index.json; unet/ UNet2DConditionModel; vae/ AutoencoderKL; text_encoder/ +
tokenizer/ CLIP; scheduler/) becomes a `LatentDiffusionModel`: our ADM UNet with SpatialTransformers
(`nets.unet`), our `AutoencoderKL` (`nets.autoencoder`), a frozen CLIP prompt encoder and a `DiffusionConfig` from
the scheduler config. `pipelines.text_to_image.TextToImagePipeline` samples it with any pakhsh sampler.

Why the UNet maps exactly. SD's UNet2DConditionModel is the ADM layout with DDPM-style ResBlocks (the time
embedding is added before the second GroupNorm: `use_scale_shift_norm=False`), sinusoidal time features in
[cos | sin] order with no frequency shift (ours; [sin | cos] is mapped by swapping the first time-embedding
layer's input columns), conv resampling, and a SpatialTransformer wherever ADM has attention. SD 1.x's
`attention_head_dim` is really the head COUNT (diffusers keeps the misnomer); SD 2.x lists one count per level
with a constant head width, which maps to `num_head_channels`. Anything else is refused by name.

Nothing here downloads or needs diffusers itself: weights are read with safetensors (pickled .bin files are never
executed), CLIP with transformers. Every problem in a folder is collected and raised as ONE
`StableDiffusionFolderError` listing all of them. A safety checker or feature extractor is neither loaded nor run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..conditioning.text import TextEmbedding, _check_prompts
from ..diffusion import DiffusionConfig, VarianceType
from ..nets.autoencoder import AutoencoderKL, config_from_diffusers, from_diffusers_state
from ..nets.transformer import from_diffusers_transformer_state, to_diffusers_transformer_state
from ..nets.unet import UNet, UNetConfig
from .diffusers import _RES, _TOP, DiffusersFormatError, _diffusers_prefix, scheduler_settings
from .unet_layout import walk_unet

WEIGHTS = "diffusion_pytorch_model"  # diffusers' weight file stem (unet/, vae/)


class StableDiffusionFolderError(DiffusersFormatError):
    """A Stable Diffusion folder pakhsh cannot run; the one-line message lists every problem found."""


# ---------------------------------------------------------------------------------------------- the bundle
@dataclass
class LatentDiffusionModel:
    """Everything a latent text-to-image model needs: UNet over latents, VAE (with its scaling factor), prompt
    encoder (`conditioning.text.TextEncoder` or SD's `CLIPPromptEncoder`: `.encode(prompts) -> TextEmbedding`)
    and diffusion, plus how its source picks inference timesteps (see `pipelines.text_to_image`)."""

    unet: UNet  # (B, C_lat, h, w), t, context (B, L, D) -> eps / v
    vae: AutoencoderKL  # decode_latents(z) = decode(z / cfg.scaling_factor)
    text_encoder: Any
    diffusion: DiffusionConfig
    latent_size: tuple[int, int]  # (h, w) the UNet was trained at (unet sample_size)
    clip_denoised: bool = False  # clamp predicted x_0 to [-1, 1] (clip_sample; SD: False, latents exceed it)
    timestep_spacing: str | None = None  # a diffusers scheduler's "leading" | "trailing" | "linspace"; None: pakhsh's
    steps_offset: int = 0  # added to "leading" timesteps (SD ships 1)
    set_alpha_to_one: bool = True  # the scheduler's DDIM ends on abar = 1 (pakhsh's samplers always do)
    path: Path | None = None
    config: Any = None  # pakhsh-trained models: the ExperimentConfig (its `condition` says what the UNet takes)

    @property
    def vae_factor(self) -> int:
        """f: image pixels per latent pixel along each axis."""
        return self.vae.cfg.downsample_factor

    @property
    def latent_channels(self) -> int:
        return self.unet.cfg.in_channels

    def to(self, device: str | torch.device) -> "LatentDiffusionModel":
        """Move the three networks (in place) and return self."""
        for net in (self.unet, self.vae, self.text_encoder):
            if isinstance(net, nn.Module):
                net.to(device)
        return self


# ---------------------------------------------------------------------------------------------- small helpers
def _listed(items: list[str], limit: int = 6) -> str:
    """'a, b, c' or 'a, b, ... (N in all)': a wrong file can mismatch hundreds of keys."""
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown}, ... ({len(items)} in all)"


def _read_json(path: Path, problems: list[str]) -> dict[str, Any] | None:
    if not path.is_file():
        problems.append(f"{path} is missing")
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        problems.append(f"{path} is not readable JSON ({e})")
        return None
    if not isinstance(data, dict):
        problems.append(f"{path} is not a JSON object")
        return None
    return data


def _load_weights(folder: Path, stem: str, problems: list[str]) -> dict[str, Tensor] | None:
    """`stem`.safetensors or its sharded index, as float32 tensors; None (and a problem) when unreadable."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    single, index = folder / f"{stem}.safetensors", folder / f"{stem}.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        weight_map = (_read_json(index, problems) or {}).get("weight_map")
        if not isinstance(weight_map, dict):
            problems.append(f"{index} has no weight_map")
            return None
        files = [folder / name for name in sorted(set(weight_map.values()))]
    else:
        pickled = " (pickled .bin weights are never loaded: re-save with safe_serialization=True)" \
            if (folder / f"{stem}.bin").exists() else ""
        problems.append(f"{single} is missing{pickled}")
        return None
    sd: dict[str, Tensor] = {}
    for f in files:
        try:
            sd.update(load_file(str(f)))
        except (OSError, SafetensorError, ValueError) as e:
            problems.append(f"{f} is not a readable safetensors file ({str(e).strip().splitlines()[0]})")
            return None
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


def _fit(expected: dict[str, Tensor], got: dict[str, Tensor], file: Path,
         name: Callable[[str], str] = lambda k: k) -> list[str]:
    """Missing weights and shape mismatches of `got` (our keys) against a freshly built net's state dict."""
    problems = []
    missing = [name(k) for k in expected if k not in got]
    if missing:
        problems.append(f"{file} lacks {_listed(missing)}")
    wrong = [f"{name(k)} is {tuple(v.shape)} but config.json needs {tuple(expected[k].shape)}"
             for k, v in got.items() if k in expected and v.shape != expected[k].shape]
    if wrong:
        problems.append(f"{file}: shape mismatch: {_listed(wrong, 4)}")
    return problems


# ---------------------------------------------------------------------------------------------- UNet config
# UNet2DConditionModel's defaults (diffusers 0.42): a config.json leaves out what equals them.
_UNET_DEFAULTS: dict[str, Any] = {
    "sample_size": None, "in_channels": 4, "out_channels": 4, "center_input_sample": False, "flip_sin_to_cos": True,
    "freq_shift": 0, "mid_block_type": "UNetMidBlock2DCrossAttn", "only_cross_attention": False,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2, "downsample_padding": 1, "mid_block_scale_factor": 1, "dropout": 0.0, "act_fn": "silu",
    "norm_num_groups": 32, "norm_eps": 1e-5, "cross_attention_dim": 1280, "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "attention_head_dim": 8, "num_attention_heads": None, "dual_cross_attention": False,
    "use_linear_projection": False, "class_embed_type": None, "addition_embed_type": None,
    "addition_time_embed_dim": None, "num_class_embeds": None, "upcast_attention": False,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
    "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None, "attention_type": "default", "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None, "cross_attention_norm": None, "addition_embed_type_num_heads": 64,
}  # fmt: skip
# Settings our UNet has one value of: diffusers' default. (Not upcast_attention: it only changes fp16 precision, and
# we compute attention in fp32, or in bf16 with an fp32 softmax. addition_embed_type_num_heads needs an
# addition_embed_type, which is refused.)
_UNET_FIXED = (
    "center_input_sample", "freq_shift", "mid_block_type", "only_cross_attention", "downsample_padding",
    "mid_block_scale_factor", "act_fn", "norm_eps", "reverse_transformer_layers_per_block", "encoder_hid_dim",
    "encoder_hid_dim_type", "dual_cross_attention", "class_embed_type", "addition_embed_type",
    "addition_time_embed_dim", "num_class_embeds", "resnet_time_scale_shift", "resnet_skip_time_act",
    "resnet_out_scale_factor", "time_embedding_type", "time_embedding_dim", "time_embedding_act_fn",
    "timestep_post_act", "time_cond_proj_dim", "conv_in_kernel", "conv_out_kernel",
    "projection_class_embeddings_input_dim", "attention_type", "class_embeddings_concat",
    "mid_block_only_cross_attention", "cross_attention_norm",
)  # fmt: skip
_ALSO_OK = {"only_cross_attention": ([False],), "mid_block_only_cross_attention": (False,)}


def _per_level(c: dict[str, Any], key: str, levels: int, where: str, problems: list[str]) -> list[Any] | None:
    """An int-or-list setting as one value per level."""
    value = c[key]
    values = list(value) if isinstance(value, (list, tuple)) else [value] * levels
    if len(values) != levels:
        problems.append(f"{where}: {key} has {len(values)} entries for {levels} levels")
        return None
    return values


def _shared(c: dict[str, Any], key: str, levels: int, where: str, problems: list[str]) -> Any:
    """The one value every level must share (our UNet has one of each)."""
    values = _per_level(c, key, levels, where, problems)
    if values is not None and len(set(values)) != 1:
        problems.append(f"{where}: {key}={values} differs between levels; pakhsh's UNet has one value")
        return None
    return None if values is None else values[0]


def _attention_levels(c: dict[str, Any], levels: int, where: str, problems: list[str]) -> list[bool] | None:
    """Which levels cross-attend, from down/up block types that must mirror each other."""
    down, up = list(c["down_block_types"]), list(c["up_block_types"])
    if len(down) != levels or len(up) != levels:
        problems.append(f"{where}: down_block_types/up_block_types need one entry per block_out_channels entry")
        return None
    attn = []
    for i, (d, u) in enumerate(zip(down, reversed(up))):
        if d not in ("CrossAttnDownBlock2D", "DownBlock2D") or u not in ("CrossAttnUpBlock2D", "UpBlock2D"):
            problems.append(f"{where}: block types {d!r}/{u!r} at level {i} are not supported "
                            "(CrossAttnDownBlock2D/CrossAttnUpBlock2D or DownBlock2D/UpBlock2D)")
            return None
        if (d == "CrossAttnDownBlock2D") != (u == "CrossAttnUpBlock2D"):
            problems.append(f"{where}: level {i} cross-attends on one side only ({d} vs {u})")
            return None
        attn.append(d == "CrossAttnDownBlock2D")
    return attn


def _heads(heads: list[int], widths: list[int], attn: list[bool], where: str,
           problems: list[str]) -> tuple[int, int] | None:
    """(num_heads, num_head_channels) giving every attention width (the middle's too) its diffusers head count."""
    used = {(widths[i], int(heads[i])) for i in range(len(widths)) if attn[i]} | {(widths[-1], int(heads[-1]))}
    counts = {h for _, h in used}
    if len(counts) == 1:  # SD 1.x: one head count everywhere
        return counts.pop(), -1
    dims = {w // h for w, h in used if w % h == 0}
    if len(dims) == 1 and all(w % h == 0 for w, h in used):  # SD 2.x: one head width everywhere
        return int(heads[-1]), dims.pop()
    problems.append(f"{where}: attention heads {sorted(used)} (width, heads) have neither one count nor one width")
    return None


def unet_config_from_diffusers(config: dict[str, Any], where: str = "unet/config.json") -> tuple[UNetConfig | None,
                                                                                                     list[str]]:
    """A UNet2DConditionModel config -> (UNetConfig, []) or (None, every problem found)."""
    problems: list[str] = []
    if config.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        problems.append(f"{where}: _class_name={config['_class_name']!r} is not UNet2DConditionModel")
    unknown = sorted(k for k in config if not k.startswith("_") and k not in _UNET_DEFAULTS)
    if unknown:
        problems.append(f"{where}: unknown setting(s) {', '.join(unknown)}")
    c = {**_UNET_DEFAULTS, **config}
    for key in _UNET_FIXED:
        if c[key] != _UNET_DEFAULTS[key] and c[key] not in _ALSO_OK.get(key, ()):
            problems.append(f"{where}: {key}={c[key]!r} is not supported (only {_UNET_DEFAULTS[key]!r})")
    widths = [int(w) for w in c["block_out_channels"]]
    levels = len(widths)
    if not widths or any(w % widths[0] for w in widths):
        problems.append(f"{where}: block_out_channels={widths} must be multiples of its first entry")
        return None, problems
    if c["in_channels"] != c["out_channels"]:
        problems.append(f"{where}: in_channels={c['in_channels']} != out_channels={c['out_channels']} (inpainting "
                        "and depth UNets take extra input channels; not supported)")
    if c["norm_num_groups"] is None:
        problems.append(f"{where}: norm_num_groups=None (no output GroupNorm) is not supported")
    size = c["sample_size"]
    if size is None:
        problems.append(f"{where}: sample_size is missing")
    layers = _shared(c, "layers_per_block", levels, where, problems)
    depth = _shared(c, "transformer_layers_per_block", levels, where, problems)
    context_dim = _shared(c, "cross_attention_dim", levels, where, problems)
    # SD 1.x's attention_head_dim is the head COUNT per level (diffusers' misnomer); num_attention_heads wins if set
    heads = _per_level(c, "num_attention_heads" if c["num_attention_heads"] else "attention_head_dim", levels,
                       where, problems)
    attn = _attention_levels(c, levels, where, problems)
    head_cfg = _heads(heads, widths, attn, where, problems) if heads and attn else None
    if problems:
        return None, problems
    image_size = int(size) if isinstance(size, int) else int(size[0])
    try:
        cfg = UNetConfig(
            image_size=image_size, in_channels=int(c["in_channels"]), out_channels=int(c["out_channels"]),
            model_channels=widths[0], channel_mult=tuple(w // widths[0] for w in widths), num_res_blocks=int(layers),
            attention_resolutions=tuple(image_size // 2**i for i in range(levels) if attn[i]),
            dropout=float(c["dropout"]), num_heads=head_cfg[0], num_head_channels=head_cfg[1],
            use_scale_shift_norm=False, num_groups=int(c["norm_num_groups"]), context_dim=int(context_dim),
            transformer_depth=int(depth), use_linear_projection=bool(c["use_linear_projection"]),
        )  # fmt: skip
    except ValueError as e:
        return None, [f"{where}: {e}"]
    return cfg, []


# ---------------------------------------------------------------------------------------------- UNet weights
def _swap_sin_cos(weight: Tensor) -> Tensor:
    """time_embedding.linear_1 columns for [sin | cos] features -> ours for [cos | sin] (odd pad column stays)."""
    half = weight.shape[1] // 2
    return torch.cat([weight[:, half : 2 * half], weight[:, :half], weight[:, 2 * half :]], dim=1)


def unet_state_from_diffusers(net: UNet, sd: dict[str, Tensor], *, flip_sin_to_cos: bool = True,
                              file: Path = Path(f"unet/{WEIGHTS}.safetensors")) -> tuple[dict[str, Tensor], list[str]]:
    """A UNet2DConditionModel state dict -> (our UNet's state dict, every problem: missing, unexpected, shapes).

    Blocks are matched by place (`walk_unet` + the same prefixes the UNet2DModel export uses); each transformer
    goes through `nets.transformer.from_diffusers_transformer_state`."""
    theirs, out, source, problems = dict(sd), {}, {}, []
    missing: list[str] = []  # diffusers names where we know them, else ours (inside a transformer)
    missed: set[str] = set()

    def take(their_key: str, our_key: str) -> None:
        if their_key in theirs:
            out[our_key], source[our_key] = theirs.pop(their_key), their_key
        else:
            missing.append(their_key)
            missed.add(our_key)

    for ours, their in _TOP.items():
        if ours != "label_emb":  # no class embedding (refused in the config)
            for leaf in ("weight", "bias"):
                take(f"{their}.{leaf}", f"{ours}.{leaf}")
    for b in walk_unet(net):
        prefix = _diffusers_prefix(b)
        if b.role != "attn":
            for local in b.module.state_dict():
                part, leaf = local.rsplit(".", 1)
                take(f"{prefix}.{_RES[part] if b.role == 'res' else part}.{leaf}", f"{b.ours}.{local}")
            continue
        sub = {k[len(prefix) + 1 :]: theirs.pop(k) for k in [k for k in theirs if k.startswith(prefix + ".")]}
        try:
            mapped = from_diffusers_transformer_state(sub)
        except ValueError as e:
            problems.append(f"{file}: {prefix}: {e}")
            missed.update(k for k in net.state_dict() if k.startswith(b.ours + "."))  # already reported
            continue
        for k, v in mapped.items():
            out[f"{b.ours}.{k}"] = v
            source[f"{b.ours}.{k}"] = "/".join(f"{prefix}.{n}" for n in to_diffusers_transformer_state({k: v}))
    if not flip_sin_to_cos and "time_embed.0.weight" in out:
        out["time_embed.0.weight"] = _swap_sin_cos(out["time_embed.0.weight"])
    expected = net.state_dict()
    missing += [f"{k} (ours)" for k in expected if k not in out and k not in missed]
    if missing:
        problems.append(f"{file} lacks {_listed(missing)}")
    extra = sorted(theirs) + [source[k] for k in out if k not in expected]
    if extra:
        problems.append(f"{file} has weights config.json does not use: {_listed(extra)}")
    fitting = {k: v for k, v in out.items() if k in expected}
    problems += _fit({k: expected[k] for k in fitting}, fitting, file, source.__getitem__)
    return out, problems


# ---------------------------------------------------------------------------------------------- the parts
def _unet(folder: Path, problems: list[str]) -> tuple[UNet | None, tuple[int, int] | None]:
    config = _read_json(folder / "config.json", problems)
    sd = _load_weights(folder, WEIGHTS, problems)
    if config is None:
        return None, None
    cfg, found = unet_config_from_diffusers(config, str(folder / "config.json"))
    problems += found
    if cfg is None or sd is None:
        return None, None
    net = UNet(cfg)
    state, found = unet_state_from_diffusers(net, sd, flip_sin_to_cos=bool(config.get("flip_sin_to_cos", True)),
                                             file=folder / f"{WEIGHTS}.safetensors")
    problems += found
    if found:
        return None, None
    net.load_state_dict(state, strict=True)
    size = config["sample_size"]
    return net.eval(), (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _vae(folder: Path, problems: list[str]) -> AutoencoderKL | None:
    config = _read_json(folder / "config.json", problems)
    sd = _load_weights(folder, WEIGHTS, problems)
    if config is None:
        return None
    try:
        cfg = config_from_diffusers(config)
    except ValueError as e:
        problems.append(f"{folder / 'config.json'}: {e}")
        return None
    if sd is None:
        return None
    file = folder / f"{WEIGHTS}.safetensors"
    try:
        state = from_diffusers_state(sd)
    except ValueError as e:
        problems.append(f"{file}: {e}")
        return None
    net = AutoencoderKL(cfg)
    found = _fit(net.state_dict(), state, file)
    problems += found
    if found:
        return None
    net.load_state_dict(state, strict=True)
    return net.eval()


def _scheduler(folder: Path, problems: list[str]) -> tuple[DiffusionConfig | None, bool, dict[str, Any]]:
    """(diffusion, clip x_0, the inference-timestep settings) from scheduler_config.json."""
    path = folder / "scheduler_config.json"
    config = _read_json(path, problems)
    if config is None:
        return None, False, {}
    config = dict(config)
    # Flow-matching settings of newer multistep schedulers: inert unless use_flow_sigmas / use_dynamic_shifting.
    flow = {k: config.pop(k) for k in ("flow_shift", "use_dynamic_shifting", "time_shift_type", "shift_terminal")
            if k in config}
    if config.get("use_flow_sigmas") or flow.get("use_dynamic_shifting"):
        problems.append(f"{path}: flow-matching sigmas (use_flow_sigmas / use_dynamic_shifting) are not supported")
        return None, False, {}
    try:
        settings = scheduler_settings(config, str(path))
    except ValueError as e:
        problems.append(str(e))
        return None, False, {}
    if VarianceType(settings.diffusion.variance) == VarianceType.LEARNED_RANGE:
        problems.append(f"{path}: variance_type=learned_range needs a UNet with twice the channels; not supported")
    rule = {"timestep_spacing": str(config.get("timestep_spacing", "leading")),
            "steps_offset": int(config.get("steps_offset", 0)),
            "set_alpha_to_one": bool(config.get("set_alpha_to_one", True))}
    if rule["timestep_spacing"] not in ("leading", "trailing", "linspace"):
        problems.append(f"{path}: timestep_spacing={rule['timestep_spacing']!r} is not supported "
                        "(leading, trailing, linspace)")
    # clip_sample defaults to True only in DDIM/DDPM configs; PNDM, Euler, ... have no such setting (no clipping).
    clip = bool(config.get("clip_sample", config.get("_class_name") in ("DDIMScheduler", "DDPMScheduler")))
    return settings.diffusion, clip, rule


# ---------------------------------------------------------------------------------------------- the text encoder
class CLIPPromptEncoder(nn.Module):
    """Stable Diffusion's prompt encoding, frozen: CLIP's last hidden states of the prompt padded to the
    tokenizer's model_max_length (77 for SD), padding positions INCLUDED and unmasked, exactly as diffusers'
    `encode_prompt` hands them to the UNet (SD was trained that way). `encode` -> TextEmbedding whose mask is all
    True; `truncated` marks prompts longer than max_length."""

    def __init__(self, tokenizer: Any, model: nn.Module) -> None:
        super().__init__()
        self.tokenizer, self.model = tokenizer, model
        limit = getattr(tokenizer, "model_max_length", None)
        positions = int(model.config.max_position_embeddings)
        self.max_length = int(limit) if isinstance(limit, int) and limit <= positions else positions
        # diffusers passes CLIP an attention mask only when the text config asks for one (no SD config does).
        self.use_attention_mask = bool(getattr(model.config, "use_attention_mask", False))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "CLIPPromptEncoder":
        return super().train(False)

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, prompts: list[str]) -> TextEmbedding:
        """prompts (B strings) -> tokens (B, max_length, dim) float32, mask (B, max_length) all True."""
        _check_prompts(prompts)
        L = self.max_length
        batch = self.tokenizer(prompts, padding="max_length", max_length=L, truncation=True, return_tensors="pt")
        truncated = [len(ids) > L for ids in self.tokenizer(prompts, truncation=False, verbose=False)["input_ids"]]
        ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device) if self.use_attention_mask else None
        with torch.no_grad():
            states = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return TextEmbedding(states.float(), torch.ones(ids.shape, dtype=torch.bool, device=ids.device), truncated)


def _text_encoder(root: Path, problems: list[str]) -> CLIPPromptEncoder | None:
    text, tok = root / "text_encoder", root / "tokenizer"
    before = len(problems)
    config = _read_json(text / "config.json", problems)
    if config is not None and config.get("model_type", "clip_text_model") != "clip_text_model":
        problems.append(f"{text / 'config.json'}: model_type={config.get('model_type')!r} is not a CLIP text model")
    if not any((text / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")):
        problems.append(f"{text / 'model.safetensors'} is missing")
    if not ((tok / "tokenizer.json").is_file() or all((tok / f).is_file() for f in ("vocab.json", "merges.txt"))):
        problems.append(f"{tok}: tokenizer.json or vocab.json + merges.txt is missing")
    if len(problems) > before:
        return None
    import transformers

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(tok), local_files_only=True)
        model, info = transformers.CLIPTextModel.from_pretrained(
            str(text), local_files_only=True, use_safetensors=True, dtype=torch.float32, output_loading_info=True)
    except (OSError, ValueError, ImportError, KeyError, TypeError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        problems.append(f"{text} or {tok} could not be loaded: {first}")
        return None
    missing = sorted(info.get("missing_keys", ()))
    wrong = info.get("mismatched_keys", ())
    if missing or wrong:
        problems.append(f"{text / 'model.safetensors'}: missing {_listed(missing)}; mismatched {_listed(wrong)}")
        return None
    return CLIPPromptEncoder(tokenizer, model)


# ---------------------------------------------------------------------------------------------- the folder
_COMPONENTS = {"unet": ("UNet2DConditionModel",), "vae": ("AutoencoderKL",), "text_encoder": ("CLIPTextModel",),
               "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"), "scheduler": None}
_IGNORED = ("safety_checker", "feature_extractor", "image_encoder", "requires_safety_checker")


def _check_index(root: Path, problems: list[str]) -> None:
    index = _read_json(root / "model_index.json", problems)
    for name, classes in _COMPONENTS.items():
        entry = None if index is None else index.get(name)
        if index is not None and (not isinstance(entry, list) or len(entry) != 2 or entry[1] is None):
            problems.append(f"{root / 'model_index.json'}: no {name} component")
        elif index is not None and classes is not None and entry[1] not in classes:
            problems.append(f"{root / 'model_index.json'}: {name} is {entry[1]}, not {' or '.join(classes)}")
        if not (root / name).is_dir():
            problems.append(f"{root / name}/ is missing")
    for name, entry in (index or {}).items():
        if name.startswith("_") or name in _COMPONENTS or name in _IGNORED or entry in (None, [None, None]):
            continue
        problems.append(f"{root / 'model_index.json'}: component {name!r} is not supported (SD 1.x / 2.x only)")


def load_sd_folder(path: str | Path, device: str | torch.device = "cpu") -> LatentDiffusionModel:
    """A local diffusers StableDiffusionPipeline folder -> LatentDiffusionModel on pakhsh's nets (float32, eval).

    Raises FileNotFoundError when `path` is not a folder, and one StableDiffusionFolderError listing every problem
    (missing parts or weights, settings we cannot represent, weight shapes that do not fit the configs)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"Stable Diffusion folder not found: {root}")
    problems: list[str] = []
    _check_index(root, problems)  # also names each missing subfolder; the parts below read only those present
    has = {name: (root / name).is_dir() for name in _COMPONENTS}
    unet, latent_size = _unet(root / "unet", problems) if has["unet"] else (None, None)
    vae = _vae(root / "vae", problems) if has["vae"] else None
    diffusion, clip, rule = _scheduler(root / "scheduler", problems) if has["scheduler"] else (None, False, {})
    text = _text_encoder(root, problems) if has["text_encoder"] and has["tokenizer"] else None
    if unet is not None and vae is not None and unet.cfg.in_channels != vae.cfg.latent_channels:
        problems.append(f"unet in_channels={unet.cfg.in_channels} but vae latent_channels={vae.cfg.latent_channels}")
    if unet is not None and text is not None and unet.cfg.context_dim != text.dim:
        problems.append(f"unet cross_attention_dim={unet.cfg.context_dim} but the text encoder's hidden_size is "
                        f"{text.dim}")
    if problems:
        raise StableDiffusionFolderError(f"{root} is not a usable Stable Diffusion folder: {'; '.join(problems)}")
    assert unet is not None and vae is not None and text is not None and diffusion is not None and latent_size
    model = LatentDiffusionModel(unet, vae, text, diffusion, latent_size, clip, **rule, path=root)
    return model.to(device)


__all__ = [
    "CLIPPromptEncoder", "LatentDiffusionModel", "StableDiffusionFolderError", "load_sd_folder",
    "unet_config_from_diffusers", "unet_state_from_diffusers",
]
