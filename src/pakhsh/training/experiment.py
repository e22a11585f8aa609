"""The experiment config: one dataclass per component, gathered; read from YAML + `--set` overrides."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..data import DataConfig
from ..diffusion import DiffusionConfig
from ..config import ConfigError, apply_overrides, from_dict, load_yaml
from ..conditioning.text import TextEncoderConfig
from ..nets.autoencoder import AutoencoderConfig
from ..nets.clip import CLIPConfig
from ..nets.prior import PriorConfig
from ..nets.unet import UNetConfig
from ..tasks import TASK_NAMES, TaskConfig


MAX_LR = 1.0
DEVICE_RE = re.compile(r"auto|cpu|cuda(:\d+)?")


@dataclass
class TrainConfig:
    """The optimisation loop: what minGPT's trainer and iDDPM's TrainLoop take, with pakhsh defaults."""

    steps: int = 10000  # optimizer steps
    batch_size: int = 64  # global batch (split over processes) per optimizer step, before accumulation
    grad_accum: int = 1  # micro-batches per optimizer step (effective batch = batch_size * grad_accum)
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 200  # linear learning-rate warm-up
    grad_clip: float = 1.0  # max global gradient norm (0 = off)
    ema_rates: tuple[float, ...] = (0.9999,)
    ema_warmup: bool = True  # cap the EMA rate at (1+step)/(10+step) early on (helps short runs)
    sample_ema: float | None = None  # which EMA previews and exports use (default: the first rate)
    # autocast dtype (fp16 on GPU only); auto: bf16 where the device runs it natively, else no (see precision.py)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    timestep_sampler: Literal["uniform", "loss-aware"] = "uniform"
    class_dropout: float = 0.1  # class-conditional models: labels replaced by the null class (for CFG)
    seed: int = 0
    log_every: int = 50
    save_every: int = 1000
    sample_every: int = 1000  # preview grid of EMA samples (0 = never)
    num_preview: int = 16
    preview_steps: int = 100  # ancestral sampling steps of the preview grids
    keep_last: int = 3  # checkpoints kept on disk
    out_dir: str | None = None  # None: runs/<name>
    device: str = "auto"  # "auto" lets accelerate choose (GPU when present)
    num_workers: int | None = None  # loader processes; None: auto (spare cores on a GPU, 0 on a CPU)
    # stop (saving a checkpoint, like Ctrl-C) once this much training time has passed in this call; None: no limit
    # (for runs with a time budget: schedulers' job limits, equal-compute comparisons)
    max_minutes: float | None = None

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        self.ema_rates = tuple(self.ema_rates)
        checks = {
            "steps": self.steps >= 1, "batch_size": self.batch_size >= 1, "grad_accum": self.grad_accum >= 1,
            "warmup_steps": self.warmup_steps >= 0, "save_every": self.save_every >= 1,
            "keep_last": self.keep_last >= 1, "class_dropout": 0 <= self.class_dropout < 1,
            "ema_rates": len(self.ema_rates) >= 1, "log_every": self.log_every >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"train.{name} has an invalid value: {getattr(self, name)!r}")
        if self.sample_ema is not None and self.sample_ema not in self.ema_rates:
            raise ValueError(f"train.sample_ema {self.sample_ema} is not one of train.ema_rates {self.ema_rates}")
        # AdamW steps are about lr in size whatever the gradient: lr > 1 blows the weights up within a step
        if not 0 < self.lr <= MAX_LR:
            raise ValueError(f"train.lr={self.lr!r} is out of range: use a learning rate in (0, {MAX_LR:g}] "
                             "(diffusion models train with about 1e-4)")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"train.max_minutes={self.max_minutes!r}: must be > 0 (or null: no limit)")
        if not DEVICE_RE.fullmatch(str(self.device)):
            raise ValueError(f"train.device={self.device!r} is not a device: use auto, cpu, cuda or cuda:N")

    @property
    def preview_ema(self) -> float:
        return self.sample_ema if self.sample_ema is not None else self.ema_rates[0]


@dataclass
class AutoencoderLossConfig:
    """What an autoencoder run minimises (latent-diffusion's first stage): L1 (+ L2) reconstruction, KL to N(0, I)
    with a small weight, and optionally a patch discriminator's hinge loss once `disc_start` steps have passed."""

    l1_weight: float = 1.0
    l2_weight: float = 0.0
    kl_weight: float = 1e-6  # latent-diffusion's kl-f* weight: keeps latents near N(0, I) without blurring
    disc_weight: float = 0.0  # 0: no discriminator (none is built)
    disc_start: int = 1000  # optimizer steps of reconstruction alone before the adversarial term joins
    disc_channels: int = 32  # width of the patch discriminator's first layer
    disc_layers: int = 2  # stride-2 layers: the receptive field (patch) grows with them

    def __post_init__(self) -> None:
        for name in ("l1_weight", "l2_weight", "kl_weight", "disc_weight"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v >= 0 and v == v and v != float("inf")):
                raise ValueError(f"autoencoder_loss.{name}={v!r}: must be a finite number >= 0")
        if self.l1_weight + self.l2_weight <= 0:
            raise ValueError("autoencoder_loss: l1_weight + l2_weight must be > 0 (nothing asks for reconstruction)")
        if self.disc_start < 0 or self.disc_channels < 1 or self.disc_layers < 1:
            raise ValueError("autoencoder_loss: disc_start >= 0, disc_channels >= 1 and disc_layers >= 1 are needed")


@dataclass
class LatentConfig:
    """Latent diffusion: the diffusion runs on a frozen autoencoder's latents (Rombach et al. 2022)."""

    autoencoder: str = "autoencoder_f4"  # a shipped autoencoder, an autoencoder run folder or checkpoint
    # latents are multiplied by this before the diffusion sees them; None: 1 / std of the latents of the first
    # `scale_samples` training images, measured when training starts and stored in the run's config
    scale_factor: float | None = None
    scale_samples: int = 1024
    # filled when training starts: the autoencoder's config (its weights go into every checkpoint beside the UNet)
    autoencoder_config: AutoencoderConfig | None = None

    def __post_init__(self) -> None:
        if self.scale_factor is not None and not (0 < self.scale_factor < float("inf")):
            raise ValueError(f"latent.scale_factor={self.scale_factor!r}: must be a finite number > 0 (or null: "
                             "measured from the data)")
        if self.scale_samples < 1:
            raise ValueError(f"latent.scale_samples={self.scale_samples!r}: must be >= 1")


@dataclass
class ConditionConfig:
    """What a latent model is conditioned on; each condition is dropped independently in training (set to its
    null) with its own probability, so one model samples with any subset and classifier-free guidance has an
    unconditional branch (every condition null)."""

    text: TextEncoderConfig | None = None  # captions through a frozen text encoder -> cross-attention tokens
    segmap: bool = False  # the data's segmentation map, one-hot, area-downsampled, concatenated to x_t
    segmap_classes: int = 7  # shapes: background + 6 shapes
    layout: bool = False  # the data's boxes with class labels -> tokens (model.layout_classes)
    text_dropout: float = 0.1  # caption -> "" (the empty prompt)
    segmap_dropout: float = 0.5
    layout_dropout: float = 0.5

    def __post_init__(self) -> None:
        for name in ("text_dropout", "segmap_dropout", "layout_dropout"):
            v = getattr(self, name)
            if not 0 <= v < 1:
                raise ValueError(f"condition.{name}={v!r}: must be in [0, 1)")
        if self.segmap_classes < 2:
            raise ValueError(f"condition.segmap_classes={self.segmap_classes!r}: must be >= 2")

    @property
    def any(self) -> bool:
        return self.text is not None or self.segmap or self.layout


@dataclass
class UnclipConfig:
    """unCLIP's prior (objective=prior) and decoder (objective=diffusion with this section): both read a frozen
    CLIP run's embeddings; the CLIP's weights go into every checkpoint beside the trained net, so a checkpoint is
    whole and a prior and a decoder can be checked to share one CLIP (`clip_fingerprint`)."""

    clip: str = "unclip_clip"  # a shipped CLIP, a CLIP run folder or checkpoint
    caption: bool = False  # decoder: also cross-attend to the caption's tokens (GLIDE-style; the prior always does)
    text_dropout: float = 0.1  # the caption -> "" (prior: tokens and text embedding; decoder: its tokens)
    embed_dropout: float = 0.1  # decoder: the image embedding -> zeros (the null of classifier-free guidance)
    # filled when training starts, from the CLIP: its config, its text encoder and a hash of its weights
    clip_config: CLIPConfig | None = None
    text: TextEncoderConfig | None = None
    clip_fingerprint: str | None = None

    def __post_init__(self) -> None:
        for name in ("text_dropout", "embed_dropout"):
            v = getattr(self, name)
            if not 0 <= v < 1:
                raise ValueError(f"unclip.{name}={v!r}: must be in [0, 1)")


@dataclass
class DreamBoothConfig:
    """DreamBooth (Ruiz et al. 2023): fine-tune a latent text-to-image `base` on a few images of one subject, named
    by a rare identifier `token` beside its `class_noun` ("a sks star"), while images of the plain class that the
    frozen base generated ("a star") are trained alongside with weight `prior_weight` (prior preservation), so the
    class keeps its diversity and the class noun its meaning. See training/dreambooth.py."""

    base: str = "t2i"  # the latent model the run starts from (its EMA weights): shipped name, run or checkpoint
    token: str = "sks"  # the rare identifier; one word (the tokenizer may split it into pieces)
    class_noun: str = "star"
    instance_prompt: str | None = None  # subject images without a caption of their own; None: "a {token} {noun}"
    # what the frozen base generates the class images from; None: each subject prompt without the token (the paper's
    # "a [V] dog" -> "a dog"; captioned subjects keep their context: "a star at the top left on a gray background")
    class_prompt: str | None = None
    class_images: int = 100  # generated once and cached (0 with prior_weight 0: no prior preservation)
    prior_weight: float = 1.0  # lambda in L = L_subject + lambda * L_prior
    class_seed: int = 0  # class image i starts from noise seeded by (class_seed, i)
    class_steps: int = 25  # DDIM steps of the class images
    class_guidance: float = 3.0
    lora_rank: int | None = None  # None: full fine-tuning of the UNet; r: LoRA adapters on its attention projections
    lora_alpha: float | None = None  # the adapters' scale is alpha / rank; None: alpha = rank
    # also learn the identifier's input embedding in the frozen text encoder (textual inversion: one vector per
    # tokenizer piece of the token, starting from the pieces' own embeddings); BERT-style encoders (minilm)
    train_token: bool = False
    # filled when training starts: a hash of the base's weights (UNet + autoencoder) and the token's tokenizer pieces
    base_fingerprint: str | None = None
    token_pieces: list[str] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.token, str) or not self.token.strip() or len(self.token.split()) != 1:
            raise ValueError(f"dreambooth.token={self.token!r}: must be one word, e.g. sks")
        if not isinstance(self.class_noun, str) or not self.class_noun.strip():
            raise ValueError(f"dreambooth.class_noun={self.class_noun!r}: name the subject's class, e.g. star")
        if self.token.lower() in self.class_noun.lower().split():
            raise ValueError(f"dreambooth.token={self.token!r} is the class noun itself: pick a rare word, e.g. sks")
        if not (isinstance(self.prior_weight, (int, float)) and 0 <= self.prior_weight < float("inf")):
            raise ValueError(f"dreambooth.prior_weight={self.prior_weight!r}: must be a finite number >= 0")
        if self.class_images < 0 or (self.prior_weight > 0 and self.class_images < 1):
            raise ValueError(f"dreambooth.class_images={self.class_images}: prior preservation (prior_weight "
                             f"{self.prior_weight:g}) needs >= 1 class image; set prior_weight=0 to train without")
        if self.class_steps < 1 or not self.class_guidance >= 0:
            raise ValueError("dreambooth.class_steps must be >= 1 and dreambooth.class_guidance >= 0")
        if self.lora_rank is not None and self.lora_rank < 1:
            raise ValueError(f"dreambooth.lora_rank={self.lora_rank}: must be >= 1 (or null: full fine-tuning)")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ValueError(f"dreambooth.lora_alpha={self.lora_alpha!r}: must be > 0 (or null: the rank)")
        if self.instance_prompt is not None and not has_word(self.instance_prompt, self.token):
            raise ValueError(f"dreambooth.instance_prompt={self.instance_prompt!r} lacks the token {self.token!r}: "
                             "the identifier is what the subject is learnt under")

    @property
    def instance(self) -> str:
        return self.instance_prompt if self.instance_prompt is not None else f"a {self.token} {self.class_noun}"

    def class_prompts(self, subject_prompts: list[str]) -> list[str]:
        """The class images' prompts: `class_prompt`, or each distinct subject prompt with the token taken out."""
        if self.class_prompt is not None:
            return [self.class_prompt]
        return list(dict.fromkeys(without_word(p, self.token) for p in subject_prompts))

    @property
    def uses_prior(self) -> bool:
        return self.prior_weight > 0


