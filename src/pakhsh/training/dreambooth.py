"""DreamBooth (Ruiz et al. 2023) on the one trainer: subject-driven fine-tuning of a latent text-to-image model.

A few images of one subject are learnt under a rare identifier beside the class noun ("a sks star"); images of the
plain class, generated once by the frozen base ("a star"), are trained alongside, so the model keeps what the class
looks like and what the class noun means (prior preservation):

    L = E[ |eps - eps_theta(z_t, t, c_subject)|^2 ] + lambda * E[ |eps' - eps_theta(z'_t', t', c_class)|^2 ]

(with the base's own prediction target, v here). What this module holds, and why:

- the run's config (`dreambooth_config`): the base's net, diffusion, autoencoder and text encoder unchanged, the
  subject folder as data, a `dreambooth` section; `pakhsh dreambooth` builds it, `Trainer` runs it like any run;
- the class images (`class_images`): generated with the frozen base from the class prompts, image i from its own
  seed, and cached under the pakhsh cache keyed by the base's weights, the prompts, the count and the sampling
  settings, so a resume or a second run with the same base does not generate them again. The class prompts are
  the subject prompts with the identifier taken out (the paper's "a [V] dog" -> "a dog"), so a subject captioned
  in the base's grammar ("a sks star at the top left on a gray background") gets class images of that context
  ("a star at the top left on a gray background"): the prior is kept where the subject is trained;
- `DreamBoothSystem`: the frozen parts (the base's autoencoder and text encoder), the encoded subject and class
  images, and the batches. Training item j pairs subject image j mod S with class image j mod K: every micro-batch
  of B items holds exactly B subject and B class examples (the paper's and diffusers' 1:1 composition). The
  trainer's draws for an item cover both halves (noise and posterior noise are (B, 2, C, h, w)); the subject
  half takes the trainer's t, the class half t' = floor(u * T) from the item's third uniform draw, so both halves
  have independent uniform steps and resume stays exact. Segmentation map and layout (the base may take them) get
  their nulls: subject photos come without either;
- LoRA (Hu et al. 2021, `training/lora.py`): rank-r adapters on every attention projection of the UNet, the
  rest frozen. A LoRA run's checkpoints hold the whole net (base + adapters, so they load and resume like any
  run); `save_lora` writes the adapters alone in diffusers' layout beside `adapter_config.json` and
  `pakhsh_lora.json` (which base they belong to); `load_lora` puts them into a fresh base.

The text encoder's weights stay frozen. By default the identifier reaches the UNet through the frozen encoder's
pieces of it (MiniLM splits "sks" into "sk", "##s"), a fixed code the UNet learns to read. With
dreambooth.train_token the pieces' input embeddings are learnt as well (textual inversion, Gal et al. 2022, inside
DreamBooth, as the paper's text-encoder fine-tuning adapts the encoder): one vector per piece, starting from the
vocabulary's rows (so the run starts at the base exactly), kept as the UNet's `dreambooth_token` weight so the
trainer's optimizer, EMA, checkpoints and resume carry it; subject prompts then go through the encoder every step
(with gradients into those vectors only), and `TokenTextEncoder` feeds them at generation time
(`training/learnt_token.py`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..diffusion import GaussianDiffusion, training_losses
from ..diffusion.losses import LossTerms
from .experiment import DreamBoothConfig, ExperimentConfig, has_word
from .learnt_token import TOKEN_PARAM, encode_with_token, piece_ids, token_pieces, with_learnt_token
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

CHUNK = 64  # images / prompts per encoder call while encoding (fixed: cached values depend on it)
PAKHSH_LORA = "pakhsh_lora.json"
LORA_FOLDER = "lora"  # a LoRA run writes its adapters to RUN/lora when it ends
TOKEN_FILE = "token_embedding.safetensors"  # ... beside the adapters of a LoRA folder


class DreamBoothError(ValueError):
    """A DreamBooth input that cannot be used (base, subject images, prompts, adapters); the message names it."""


class DreamBoothTerms(LossTerms):
    """LossTerms with the two halves of the objective attached (`parts`), which the trainer logs."""


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


def _autoencoder(cfg: ExperimentConfig, folder: Path) -> nn.Module:
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


# ---------------------------------------------------------------------------------------------- the token embedding
def check_token_encoder(text_encoder: Any) -> None:
    """Learning the token's input embedding feeds the encoder embeddings instead of ids: BERT-style, last layer."""
    if getattr(text_encoder, "kind", None) != "bert" or text_encoder.config.layer != "last":
        raise DreamBoothError(f"dreambooth.train_token: supported for BERT-style text encoders read at their last "
                              f"layer (minilm), not {text_encoder.config.name_or_path} "
                              f"({getattr(text_encoder, 'kind', '?')}, layer {text_encoder.config.layer})")


