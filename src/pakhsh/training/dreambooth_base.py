"""DreamBooth's base model and its LoRA adapters: which base a run fine-tunes (`read_base_config` refuses what it
cannot), the base's weights and their fingerprint (class images are cached by it, and `--resume` and `load_lora`
check it), the run's net (`build_dreambooth_net`: the base UNet, LoRA adapters on its attention projections, the
learnt token embedding), and the adapters alone as a diffusers LoRA folder (`save_lora`, `load_lora`,
`load_lora_model` for `pakhsh generate -m RUN/lora`). The training system is in `training/dreambooth.py`."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .experiment import ExperimentConfig
from .learnt_token import TOKEN_PARAM, with_learnt_token
from .lora import (
    LORA_FILE,
    base_key,
    inject_lora,
    is_lora_key,
    lora_from_diffusers,
    lora_to_diffusers,
    lora_weights,
    set_lora_weights,
)

PAKHSH_LORA = "pakhsh_lora.json"
LORA_FOLDER = "lora"  # a LoRA run writes its adapters to RUN/lora when it ends
TOKEN_FILE = "token_embedding.safetensors"  # ... beside the adapters of a LoRA folder


class DreamBoothError(ValueError):
    """A DreamBooth input that cannot be used (base, subject images, prompts, adapters); the message names it."""



# ---------------------------------------------------------------------------------------------- the base
def weights_fingerprint(*states: dict[str, Tensor]) -> str:
    """A short hash of weights: the same fingerprint = the same frozen base (class images are cached by it)."""
    h = hashlib.sha256()
    for state in states:
        for name, t in sorted(state.items()):
            h.update(name.encode())
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def base_folder(spec: str) -> Path:
    """The checkpoint folder of a base spec (shipped name, run, checkpoint or exported folder)."""
    from ..pipelines.base import resolve_model_path
    from .checkpoint import resolve_checkpoint

    try:
        return resolve_checkpoint(resolve_model_path(spec))
    except FileNotFoundError:
        raise FileNotFoundError(f"--model {spec}: no such folder or shipped model (the base: a latent text-to-image "
                                "model, e.g. the shipped t2i)") from None


def read_base_config(spec: str) -> tuple[ExperimentConfig, Path]:
    """The base's config and folder; refuses what DreamBooth cannot fine-tune, naming it."""
    from .checkpoint import read_config

    folder = base_folder(spec)
    cfg = read_config(folder)
    if not cfg.is_latent or cfg.condition is None or cfg.condition.text is None or cfg.is_unclip:
        raise DreamBoothError(f"--model {spec}: {folder} is not a latent text-to-image model (DreamBooth fine-tunes "
                              "one, e.g. the shipped t2i)")
    if cfg.model.num_classes is not None:
        raise DreamBoothError(f"--model {spec}: class-conditional latent models are not supported")
    if cfg.dreambooth is not None and cfg.dreambooth.lora_rank is not None:
        raise DreamBoothError(f"--model {spec}: a LoRA DreamBooth run cannot be a base; start from its base "
                              f"({cfg.dreambooth.base}) or from a full fine-tune")
    if not (folder / "autoencoder.safetensors").is_file():
        raise DreamBoothError(f"--model {spec}: {folder} lacks autoencoder.safetensors (a latent model carries its "
                              "autoencoder)")
    return cfg, folder


def load_base_unet(folder: Path) -> dict[str, Tensor]:
    """The base UNet's EMA weights (what the run starts from and what the class images come from)."""
    from .checkpoint import load_model

    return {k: v.detach().clone() for k, v in load_model(folder, ema=True).model.state_dict().items()}


def base_autoencoder(cfg: ExperimentConfig, folder: Path) -> nn.Module:
    """The base's autoencoder, frozen (a latent model carries its own)."""
    from ..nets.autoencoder import build_autoencoder
    from .checkpoint import check_fits, read_tensors

    assert cfg.latent is not None and cfg.latent.autoencoder_config is not None
    ae = build_autoencoder(cfg.latent.autoencoder_config, cfg.latent.autoencoder)
    state = read_tensors(folder / "autoencoder.safetensors")
    check_fits(ae, state, folder / "autoencoder.safetensors")
    ae.load_state_dict(state)
    return ae.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------- LoRA
def build_dreambooth_net(cfg: ExperimentConfig) -> nn.Module:
    """The net of a DreamBooth run: the base's UNet, with LoRA adapters when dreambooth.lora_rank is set, and with
    dreambooth.train_token one more parameter, `dreambooth_token` (pieces, width): the identifier's learnt input
    embedding, kept on the UNet so that the trainer's optimizer, EMA and checkpoints carry it like any weight."""
    from ..nets.unet import UNet

    net = UNet(cfg.model)
    db = cfg.dreambooth
    if db is not None and db.lora_rank is not None:
        inject_lora(net, db.lora_rank, db.lora_alpha)
    if db is not None and db.train_token:
        if not db.token_pieces or cfg.model.context_dim is None:
            raise DreamBoothError("dreambooth.train_token: dreambooth.token_pieces is unset (filled when the run "
                                  "starts) or the UNet takes no text")
        net.register_parameter(TOKEN_PARAM, nn.Parameter(torch.zeros(len(db.token_pieces), cfg.model.context_dim)))
    return net


def is_own_key(key: str) -> bool:
    """A weight a DreamBooth net has and its base has not: LoRA adapters, the learnt token embedding."""
    return is_lora_key(key) or key == TOKEN_PARAM


