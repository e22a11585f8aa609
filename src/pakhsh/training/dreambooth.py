"""DreamBooth (Ruiz et al. 2023) on the one trainer: subject-driven fine-tuning of a latent text-to-image model.

A few images of one subject are learnt under a rare identifier beside the class noun ("a sks star"); images of the
plain class, generated once by the frozen base ("a star"), are trained alongside, so the model keeps what the class
looks like and what the class noun means (prior preservation):

    L = E[ |eps - eps_theta(z_t, t, c_subject)|^2 ] + lambda * E[ |eps' - eps_theta(z'_t', t', c_class)|^2 ]

(with the base's own prediction target, v here). What DreamBooth is made of, where, and why:

- the run's config (`dreambooth_config`): the base's net, diffusion, autoencoder and text encoder unchanged, the
  subject folder as data, a `dreambooth` section; `pakhsh dreambooth` builds it, `Trainer` runs it like any run;
- the class images (`class_images`, in `training/dreambooth_data.py` with the subject's prompts and the notices
  about them): generated with the frozen base from the class prompts, image i from its own
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
- LoRA (Hu et al. 2021, `training/lora.py`; the base and the adapters' files in `training/dreambooth_base.py`):
  rank-r adapters on every attention projection of the UNet, the
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

import math
import sys
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..diffusion import GaussianDiffusion, training_losses
from ..diffusion.losses import LossTerms
from .dreambooth_base import (
    DreamBoothError,
    base_autoencoder,
    load_base_into,
    load_base_unet,
    read_base_config,
    weights_fingerprint,
)
from .dreambooth_data import check_token, class_image_prompts, class_images, class_noun_notice, subject_prompts
from .experiment import DreamBoothConfig, ExperimentConfig
from .learnt_token import TOKEN_PARAM, encode_with_token, piece_ids, token_pieces, with_learnt_token

CHUNK = 64  # images / prompts per encoder call while encoding (fixed: cached values depend on it)


class DreamBoothTerms(LossTerms):
    """LossTerms with the two halves of the objective attached (`parts`), which the trainer logs."""


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
    autoencoder = base_autoencoder(base_cfg, folder)
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