# ---------------------------------------------------------------------------------------------- the config
DEFAULT_STEPS = 400
DEFAULT_BATCH = 4
DEFAULT_LR = {False: 3e-4, True: 1e-3}  # full fine-tuning, LoRA (chosen on the demo subject: docs/results/)


def dreambooth_config(base: str, subject: str | Path, out: str | Path, db: DreamBoothConfig, *,
                      steps: int = DEFAULT_STEPS, batch_size: int = DEFAULT_BATCH, lr: float | None = None,
                      seed: int = 0, overrides: list[str] | None = None) -> ExperimentConfig:
    """The config of a DreamBooth run on `subject` (a folder of images): the base's net, diffusion, autoencoder and
    conditions; the subject folder as data (strict: an unreadable image is an error, not skipped); no caption
    dropout (the paper has none); `overrides` (`--set key=value`) last."""
    from ..config import apply_overrides, from_dict, to_dict
    from ..data import DataConfig
    from .experiment import TrainConfig

    bcfg, _ = read_base_config(base)
    assert bcfg.condition is not None
    if Path(base).expanduser().exists():  # a folder: recorded absolute, so the run finds it from anywhere
        base = str(Path(base).expanduser().resolve())
    lora = db.lora_rank is not None
    # nothing here depends on `steps`: a run extended with --resume --steps N continues the same schedule
    train = TrainConfig(steps=steps, batch_size=batch_size, lr=lr if lr is not None else DEFAULT_LR[lora],
                        warmup_steps=20, ema_rates=(0.99,), mixed_precision=bcfg.train.mixed_precision,
                        seed=seed, log_every=10, save_every=100, sample_every=0, num_preview=4, keep_last=2,
                        out_dir=str(out), grad_clip=1.0)
    cfg = ExperimentConfig(
        name="dreambooth", data=DataConfig(name="folder", path=str(subject), image_size=bcfg.data.image_size,
                                           strict=True, crop="center"),
        model=bcfg.model, diffusion=bcfg.diffusion, train=train, class_names=bcfg.class_names, latent=bcfg.latent,
        condition=replace(bcfg.condition, text_dropout=0.0), dreambooth=replace(db, base=base))
    if overrides:
        cfg = from_dict(ExperimentConfig, apply_overrides(to_dict(cfg), overrides))
    return cfg


# ---------------------------------------------------------------------------------------------- prompts, token
def _shapes_words() -> set[str]:
    from ..data.builtin.shapes import _POSITION_PHRASES, COLOR_NAMES, SHAPES, SIZES

    words = {"a", "an", "and", "on", "background", *SHAPES, *COLOR_NAMES, *SIZES}
    for phrase in _POSITION_PHRASES:
        words.update(phrase.split())
    return words


def check_token(db: DreamBoothConfig, base_cfg: ExperimentConfig) -> None:
    """The identifier must be a word the base does not already use: a shapes base knows its caption words."""
    if base_cfg.data.name == "shapes" and db.token.lower() in _shapes_words():
        raise DreamBoothError(f"--token {db.token}: the base was trained on captions using that word; pick a rare "
                              "word it never saw, e.g. sks")


def subject_prompts(dataset: Any, db: DreamBoothConfig, root: str | None = None) -> list[str]:
    """Each subject image's prompt: its own caption (NAME.txt / captions.jsonl) where it has one, else the instance
    prompt. A caption without the token is an error naming the file: the subject would be learnt without its
    identifier, i.e. as the plain class."""
    captions = getattr(dataset, "captions", None)
    paths = getattr(dataset, "paths", None)
    out = []
    for i in range(len(dataset)):
        text = captions[i] if captions is not None and captions[i].strip() else db.instance
        if not has_word(text, db.token):
            where = str(paths[i]) if paths is not None else f"subject image {i}"
            raise DreamBoothError(f"{where}: its caption {text!r} lacks the token {db.token!r}; write the identifier "
                                  f"into every caption (e.g. \"a {db.token} {db.class_noun} ...\")")
        out.append(text)
    return out