def without_word(text: str, word: str) -> str:
    """`text` with every whole-word `word` taken out: "a sks star at the top" -> "a star at the top"."""
    return " ".join(re.sub(rf"(?<!\w){re.escape(word)}(?!\w)", " ", text, flags=re.IGNORECASE).split())


def has_word(text: str, word: str) -> bool:
    """`word` as a whole word of `text`, ignoring case ("a SKS star" has sks; "asks" does not)."""
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, re.IGNORECASE) is not None


@dataclass
class ExperimentConfig:
    """Everything one training run needs; saved as config.json beside every checkpoint."""

    name: str | None = None  # None: the image folder's name for data.name=folder, else "experiment"
    data: DataConfig = field(default_factory=DataConfig)
    model: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # names of labels 0..N-1: recorded from the dataset when training starts, so pipelines take `--label cat`
    class_names: list[str] | None = None
    # image-to-image (Palette): the degradation the model learns to undo; None for unconditional / class models
    task: TaskConfig | None = None
    # "diffusion"; "regression" (Palette only: the same net maps the degraded image to x_0 in one pass, the
    # paper's baseline); "autoencoder" (trains the KL autoencoder `autoencoder` of latent diffusion); "clip"
    # (trains the contrastive image/text encoders `clip` of unCLIP on captioned images, text from condition.text);
    # "prior" (unCLIP's diffusion prior `prior` over the `unclip.clip` embeddings)
    objective: Literal["diffusion", "regression", "autoencoder", "clip", "prior"] = "diffusion"
    autoencoder: AutoencoderConfig | None = None  # objective=autoencoder: the net trained (model is unused)
    autoencoder_loss: AutoencoderLossConfig = field(default_factory=AutoencoderLossConfig)
    latent: LatentConfig | None = None  # latent diffusion: the UNet denoises this autoencoder's latents
    condition: ConditionConfig | None = None  # latent models: text / segmentation map / layout conditions
    clip: CLIPConfig | None = None  # objective=clip: the net trained (model is unused)
    prior: PriorConfig | None = None  # objective=prior: the net trained (model is unused)
    unclip: UnclipConfig | None = None  # unCLIP prior and decoder: the frozen CLIP they read
    dreambooth: DreamBoothConfig | None = None  # a latent text-to-image fine-tune on one subject (+ its class)

    def __post_init__(self) -> None:
        if self.name is None:
            self.name = _folder_name(self.data) or DEFAULT_NAME
        if self.train.out_dir is None:
            self.train.out_dir = f"runs/{self.name}"
        _check_unclip_sections(self)
        if self.dreambooth is not None:
            _check_dreambooth(self)
        if self.objective in ("clip", "prior"):
            return
        if self.objective == "autoencoder":
            if self.autoencoder is None:
                raise ValueError("objective=autoencoder needs an autoencoder: section (the net to train)")
            if self.task is not None or self.latent is not None or self.condition is not None:
                raise ValueError("objective=autoencoder trains the autoencoder alone: remove task, latent and "
                                 "condition")
            return
        if self.autoencoder is not None:
            raise ValueError("an autoencoder: section is only for objective=autoencoder (latent models name theirs "
                             "as latent.autoencoder)")
        if self.task is None:
            if self.objective != "diffusion":
                raise ValueError(f"objective={self.objective} needs an image-to-image task (task.name=...)")
        else:
            _check_task_model(self.task, self.model)
            if self.latent is not None or self.condition is not None:
                raise ValueError("task (Palette) works in pixel space on its own conditions: remove latent and "
                                 "condition")
        if self.condition is not None:
            _check_condition_model(self.condition, self.model)

    @property
    def is_latent(self) -> bool:
        return self.latent is not None

    @property
    def is_autoencoder(self) -> bool:
        return self.objective == "autoencoder"

    @property
    def is_unclip(self) -> bool:
        """A run on unCLIP's frozen parts (training/unclip.py): the CLIP itself, the prior or the decoder."""
        return self.objective in ("clip", "prior") or self.unclip is not None

    @property
    def is_dreambooth(self) -> bool:
        return self.dreambooth is not None


