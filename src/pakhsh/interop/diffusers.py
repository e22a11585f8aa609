"""diffusers folders in and out: run a diffusers UNet2DModel through our samplers, read a diffusers pipeline folder
(model_index.json, unet/, scheduler/) as a model + diffusion, and export our UNet as a DDPMPipeline folder.

diffusers is an optional dependency, so it is imported inside the functions that need it. Nothing here touches
the network: folders are read with `local_files_only=True`.

Export. Our ADM UNet and diffusers' UNet2DModel compute the same function when UNet2DModel is configured as ADM
(resnet_time_scale_shift="scale_shift" or "default", flip_sin_to_cos=True, freq_shift=0, attention with
residual connection and a GroupNorm of norm_num_groups, conv or ResNet resampling). The block order is the
same (encoder levels of ResBlocks + attention and a downsampler, middle res/attention/res, decoder levels of
num_res_blocks + 1 ResBlocks reading the skips in reverse, then an upsampler), so the weights map one to one;
the fused qkv projection is split into to_q / to_k / to_v. What UNet2DModel cannot express is refused by
`diffusers_unet_config`: a GroupNorm with fewer groups than the others, attention heads of different widths at
different levels (it has one attention_head_dim), or extra input channels (DDPMPipeline draws in_channels of
noise).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from ..diffusion import DiffusionConfig, ModelOutput, VarianceType
from ..nets.layers import GroupNorm
from ..nets.unet import UNet
from .unet_layout import RESBLOCK_PARTS, Block, split_qkv, walk_unet

if TYPE_CHECKING:  # only for type hints; importing diffusers at module load would make it mandatory
    from diffusers import UNet2DModel

PAKHSH_META = "pakhsh.json"  # written beside model_index.json: classes and the null label of an exported model


class DiffusersFormatError(ValueError):
    """A diffusers folder or scheduler setting pakhsh cannot use; the message names the file and key."""


class UnmappableError(ValueError):
    """Our UNet config has no exact UNet2DModel equivalent; the message says which setting."""


def _require_diffusers() -> Any:
    try:
        import diffusers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("this needs the optional dependency diffusers: pip install 'pakhsh[bench]'") from e
    return diffusers


# ---------------------------------------------------------------------------------------------- the model callable
class DiffusersUNetAdapter(nn.Module):
    """A diffusers `UNet2DModel` as the pakhsh model callable `model(x_t, t, y=None) -> eps`.

    `y` goes to diffusers' `class_labels` (diffusers itself rejects labels for a UNet without a class
    embedding, and a missing label for one with it); the output is the `.sample` tensor, (B, C_out, H, W).
    """

    def __init__(self, unet: "UNet2DModel | DiffusersUNetAdapter") -> None:
        super().__init__()
        # wrapping an adapter again is a no-op, so code written for the old return type keeps working
        self.unet = unet.unet if isinstance(unet, DiffusersUNetAdapter) else unet

    @property
    def config(self) -> Any:
        """The wrapped UNet2DModel's config (sample_size, in_channels, ...)."""
        return self.unet.config

    def forward(self, x: Tensor, t: Tensor | float, y: Tensor | None = None, **cond: Any) -> Tensor:
        """x: (B, C, H, W), t: (B,) or scalar timesteps, y: (B,) labels or None -> (B, C_out, H, W)."""
        labels = cond.pop("class_labels", y)
        if cond:
            raise ValueError(f"a diffusers UNet2DModel takes no condition {sorted(cond)}")
        return self.unet(x, t, class_labels=labels, return_dict=True).sample