def class_noun_notice(prompts: list[str], noun: str, what: str) -> str | None:
    """A notice naming the prompts that lack the class noun (the paper pairs the identifier with it: without it the
    model must tie the subject's whole appearance to the rare token alone)."""
    lacking = [p for p in dict.fromkeys(prompts) if not has_word(p, noun)]
    if not lacking:
        return None
    shown = "; ".join(repr(p) for p in lacking[:3]) + (" ..." if len(lacking) > 3 else "")
    return f"{what} lacks the class noun {noun!r}: {shown}"


def token_notice(cfg: ExperimentConfig | None, prompts: list[str]) -> str | None:
    """For `pakhsh generate` with a DreamBooth model: prompts that do not name the subject's identifier draw the plain
    class, which is allowed but usually not what was meant."""
    db = getattr(cfg, "dreambooth", None)
    if db is None:
        return None
    lacking = list(dict.fromkeys(p for p in prompts if p and not has_word(p, db.token)))
    if not lacking:
        return None
    shown = "; ".join(repr(p) for p in lacking[:3]) + (" ..." if len(lacking) > 3 else "")
    return (f"{shown} lack{'s' * (len(lacking) == 1)} the identifier {db.token!r} this model learnt its subject "
            f"under, so {'it draws' if len(lacking) == 1 else 'they draw'} the plain class (the subject: "
            f"\"{db.instance} ...\")")


# ---------------------------------------------------------------------------------------------- class images
def class_cache_key(fingerprint: str, db: DreamBoothConfig, prompts: list[str], image_size: int) -> str:
    return hashlib.sha256(json.dumps([fingerprint, prompts, db.class_images, db.class_seed, db.class_steps,
                                      db.class_guidance, image_size, "ddim"]).encode()).hexdigest()[:24]


def class_image_prompts(prompts: list[str], count: int) -> list[str]:
    """Class image i's prompt: prompts[i mod P] (so K a multiple of S pairs each subject image, item j -> subject
    j mod S and class j mod K, with class images of its own prompt)."""
    return [prompts[i % len(prompts)] for i in range(count)]


def class_images(model: Any, db: DreamBoothConfig, prompts: list[str], fingerprint: str, image_size: int,
                 device: torch.device, progress: bool = True) -> tuple[Tensor, bool]:
    """(uint8 (K, 3, H, W) class images, whether they came from the cache). Image i is the frozen base's DDIM
    sample of class_image_prompts(prompts)[i] from noise seeded by (class_seed, i); the set is cached under the
    pakhsh cache, keyed by the base's fingerprint, the prompts, the count and the sampling settings (a damaged file
    is redone)."""
    from safetensors.torch import load_file, save_file

    from ..config import cache_root
    from ..pipelines.text_to_image import TextToImagePipeline
    from ..pipelines.unconditional import SampleSettings

    path = cache_root() / "dreambooth" / f"class_{class_cache_key(fingerprint, db, prompts, image_size)}.safetensors"
    if path.is_file():
        try:
            found = load_file(str(path))["images"]
            if found.shape[0] == db.class_images and found.dtype == torch.uint8:
                return found, True
        except Exception:  # a damaged cache file is regenerated, never trusted
            pass
    pipe = TextToImagePipeline(model, device=device, spacing="pakhsh")
    settings = SampleSettings("ddim", db.class_steps, guidance=db.class_guidance)
    x = pipe.generate(class_image_prompts(prompts, db.class_images), None, settings, seed=db.class_seed,
                      batch_size=16, progress=progress)
    images = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).contiguous()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp")
        save_file({"images": images}, str(tmp), metadata={"prompts": json.dumps(prompts),
                                                            "base_fingerprint": fingerprint})
        os.replace(tmp, path)
    except OSError:  # a read-only or full cache only costs the next run this generation
        pass
    return images, False