def _check_unclip_sections(cfg: ExperimentConfig) -> None:
    """clip / prior / unclip sections appear exactly with the objectives that read them."""
    if cfg.objective == "clip":
        if cfg.clip is None:
            raise ValueError("objective=clip needs a clip: section (the net to train)")
        if cfg.condition is None or cfg.condition.text is None:
            raise ValueError("objective=clip needs condition.text (the frozen text encoder, e.g. {name_or_path: "
                             "minilm})")
        if cfg.condition.segmap or cfg.condition.layout:
            raise ValueError("objective=clip reads captions only: set condition.segmap and condition.layout false")
        if cfg.task is not None or cfg.latent is not None or cfg.unclip is not None or cfg.prior is not None:
            raise ValueError("objective=clip trains the CLIP alone: remove task, latent, prior and unclip")
        if cfg.clip.max_text_tokens < cfg.condition.text.max_length:
            raise ValueError(f"clip.max_text_tokens={cfg.clip.max_text_tokens} < condition.text.max_length="
                             f"{cfg.condition.text.max_length}")
        return
    if cfg.clip is not None:
        raise ValueError("a clip: section is only for objective=clip (prior and decoder name theirs as unclip.clip)")
    if cfg.objective == "prior":
        if cfg.prior is None or cfg.unclip is None:
            raise ValueError("objective=prior needs a prior: section (the net) and an unclip: section (its CLIP)")
        if cfg.task is not None or cfg.latent is not None or cfg.condition is not None:
            raise ValueError("objective=prior works on CLIP embeddings: remove task, latent and condition")
        if cfg.diffusion.model_output.value != "x0":
            raise ValueError("objective=prior predicts the clean embedding, as unCLIP's prior does: set "
                             "diffusion.model_output=x0")
        if cfg.diffusion.variance.value == "learned_range":
            raise ValueError("objective=prior: diffusion.variance=learned_range is not supported (the prior outputs "
                             "one embedding); use fixed_small")
        return
    if cfg.prior is not None:
        raise ValueError("a prior: section is only for objective=prior")
    if cfg.unclip is not None:
        if cfg.objective != "diffusion" or cfg.task is not None or cfg.latent is not None or cfg.condition is not None:
            raise ValueError("unclip: with objective=diffusion is unCLIP's pixel decoder: remove task, latent and "
                             "condition")
        m = cfg.model
        if m.embed_dim is None:
            raise ValueError("the unCLIP decoder needs model.embed_dim (the CLIP embedding width, e.g. 64)")
        if cfg.unclip.caption and m.context_dim is None:
            raise ValueError("unclip.caption=true needs cross-attention: set model.context_dim to the text "
                             "encoder's width (minilm: 384)")