def load_base_into(net: nn.Module, base: dict[str, Tensor]) -> None:
    """Copy the base UNet's weights into `net` (plain or LoRA-wrapped); the adapters keep their initial values."""
    own = net.state_dict()
    wanted = {k: base_key(k) for k in own if not is_own_key(k)}
    missing = sorted(v for v in wanted.values() if v not in base)
    extra = sorted(set(base) - set(wanted.values()))
    if missing or extra:
        raise DreamBoothError(f"the base's weights do not fit the run's UNet: missing {missing[:3]}, extra "
                              f"{extra[:3]}")
    with torch.no_grad():
        for k, b in wanted.items():
            own[k].copy_(base[b])


def save_lora(run: str | Path, out: str | Path | None = None, *, ema: bool = True) -> Path:
    """Write a LoRA run's adapters (EMA weights of its newest checkpoint) as a diffusers LoRA folder: `LORA_FILE`
    (keys `unet.<diffusers module>.lora_A/B.weight`, scale folded into B), `adapter_config.json` (peft's
    LoraConfig, lora_alpha = r) and `pakhsh_lora.json` (the base, its fingerprint, the token and class noun, and
    the run's config, so `load_lora` can rebuild the model). Default `out`: RUN/lora."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    from ..config import to_dict
    from .checkpoint import load_model

    loaded = load_model(run, ema=ema)
    db = loaded.config.dreambooth
    if db is None or db.lora_rank is None:
        raise DreamBoothError(f"{loaded.path} is not a LoRA DreamBooth run (dreambooth.lora_rank is unset)")
    folder = Path(out) if out is not None else Path(run) / LORA_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    theirs = lora_to_diffusers(loaded.model, lora_weights(loaded.model))
    tmp = folder / f".{LORA_FILE}.tmp"
    save_file(theirs, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / LORA_FILE)
    parts = sorted({k.split(".transformer_blocks.", 1)[1].split(".", 1)[1].rsplit(".lora_", 1)[0]
                    for k in theirs})
    LoraConfig(r=db.lora_rank, lora_alpha=db.lora_rank, target_modules=parts, lora_dropout=0.0,
               bias="none").save_pretrained(str(folder))
    if db.train_token:  # the identifier's learnt input embedding travels with the adapters
        save_file({TOKEN_PARAM: getattr(loaded.model, TOKEN_PARAM).detach().cpu().contiguous()},
                  str(folder / TOKEN_FILE))
    info = {"base": db.base, "base_fingerprint": db.base_fingerprint, "token": db.token, "class_noun": db.class_noun,
            "instance_prompt": db.instance, "source": str(loaded.path), "config": to_dict(loaded.config)}
    (folder / PAKHSH_LORA).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return folder


def is_lora_folder(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / PAKHSH_LORA).is_file() and (p / LORA_FILE).is_file()


def load_lora(folder: str | Path, base: str | None = None) -> tuple[nn.Module, ExperimentConfig]:
    """A fresh base UNet (its EMA weights) with the adapters of a `save_lora` folder: (net in eval mode, the run's
    config). `base` overrides the base the folder names; its fingerprint must match the one trained on."""
    from ..config import from_dict
    from .checkpoint import read_tensors

    folder = Path(folder)
    try:
        info = json.loads((folder / PAKHSH_LORA).read_text())
        cfg = from_dict(ExperimentConfig, info["config"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DreamBoothError(f"{folder / PAKHSH_LORA} is unreadable: {e}") from None
    db = cfg.dreambooth
    if db is None or db.lora_rank is None:
        raise DreamBoothError(f"{folder / PAKHSH_LORA}: its config is not a LoRA DreamBooth run")
    spec = base if base is not None else db.base
    base_cfg, bfolder = read_base_config(spec)
    state = load_base_unet(bfolder)
    found = weights_fingerprint(state, read_tensors(bfolder / "autoencoder.safetensors"))
    if db.base_fingerprint is not None and found != db.base_fingerprint:
        raise DreamBoothError(f"{folder}: the adapters were trained on a base with fingerprint {db.base_fingerprint}; "
                              f"{spec} ({bfolder}) has {found}")
    net = build_dreambooth_net(cfg)
    load_base_into(net, state)
    set_lora_weights(net, lora_from_diffusers(net, read_tensors(folder / LORA_FILE), str(folder / LORA_FILE)),
                     str(folder / LORA_FILE))
    if db.train_token:
        learnt = read_tensors(folder / TOKEN_FILE).get(TOKEN_PARAM)
        own = getattr(net, TOKEN_PARAM)
        if learnt is None or learnt.shape != own.shape:
            raise DreamBoothError(f"{folder / TOKEN_FILE}: no {TOKEN_PARAM} of shape {tuple(own.shape)}")
        with torch.no_grad():
            own.copy_(learnt)
    return net.eval(), cfg


def load_lora_model(folder: str | Path, base: str | None = None) -> Any:
    """A `save_lora` folder as the text-to-image pipeline's bundle: the base's autoencoder and text encoder, its UNet
    with the adapters (what `pakhsh generate -m RUN/lora` runs)."""
    from ..conditioning.text import TextEncoder
    from ..interop.stable_diffusion import LatentDiffusionModel
    from ..nets.autoencoder import build_autoencoder
    from .checkpoint import read_tensors

    net, cfg = load_lora(folder, base)
    _, bfolder = read_base_config(base if base is not None else cfg.dreambooth.base)
    lat = cfg.latent
    assert lat is not None and lat.autoencoder_config is not None and cfg.condition is not None
    vae = build_autoencoder(replace(lat.autoencoder_config, scaling_factor=lat.scale_factor), lat.autoencoder)
    vae.load_state_dict(read_tensors(bfolder / "autoencoder.safetensors"))
    m = cfg.model
    text = with_learnt_token(TextEncoder(cfg.condition.text), cfg, net)
    return LatentDiffusionModel(net, vae.eval(), text, cfg.diffusion, (m.image_size, m.image_size),
                                clip_denoised=False, path=Path(folder), config=cfg)