# ---------------------------------------------------------------------------------------------- the system
class DreamBoothSystem:
    """Frozen parts, encoded subject and class images and their prompt tokens; the batches of a DreamBooth run."""

    def __init__(self, cfg: ExperimentConfig, autoencoder: nn.Module, text_encoder: Any, base: dict[str, Tensor],
                 device: torch.device) -> None:
        assert cfg.dreambooth is not None and cfg.latent is not None and cfg.latent.scale_factor is not None
        self.cfg = cfg
        self.db: DreamBoothConfig = cfg.dreambooth
        self.autoencoder = autoencoder.to(device).eval().requires_grad_(False)
        self.text_encoder = text_encoder.to(device)
        self.base = base
        self.device = device
        self.scale = float(cfg.latent.scale_factor)
        self.subject_prompts: list[str] = []
        self.subject_images: Tensor | None = None  # (S, 3, H, W) float in [-1, 1] (previews)
        self.class_images: Tensor | None = None  # (K, 3, H, W) uint8
        self.class_prompts: list[str] = []  # class image i's prompt
        self._moments: dict[str, Tensor] = {}  # "subject" (S, 2C, h, w), "class" (K, 2C, h, w) float32, CPU
        self._tokens: dict[str, tuple[Tensor, Tensor]] = {}  # tokens (N, L, D) float16 and masks (N, L)

    @property
    def halves(self) -> int:
        """Examples per training item: subject + class (prior preservation) or the subject alone."""
        return 2 if self.db.uses_prior else 1

    @property
    def num_subject(self) -> int:
        return len(self.subject_prompts)

    @property
    def num_class(self) -> int:
        return 0 if self.class_images is None else int(self.class_images.shape[0])

    def items(self) -> int:
        """Training items: every (subject j mod S, class j mod K) pairing once, at least one global batch."""
        s, k, b = self.num_subject, self.num_class, self.cfg.train.batch_size
        n = math.lcm(s, k) if self.halves == 2 else s
        return n * max(1, math.ceil(b / n))

    def pair(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """Training items -> (subject indices, class indices)."""
        index = torch.as_tensor(index, dtype=torch.long)
        return index % self.num_subject, index % max(1, self.num_class)

    # ------------------------------------------------------------------ building
    def prepare(self, dataset: Any, prompts: list[str], klass: Tensor | None, class_prompts: list[str],
                progress: bool = True) -> None:
        """Encode the subject images and the class images once (posterior moments, fixed chunks, index order) and
        their prompts' tokens, so a value never depends on the batch that asks for it and resume is exact."""
        from ..conditioning.text import cached_caption_tokens

        self.subject_prompts = list(prompts)
        self.subject_images = torch.stack([dataset[i]["image"].float() for i in range(len(dataset))])
        self.class_images = klass
        self._moments["subject"] = self._encode(self.subject_images)
        self._tokens["subject"] = cached_caption_tokens(self.text_encoder, self.subject_prompts, CHUNK, False)
        if klass is not None:
            self._moments["class"] = self._encode(klass.float() / 127.5 - 1)
            self.class_prompts = class_image_prompts(class_prompts, len(klass))
            self._tokens["class"] = cached_caption_tokens(self.text_encoder, self.class_prompts, CHUNK, False)

    def _encode(self, images: Tensor) -> Tensor:
        out = []
        with torch.no_grad():
            for start in range(0, len(images), CHUNK):
                post = self.autoencoder.encode(images[start:start + CHUNK].to(self.device).float())
                out.append(torch.cat([post.mean, post.logvar], 1).float().cpu())
        return torch.cat(out)

    def init_net(self, net: nn.Module) -> None:
        """The run starts from the base's EMA weights (LoRA adapters: B = 0, i.e. the base exactly; a learnt token
        embedding: the vocabulary's rows of its pieces, i.e. the frozen encoder's own encoding)."""
        load_base_into(net, self.base)
        if self.db.train_token:
            with torch.no_grad():
                vocab = self.text_encoder.model.get_input_embeddings().weight
                getattr(net, TOKEN_PARAM).copy_(vocab[piece_ids(self.text_encoder, self.db)].detach().cpu())

    # ------------------------------------------------------------------ what the trainer reads
    def latent_shape(self, image_shape: tuple[int, ...]) -> tuple[int, ...]:
        """What the trainer draws noise for per item: (halves, C, h, w)."""
        ae = self.autoencoder.cfg
        f = ae.downsample_factor
        return self.halves, ae.latent_channels, image_shape[-2] // f, image_shape[-1] // f

    def training_view(self, dataset: Any) -> "_PairView":
        assert self.subject_images is not None
        shape = (self.halves, *self.subject_images.shape[1:])
        return _PairView(self.items(), shape)

    def latents(self, batch: dict[str, Any], eps: Tensor) -> Tensor:
        """(B, halves, C, h, w) scaled posterior samples: mean + std * eps of the pair's subject and class image."""
        from ..nets.autoencoder import DiagonalGaussian

        s, k = self.pair(batch["index"])
        moments = [self._moments["subject"][s]] + ([self._moments["class"][k]] if self.halves == 2 else [])
        z = []
        for h, m in enumerate(moments):
            mean, logvar = m.to(self.device).chunk(2, dim=1)
            post = DiagonalGaussian(mean, logvar, deterministic=not self.autoencoder.cfg.double_z)
            z.append(post.mean.float() + post.std.float() * eps[:, h].to(self.device))
        return torch.stack(z, 1) * self.scale

    def conditions(self, batch: dict[str, Any], u: Tensor, model: nn.Module | None = None) -> dict[str, Tensor]:
        """Model keywords for the flattened batch [subjects (B) | classes (B)]: the prompts' tokens (each dropped to
        "" with probability condition.text_dropout: u[:, 0] for subjects, u[:, 1] for classes) and the nulls of the
        map and layout the base may take. With dreambooth.train_token the subject prompts go through the encoder
        now, with `model`'s token embedding (differentiable); otherwise all tokens come from the cache."""
        c = self.cfg.condition
        assert c is not None
        s, k = self.pair(batch["index"])
        b = len(s)
        tokens, masks = self._tokens["subject"]
        rows = [(tokens[s], masks[s])]
        if self.db.train_token:
            if model is None:
                raise DreamBoothError("dreambooth.train_token: the conditions need the model (its token embedding)")
            net = getattr(model, "module", model)  # DistributedDataParallel wraps the net
            prompts = [self.subject_prompts[i] for i in s.tolist()]
            rows = [encode_with_token(self.text_encoder, prompts, piece_ids(self.text_encoder, self.db),
                                      getattr(net, TOKEN_PARAM))]
        if self.halves == 2:
            ct, cm = self._tokens["class"]
            rows.append((ct[k], cm[k]))
        null_t, null_m = self.null_text()
        u = u.to(self.device)
        ctx, msk = [], []
        for h, (t, m) in enumerate(rows):
            drop = u[:, h] < c.text_dropout
            ctx.append(torch.where(drop[:, None, None], null_t, t.to(self.device).float()))
            msk.append(torch.where(drop[:, None], null_m, m.to(self.device)))
        cond: dict[str, Tensor] = {"context": torch.cat(ctx), "context_mask": torch.cat(msk)}
        n = b * self.halves
        if c.segmap:
            _, h, w = self.latent_shape(tuple(self.subject_images.shape[1:]))[1:]
            cond["concat"] = torch.zeros(n, c.segmap_classes, h, w, device=self.device)
        if c.layout:
            cond["boxes"] = torch.zeros(n, 1, 4, device=self.device)
            cond["box_labels"] = torch.full((n, 1), -1, dtype=torch.long, device=self.device)
        return cond

    def null_text(self) -> tuple[Tensor, Tensor]:
        if "null" not in self._tokens:
            emb = self.text_encoder.encode([""])
            self._tokens["null"] = (emb.tokens.float().to(self.device), emb.mask.to(self.device))
        return self._tokens["null"]

    def checkpoint_files(self) -> dict[str, dict[str, Tensor]]:
        """The frozen autoencoder goes into every checkpoint, as in latent runs (a checkpoint is whole)."""
        return {"autoencoder.safetensors": {k: v.detach().cpu().contiguous()
                                            for k, v in self.autoencoder.state_dict().items()}}

    def preview(self, trainer: Any, path: Path) -> Path:
        """Rows of [subject image | generated from its prompt | class image | generated from the class prompt]
        (the class columns with prior preservation only): 25 DDIM steps, guidance 3, fixed seed."""
        from ..imageio import save_grid
        from ..interop.stable_diffusion import LatentDiffusionModel
        from ..nets.autoencoder import build_autoencoder
        from ..pipelines.text_to_image import TextToImagePipeline
        from ..pipelines.unconditional import SampleSettings
        from .monitor import _preview_net

        cfg = trainer.cfg
        assert cfg.latent is not None and self.subject_images is not None
        n = min(cfg.train.num_preview, self.num_subject)
        vae = build_autoencoder(replace(self.autoencoder.cfg, scaling_factor=self.scale), cfg.latent.autoencoder)
        vae.load_state_dict(self.autoencoder.state_dict())
        m = cfg.model
        net = _preview_net(trainer)
        bundle = LatentDiffusionModel(net, vae, with_learnt_token(self.text_encoder, cfg, net), cfg.diffusion,
                                      (m.image_size, m.image_size), clip_denoised=False, config=cfg)
        pipe = TextToImagePipeline(bundle, device=trainer.acc.device, spacing="pakhsh")
        prompts = self.subject_prompts[:n] + (self.class_prompts[:n] if self.halves == 2 else [])
        with warnings.catch_warnings():  # the class prompt lacks the token on purpose
            warnings.simplefilter("ignore")
            x = pipe.generate(prompts, None, SampleSettings("ddim", 25, guidance=3.0), seed=cfg.train.seed,
                              progress=False).float()
        cols = [self.subject_images[:n].float(), x[:n]]
        if self.halves == 2:
            assert self.class_images is not None
            real = self.class_images[torch.arange(n) % self.num_class].float() / 127.5 - 1
            cols += [real, x[n:]]
        rows = torch.stack(cols, 1)
        return save_grid(rows.flatten(0, 1), path, nrow=len(cols), scale=2)


class _PairView(torch.utils.data.Dataset):
    """Training item i: its index (the system pairs subject and class images by it) and a zero placeholder image
    of shape (halves, C, H, W), from which the trainer reads the shape of what it draws noise for."""

    def __init__(self, n: int, shape: tuple[int, ...]) -> None:
        self.n, self.image = n, torch.zeros(shape)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.image, "index": int(index)}