def _check_dreambooth(cfg: ExperimentConfig) -> None:
    """DreamBooth fine-tunes a latent text-to-image model with the plain diffusion objective."""
    if cfg.objective != "diffusion" or cfg.task is not None or cfg.unclip is not None:
        raise ValueError("dreambooth: fine-tunes a text-to-image model: objective=diffusion, no task, no unclip")
    if cfg.latent is None or cfg.condition is None or cfg.condition.text is None:
        raise ValueError("dreambooth: needs a latent text-to-image model (latent and condition.text sections)")
    if cfg.train.timestep_sampler != "uniform":
        raise ValueError("dreambooth: train.timestep_sampler must be uniform (the class half draws its own t)")
    if cfg.model.num_classes is not None:
        raise ValueError("dreambooth: class-conditional latent models are not supported (model.num_classes)")


def _check_condition_model(cond: ConditionConfig, model: UNetConfig) -> None:
    """The UNet must take exactly the conditions the config feeds it."""
    if cond.text is not None and model.context_dim is None:
        raise ValueError("condition.text needs cross-attention: set model.context_dim to the text encoder's width "
                         "(minilm: 384)")
    want = cond.segmap_classes if cond.segmap else 0
    if model.cond_channels != want:
        raise ValueError(f"condition.segmap={cond.segmap} needs model.cond_channels={want}, got {model.cond_channels}")
    layout_classes = getattr(model, "layout_classes", None)
    if cond.layout and layout_classes is None:
        raise ValueError("condition.layout needs model.layout_classes (the number of box labels, shapes: 6) and "
                         "model.context_dim")
    if not cond.layout and layout_classes is not None:
        raise ValueError("model.layout_classes is set but condition.layout is false: set condition.layout=true")