def load_diffusers_unet(
    path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> DiffusersUNetAdapter:
    """A local diffusers `UNet2DModel` folder (`config.json` + weights) as a callable `model(x_t, t, **cond)`
    that every pakhsh sampler takes; `.unet` is the UNet2DModel itself. Never touches the network.

    Raises FileNotFoundError naming the folder when it, its `config.json` or its weights are missing.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"diffusers UNet folder not found: {folder}")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a diffusers model folder: it has no config.json")
    diffusers = _require_diffusers()
    kwargs: dict[str, Any] = {"local_files_only": True}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    try:
        unet = diffusers.UNet2DModel.from_pretrained(str(folder), **kwargs)
    except (OSError, EnvironmentError) as e:  # e.g. the weights file is missing
        raise FileNotFoundError(f"could not load a diffusers UNet2DModel from {folder}: {e}") from e
    return DiffusersUNetAdapter(unet.to(device).eval())


def diffusers_model(path: str | Path, *, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> DiffusersUNetAdapter:
    """Same as `load_diffusers_unet` (kept for older code)."""
    return load_diffusers_unet(path, device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------- scheduler <-> diffusion
# Scheduler settings that only choose inference steps or a solver: pakhsh's own --sampler/--steps decide those.
_STEP_CHOICE_KEYS = frozenset({
    "timestep_spacing", "steps_offset", "set_alpha_to_one", "skip_prk_steps", "solver_order", "algorithm_type",
    "solver_type", "lower_order_final", "euler_at_final", "use_karras_sigmas", "use_exponential_sigmas",
    "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas", "final_sigmas_type", "lambda_min_clipped",
    "interpolation_type", "timestep_type", "sigma_min", "sigma_max", "predict_x0", "disable_corrector",
    "solver_p", "dynamic_thresholding_ratio", "sample_max_value", "eta", "s_noise",
})  # fmt: skip
_PREDICTION = {"epsilon": ModelOutput.EPS, "v_prediction": ModelOutput.V, "sample": ModelOutput.X0}
_VARIANCE = {None: VarianceType.FIXED_SMALL, "fixed_small": VarianceType.FIXED_SMALL,
             "fixed_small_log": VarianceType.FIXED_SMALL, "fixed_large": VarianceType.FIXED_LARGE,
             "fixed_large_log": VarianceType.FIXED_LARGE, "learned_range": VarianceType.LEARNED_RANGE}


@dataclass
class SchedulerSettings:
    """What a diffusers scheduler config says about the diffusion, in our terms."""

    diffusion: DiffusionConfig
    clip_denoised: bool  # clip_sample: clamp the predicted x_0 to [-1, 1]


def _betas(cfg: dict[str, Any], where: str) -> tuple[list[float] | None, str]:
    """(explicit betas or None, our schedule name) from the scheduler's beta settings."""
    n = int(cfg.get("num_train_timesteps", 1000))
    if cfg.get("trained_betas") is not None:
        betas = [float(b) for b in cfg["trained_betas"]]
        if len(betas) != n:
            raise DiffusersFormatError(f"{where}: trained_betas has {len(betas)} entries, num_train_timesteps {n}")
        return betas, "linear"
    schedule = cfg.get("beta_schedule", "linear")
    start, end = float(cfg.get("beta_start", 1e-4)), float(cfg.get("beta_end", 0.02))
    if schedule == "linear":  # diffusers' linear is not rescaled by 1000 / T (ours is): give the betas
        return np.linspace(start, end, n, dtype=np.float64).tolist(), "linear"
    if schedule == "scaled_linear":
        return (np.linspace(start**0.5, end**0.5, n, dtype=np.float64) ** 2).tolist(), "linear"
    if schedule == "squaredcos_cap_v2":  # the iDDPM cosine schedule, betas capped at 0.999 as ours
        return None, "cosine"
    raise DiffusersFormatError(f"{where}: beta_schedule={schedule!r} is not supported "
                               "(use linear, scaled_linear, squaredcos_cap_v2 or trained_betas)")


def scheduler_settings(cfg: dict[str, Any], where: str = "scheduler_config.json") -> SchedulerSettings:
    """A diffusers scheduler config -> our DiffusionConfig and clipping. Settings with no pakhsh equivalent raise
    DiffusersFormatError naming the key; ones that only choose inference steps are ignored."""
    for key, value in cfg.items():
        known = key.startswith("_") or key in _STEP_CHOICE_KEYS or key in (
            "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
            "variance_type", "clip_sample", "clip_sample_range", "thresholding", "rescale_betas_zero_snr")
        if not known:
            raise DiffusersFormatError(f"{where}: unknown scheduler setting {key!r}={value!r}")
    _refuse(cfg, where, "thresholding", False, "pass --threshold to sample with dynamic thresholding instead")
    _refuse(cfg, where, "rescale_betas_zero_snr", False, "zero-terminal-SNR schedules are not supported")
    if cfg.get("clip_sample", True):
        _refuse(cfg, where, "clip_sample_range", 1.0, "pakhsh clips x_0 to [-1, 1] only")
    prediction = cfg.get("prediction_type", "epsilon")
    if prediction not in _PREDICTION:
        raise DiffusersFormatError(f"{where}: prediction_type={prediction!r} is not supported "
                                   f"(use {', '.join(_PREDICTION)})")
    variance = cfg.get("variance_type")
    if variance not in _VARIANCE:
        raise DiffusersFormatError(f"{where}: variance_type={variance!r} is not supported "
                                   "(use fixed_small, fixed_large or learned_range)")
    betas, schedule = _betas(cfg, where)
    diffusion = DiffusionConfig(num_steps=int(cfg.get("num_train_timesteps", 1000)), schedule=schedule,
                                betas=betas, model_output=_PREDICTION[prediction], variance=_VARIANCE[variance])
    return SchedulerSettings(diffusion, bool(cfg.get("clip_sample", True)))


def _refuse(cfg: dict[str, Any], where: str, key: str, ok: Any, advice: str) -> None:
    if key in cfg and cfg[key] is not None and cfg[key] != ok:
        raise DiffusersFormatError(f"{where}: {key}={cfg[key]!r} is not supported; {advice}")


def ddpm_scheduler_config(cfg: DiffusionConfig) -> dict[str, Any]:
    """Our DiffusionConfig as DDPMScheduler arguments (named schedules where diffusers has the same formula)."""
    from ..diffusion.schedules import linear_betas

    out: dict[str, Any] = {"num_train_timesteps": cfg.num_steps, "clip_sample": True, "clip_sample_range": 1.0,
                           "prediction_type": {v: k for k, v in _PREDICTION.items()}[ModelOutput(cfg.model_output)],
                           "variance_type": VarianceType(cfg.variance).value}
    if cfg.betas is not None:
        out["trained_betas"] = [float(b) for b in cfg.betas]
    elif cfg.schedule == "cosine":
        out["beta_schedule"] = "squaredcos_cap_v2"
    elif cfg.schedule == "linear":  # ours is rescaled by 1000 / T: diffusers takes the endpoints themselves
        betas = linear_betas(cfg.num_steps)
        out.update(beta_schedule="linear", beta_start=float(betas[0]), beta_end=float(betas[-1]))
    else:
        raise UnmappableError(f"diffusion.schedule {cfg.schedule!r} has no diffusers equivalent")
    return out


# ---------------------------------------------------------------------------------------------- pipeline folders
@dataclass
class DiffusersPipelineModel:
    """A diffusers pipeline folder read for pakhsh."""

    model: DiffusersUNetAdapter
    settings: SchedulerSettings
    image_shape: tuple[int, int, int]  # (C, H, W) of the images
    num_classes: int | None  # classes: labels 0 .. num_classes - 1 (a null label, if any, comes after)
    null_class: int | None  # the label meaning "no class" (written by pakhsh export), else None
    class_names: list[str] | None


def is_diffusers_pipeline(folder: Path) -> bool:
    return (folder / "model_index.json").is_file()


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DiffusersFormatError(f"{path} is missing: a diffusers pipeline folder needs it")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, OSError) as e:
        raise DiffusersFormatError(f"{path} is not readable JSON: {e}") from None
    if not isinstance(data, dict):
        raise DiffusersFormatError(f"{path}: expected a JSON object")
    return data