def start_dreambooth_system(cfg: ExperimentConfig, dataset: Any, device: torch.device, checkpoint: Path | None,
                            progress: bool = True, out: Path | None = None
                            ) -> tuple[DreamBoothSystem, ExperimentConfig]:
    """Load the base (its EMA UNet, autoencoder and text encoder), check the run's config against it, read the
    subject prompts, generate or load the class images and encode everything -> (system, cfg with the base's
    fingerprint and the token's pieces filled in). Resuming from `checkpoint`, the base must be the one the run
    started from. `out`: where to write class_images.png (a look at what prior preservation trains on)."""
    from ..conditioning.text import TextEncoder
    from ..interop.stable_diffusion import LatentDiffusionModel
    from ..nets.autoencoder import build_autoencoder
    from .checkpoint import config_diff, read_config

    db = cfg.dreambooth
    assert db is not None and cfg.latent is not None and cfg.condition is not None
    base_cfg, folder = read_base_config(db.base)
    for section in ("model", "diffusion", "latent", "condition.text"):
        ours, theirs = cfg, base_cfg
        for part in section.split("."):
            ours, theirs = getattr(ours, part), getattr(theirs, part)
        if diffs := config_diff(theirs, ours, f"{section}."):
            raise DreamBoothError(f"dreambooth: the run's {section} must be the base's ({db.base}): "
                                  + "; ".join(diffs[:3]))
    check_token(db, base_cfg)
    prompts = subject_prompts(dataset, db)
    if notice := class_noun_notice(prompts, db.class_noun, "the subject's prompt"):
        warnings.warn(notice + " (the paper pairs the identifier with the class noun: \"a sks dog\")", stacklevel=2)
    class_prompts = db.class_prompts(prompts)
    if db.uses_prior and (notice := class_noun_notice(class_prompts, db.class_noun, "the class prompt")):
        warnings.warn(notice, stacklevel=2)
    base = load_base_unet(folder)
    autoencoder = _autoencoder(base_cfg, folder)
    fingerprint = weights_fingerprint(base, autoencoder.state_dict())
    if checkpoint is not None:
        saved = read_config(checkpoint).dreambooth
        if saved is not None and saved.base_fingerprint not in (None, fingerprint):
            raise DreamBoothError(f"--resume: the base {db.base} changed since the run started (fingerprint "
                                  f"{saved.base_fingerprint}, now {fingerprint}); start a new run")
    text = TextEncoder(cfg.condition.text)
    if db.train_token:
        check_token_encoder(text)
    pieces = token_pieces(text.tokenizer, db.token)
    cfg = replace(cfg, dreambooth=replace(db, base_fingerprint=fingerprint, token_pieces=pieces))
    db = cfg.dreambooth
    assert db is not None
    system = DreamBoothSystem(cfg, autoencoder, text, base, device)
    klass = None
    if db.uses_prior:
        from ..nets.unet import UNet

        unet = UNet(base_cfg.model)
        unet.load_state_dict(base)
        lat = base_cfg.latent
        assert lat is not None and lat.autoencoder_config is not None
        vae = build_autoencoder(replace(lat.autoencoder_config, scaling_factor=lat.scale_factor), lat.autoencoder)
        vae.load_state_dict(autoencoder.state_dict())
        m = base_cfg.model
        bundle = LatentDiffusionModel(unet.eval(), vae.eval(), text, base_cfg.diffusion, (m.image_size, m.image_size),
                                      clip_denoised=False, config=base_cfg)
        klass, cached = class_images(bundle, db, class_prompts, fingerprint, cfg.data.image_size, device, progress)
        more = f" and {len(class_prompts) - 1} more prompt(s)" if len(class_prompts) > 1 else ""
        print(f"class images: {len(klass)} of {class_prompts[0]!r}{more} from the frozen base "
              f"({'cached' if cached else 'generated now, cached'})", file=sys.stderr, flush=True)
        if out is not None:
            from ..imageio import save_grid

            out.mkdir(parents=True, exist_ok=True)
            save_grid(klass[:32].float() / 127.5 - 1, out / "class_images.png", nrow=8, scale=2)
    system.prepare(dataset, prompts, klass, class_prompts, progress)
    what = f"LoRA rank {db.lora_rank} on the attention of" if db.lora_rank is not None else "full fine-tuning of"
    if db.train_token:
        what = "the token's input embedding and " + what
    prior = (f" + {len(klass)} class images (lambda {db.prior_weight:g})" if klass is not None
             else " (no prior preservation)")
    more = " ..." if len(prompts) > 1 else ""
    print(f"DreamBooth: {what} {db.base}; {len(prompts)} subject image(s) of {prompts[0]!r}{more}{prior}; token "
          f"{db.token!r} = {len(pieces)} tokenizer piece(s) {' '.join(pieces)}", file=sys.stderr, flush=True)
    return system, cfg