def _check_task_model(task: TaskConfig, model: UNetConfig) -> None:
    """A Palette net takes [x_t, degraded image, mask]; a multi-task one also the task as its label."""
    want = model.in_channels + 1
    if model.cond_channels != want:
        raise ValueError(f"task.name={task.name} needs model.cond_channels={want} (the degraded image's "
                         f"{model.in_channels} channels + the mask), got {model.cond_channels}")
    if model.in_channels != model.out_channels:
        raise ValueError(f"task.name={task.name}: model.in_channels={model.in_channels} must equal "
                         f"model.out_channels={model.out_channels}")
    if task.name == "multi" and model.num_classes != len(TASK_NAMES):
        raise ValueError(f"task.name=multi takes the task as a label: set model.num_classes={len(TASK_NAMES)} "
                         f"({', '.join(TASK_NAMES)}), got {model.num_classes}")
    if task.name != "multi" and model.num_classes is not None:
        raise ValueError(f"task.name={task.name} is one task: set model.num_classes=null (or task.name=multi)")
    if task.name == "superres" and model.image_size % task.scale:
        raise ValueError(f"task.scale={task.scale}: model.image_size={model.image_size} must be a multiple of it "
                         "(the low-resolution input is image_size / scale)")


DEFAULT_NAME = "experiment"
# the configs shipped inside the package: `pakhsh train NAME` finds them from any directory
SHIPPED_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _folder_name(data: DataConfig) -> str | None:
    """The image folder's own name (`/data/pets/` -> "pets"), for runs on data.name=folder."""
    if data.name != "folder" or not data.path:
        return None
    return Path(data.path).expanduser().resolve().name or None