def _check_components(index: dict[str, Any], where: Path) -> None:
    """Only unet (UNet2DModel) + scheduler pipelines are pixel-space models pakhsh can run."""
    for name, value in index.items():
        if name.startswith("_") or value is None or value == [None, None]:
            continue
        if name not in ("unet", "scheduler"):
            raise DiffusersFormatError(f"{where}: component {name!r} is not supported (pakhsh runs pixel-space "
                                       "pipelines with a UNet2DModel and a scheduler only)")
    unet = index.get("unet")
    if not isinstance(unet, list) or len(unet) != 2 or unet[1] != "UNet2DModel":
        raise DiffusersFormatError(f"{where}: unet must be a UNet2DModel, got {unet!r}")
    if "scheduler" not in index:
        raise DiffusersFormatError(f"{where}: no scheduler component")


def load_diffusers_pipeline(folder: str | Path, device: str | torch.device = "cpu") -> DiffusersPipelineModel:
    """A diffusers pipeline folder (model_index.json, unet/, scheduler/) -> model, diffusion and class info."""
    root = Path(folder)
    _check_components(_read_json(root / "model_index.json"), root / "model_index.json")
    sched_path = root / "scheduler" / "scheduler_config.json"
    settings = scheduler_settings(_read_json(sched_path), str(sched_path))
    logging.getLogger("diffusers").setLevel(logging.ERROR)  # config notices would break our one-line output
    model = load_diffusers_unet(root / "unet", device=device)
    c = model.config
    learned = settings.diffusion.variance == VarianceType.LEARNED_RANGE
    want = c.in_channels * (2 if learned else 1)
    if c.out_channels != want:
        raise DiffusersFormatError(
            f"{root / 'unet' / 'config.json'}: out_channels={c.out_channels} but the scheduler's variance_type "
            f"({settings.diffusion.variance.value}) needs {want} for in_channels={c.in_channels}")
    size = c.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    meta = _read_json(root / PAKHSH_META) if (root / PAKHSH_META).is_file() else {}
    # a pakhsh export says which embedding row is the null label; the classes are the rows before it
    classes = meta.get("num_classes", c.num_class_embeds) if c.num_class_embeds is not None else None
    return DiffusersPipelineModel(model, settings, (c.in_channels, h, w), classes, meta.get("null_class"),
                                  meta.get("class_names"))