# ---------------------------------------------------------------------------------------------- the objective
def dreambooth_losses(cfg: ExperimentConfig, model: Any, diffusion: GaussianDiffusion, batch: dict[str, Any],
                      draws: Any, system: DreamBoothSystem) -> DreamBoothTerms:
    """Per item: l_subject + lambda * l_prior, both the base's diffusion loss (one UNet call on the 2B examples);
    `parts` holds the two halves for the log."""
    assert draws.latent_eps is not None and draws.u is not None and cfg.dreambooth is not None
    z0 = system.latents(batch, draws.latent_eps)  # (B, halves, C, h, w)
    b, halves = z0.shape[:2]
    t = draws.t
    if halves == 2:
        T = diffusion.num_steps
        t_class = (draws.u[:, 2].to(t.device) * T).long().clamp(max=T - 1)
        t = torch.cat([t, t_class])
    flat = z0.transpose(0, 1).reshape(b * halves, *z0.shape[2:])  # [subjects | classes]
    noise = draws.noise.to(flat).transpose(0, 1).reshape(b * halves, *z0.shape[2:])
    cond = system.conditions(batch, draws.u, model)
    terms = training_losses(diffusion, model, flat, t, loss_type=cfg.diffusion.loss, noise=noise, cond=cond,
                            vlb_weight=cfg.diffusion.vlb_weight)
    lam = float(cfg.dreambooth.prior_weight)

    def combine(x: Tensor) -> Tensor:
        return x[:b] + lam * x[b:] if halves == 2 else x

    out = DreamBoothTerms(combine(terms.loss), combine(terms.mse), combine(terms.vb))
    prior = terms.loss[b:] if halves == 2 else torch.zeros_like(terms.loss)
    out.parts = {"subject_loss": terms.loss[:b].detach(), "prior_loss": prior.detach()}  # type: ignore[attr-defined]
    return out