def load_experiment(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """YAML file or shipped config name (or defaults) + `key.sub=value` overrides -> a checked ExperimentConfig.

    A run switched onto an image folder by the overrides (`pakhsh train shapes --set data.name=folder ...`) is
    named after the folder: the YAML's name describes the dataset the YAML was written for."""
    data: dict[str, Any] = load_yaml(resolve_config(path)) if path else {}
    merged = apply_overrides(data, overrides or [])
    if _name_is_about_another_dataset(data, merged, overrides or []):
        merged.pop("name", None)
    return from_dict(ExperimentConfig, merged)


def _name_is_about_another_dataset(yaml: dict[str, Any], merged: dict[str, Any], overrides: list[str]) -> bool:
    """True when the run is on a folder but its name came from a YAML written for another dataset."""
    if _section(merged, "data").get("name") != "folder":
        return False
    named_here = any(o.split("=", 1)[0].strip() == "name" for o in overrides)
    return not named_here and _section(yaml, "data").get("name") != "folder"


def _section(cfg: dict[str, Any], key: str) -> dict[str, Any]:
    value = cfg.get(key)
    return value if isinstance(value, dict) else {}


def shipped_configs() -> dict[str, Path]:
    """Name -> path of every config shipped in the package (`shapes` -> .../pakhsh/configs/shapes.yaml)."""
    if not SHIPPED_CONFIGS.is_dir():
        return {}
    return {p.stem: p for p in sorted(SHIPPED_CONFIGS.glob("*.yaml"))}


def config_summary(path: Path) -> str:
    """The first comment line of a YAML config: what it trains."""
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
    return ""


def resolve_config(spec: str | Path) -> Path:
    """A YAML path, or the name of a shipped config (`shapes`, `shapes.yaml`); an existing file wins."""
    p = Path(spec).expanduser()
    if p.is_file():
        return p
    shipped = shipped_configs()
    name = p.name[: -len(p.suffix)] if p.suffix in (".yaml", ".yml") else p.name
    if name in shipped and p.parent in (Path("."), Path("configs")):  # `configs/shapes.yaml`, as older docs wrote it
        return shipped[name]
    what = "is a folder, not a YAML file" if p.is_dir() else "not found"
    raise ConfigError(f"config {spec}: {what}; give a YAML file or a shipped config name "
                      f"({', '.join(shipped) or 'none shipped'}; see `pakhsh configs`)")