# ---------------------------------------------------------------------------------------------- export
def _head_width(net: UNet) -> int:
    """The one attention head width UNet2DModel allows (attention_head_dim)."""
    widths = {b.module.qkv.in_features // b.module.num_heads for b in walk_unet(net) if b.role == "attn"}
    if len(widths) != 1:
        raise UnmappableError(f"attention heads are {sorted(widths)} channels wide at different levels, but "
                              "UNet2DModel has one attention_head_dim; train with model.num_head_channels set")
    return widths.pop()


def diffusers_unet_config(net: UNet) -> dict[str, Any]:
    """UNet2DModel arguments that build exactly our network, or UnmappableError saying what does not map."""
    cfg = net.cfg
    if cfg.cond_channels:
        raise UnmappableError(f"model.cond_channels={cfg.cond_channels}: an image-conditioned (Palette) net has no "
                              "DDPMPipeline equivalent; export it in pakhsh format")
    if cfg.context_dim is not None:
        raise UnmappableError(f"model.context_dim={cfg.context_dim}: a cross-attention net is a UNet2DConditionModel, "
                              "not the UNet2DModel a DDPMPipeline holds")
    if cfg.in_channels != cfg.out_channels:
        raise UnmappableError(f"model.in_channels={cfg.in_channels} differs from out_channels={cfg.out_channels}: "
                              "DDPMPipeline feeds the UNet noise only")
    groups = {m.num_groups for m in net.modules() if isinstance(m, GroupNorm)}
    if groups != {cfg.num_groups}:
        raise UnmappableError(f"GroupNorms use {sorted(groups)} groups (a width smaller than or not divisible by "
                              f"model.num_groups={cfg.num_groups}); UNet2DModel uses one group count")
    levels = len(cfg.channel_mult)
    attn = [cfg.image_size // 2**i in cfg.attention_resolutions for i in range(levels)]
    plain_down, plain_up = ("ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D") if cfg.resblock_updown \
        else ("DownBlock2D", "UpBlock2D")
    return {
        "sample_size": cfg.image_size, "in_channels": cfg.in_channels, "out_channels": cfg.out_dim,
        "block_out_channels": [cfg.model_channels * m for m in cfg.channel_mult],
        "layers_per_block": cfg.num_res_blocks,
        "down_block_types": ["AttnDownBlock2D" if a else plain_down for a in attn],
        "up_block_types": ["AttnUpBlock2D" if a else plain_up for a in reversed(attn)],
        "downsample_type": "resnet" if cfg.resblock_updown else "conv",
        "upsample_type": "resnet" if cfg.resblock_updown else "conv",
        "attention_head_dim": _head_width(net), "norm_num_groups": cfg.num_groups,
        "attn_norm_num_groups": cfg.num_groups, "norm_eps": 1e-5, "dropout": cfg.dropout,
        "resnet_time_scale_shift": "scale_shift" if cfg.use_scale_shift_norm else "default",
        "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu", "add_attention": True,
        "num_class_embeds": None if cfg.num_classes is None else cfg.num_classes + 1,
    }  # fmt: skip


_TOP = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
        "label_emb": "class_embedding", "conv_in": "conv_in", "norm_out": "conv_norm_out", "conv_out": "conv_out"}
_RES = dict(zip(RESBLOCK_PARTS, ("norm1", "conv1", "time_emb_proj", "norm2", "conv2", "conv_shortcut")))
_ATTN = {"norm": "group_norm", "proj_out": "to_out.0"}


def _diffusers_prefix(b: Block) -> str:
    """diffusers' module path of one of our blocks."""
    if b.section == "mid":
        return f"mid_block.{'attentions' if b.role == 'attn' else 'resnets'}.{b.index}"
    group = "down_blocks" if b.section == "down" else "up_blocks"
    if b.role in ("down", "up"):
        return f"{group}.{b.level}.{'downsamplers' if b.role == 'down' else 'upsamplers'}.0"
    return f"{group}.{b.level}.{'attentions' if b.role == 'attn' else 'resnets'}.{b.index}"


def to_diffusers_state_dict(net: UNet) -> dict[str, Tensor]:
    """Our UNet's weights under UNet2DModel's names (qkv split into to_q / to_k / to_v)."""
    state = net.state_dict()
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        prefix, leaf = key.rsplit(".", 1)
        if prefix in _TOP:
            out[f"{_TOP[prefix]}.{leaf}"] = value
    for b in walk_unet(net):
        theirs = _diffusers_prefix(b)
        for local, value in b.module.state_dict().items():
            part, leaf = local.rsplit(".", 1)
            if b.role == "attn" and part == "qkv":
                for name, piece in zip(("to_q", "to_k", "to_v"), split_qkv(value)):
                    out[f"{theirs}.{name}.{leaf}"] = piece
            elif b.role == "attn":
                out[f"{theirs}.{_ATTN[part]}.{leaf}"] = value
            elif part in _RES:
                out[f"{theirs}.{_RES[part]}.{leaf}"] = value
            else:  # Downsample / Upsample conv
                out[f"{theirs}.conv.{leaf}"] = value
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def export_diffusers(net: UNet, diffusion: DiffusionConfig, out: str | Path, *,
                     class_names: list[str] | None = None) -> Path:
    """Write a DDPMPipeline folder (model_index.json, unet/, scheduler/) computing exactly what `net` computes.

    Raises UnmappableError (before writing anything) for configs UNet2DModel cannot express."""
    diffusers = _require_diffusers()
    config = diffusers_unet_config(net)
    scheduler = diffusers.DDPMScheduler(**ddpm_scheduler_config(diffusion))
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    unet = diffusers.UNet2DModel(**config)
    missing, unexpected = unet.load_state_dict(to_diffusers_state_dict(net), strict=False)
    if missing or unexpected:  # a bug in the mapping, never the user's doing
        raise RuntimeError(f"diffusers export mapping is incomplete: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    folder = Path(out)
    diffusers.DDPMPipeline(unet=unet.eval(), scheduler=scheduler).save_pretrained(str(folder))
    if net.cfg.num_classes is not None:
        meta = {"num_classes": net.cfg.num_classes, "null_class": net.cfg.num_classes, "class_names": class_names}
        (folder / PAKHSH_META).write_text(json.dumps(meta, indent=2) + "\n")
    return folder


def ddpm_timesteps(num_train_steps: int, num_inference_steps: int) -> list[int]:
    """The training steps DDPMScheduler.set_timesteps(n) visits with its default "leading" spacing, ascending:
    respace our diffusion with these to walk the same chain."""
    ratio = num_train_steps // num_inference_steps
    return [i * ratio for i in range(num_inference_steps)] if ratio else list(range(num_train_steps))


__all__ = [
    "DiffusersFormatError", "DiffusersPipelineModel", "DiffusersUNetAdapter", "SchedulerSettings", "UnmappableError",
    "ddpm_scheduler_config", "ddpm_timesteps", "diffusers_model", "diffusers_unet_config", "export_diffusers",
    "is_diffusers_pipeline", "load_diffusers_pipeline", "load_diffusers_unet", "scheduler_settings",
    "to_diffusers_state_dict",
]
