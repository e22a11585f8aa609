"""What a run shows while it trains: JSONL log (+ TensorBoard when installed), loss-curve PNG, sample grids."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..imageio import save_grid

if TYPE_CHECKING:
    from .trainer import Trainer


class RunLog:
    """Appends one JSON object per logging interval to run_dir/log.jsonl; mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = True) -> None:
        self.path = Path(run_dir) / "log.jsonl"
        self.enabled = enabled
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(run_dir) / "tb"))
            except Exception:  # TensorBoard is optional: the JSONL log is the record
                self.tb = None

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, record["step"])

    def records(self) -> list[dict[str, Any]]:
        """The logged records; lines that do not parse (a write torn by a crash) are skipped."""
        if not self.path.is_file():
            return []
        return [r for r in map(_parse_record, self.path.read_text(errors="replace").splitlines()) if r is not None]

    def truncate_after(self, step: int) -> None:
        """On resume: drop records past the checkpoint (and torn lines), so the log reads as one history."""
        if not self.enabled or not self.path.is_file():
            return
        keep = [r for r in self.records() if r.get("step", 0) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
        tmp.replace(self.path)

    def plot_loss(self) -> Path | None:
        """loss.png beside the log: training loss (and its MSE / vb parts) against step, log scale."""
        recs = self.records()
        if not self.enabled or not recs:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        steps = [r["step"] for r in recs]
        marker = "o" if len(recs) < 20 else None  # a short run's few points must show, not one invisible dot
        for key in ("loss", "mse", "vb"):
            vals = [r.get(key, 0.0) for r in recs]
            if any(v > 0 for v in vals):
                ax.plot(steps, vals, label=key, marker=marker)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        out = self.path.with_name("loss.png")
        fig.savefig(out)
        plt.close(fig)
        return out


def _parse_record(line: str) -> dict[str, Any] | None:
    """One log line as a record, or None for a blank, torn or foreign line."""
    if not line.strip():
        return None
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) and isinstance(rec.get("step"), int) else None


def describe_data(ds: Any, data: Any, num_classes: int | None, task: Any = None, cfg: Any = None) -> str:
    """One line saying what training found: "folder /x: 50 images in 5 classes (astro, cat, ...)"; for a Palette
    run, the task it learns instead of a hint about class labels; for autoencoder and latent runs, what they use."""
    where = f"folder {data.path}" if data.name == "folder" else f"dataset {data.name}"
    if cfg is not None and cfg.is_autoencoder:
        return f"{where}: {len(ds):,} images ({data.image_size}x{data.image_size}), for the autoencoder"
    if cfg is not None and cfg.is_latent:
        c = cfg.condition
        used = [n for n, on in (("captions", c is not None and c.text is not None),
                                ("segmentation maps", c is not None and c.segmap),
                                ("layouts", c is not None and c.layout),
                                ("class labels", num_classes is not None)) if on]
        return (f"{where}: {len(ds):,} images ({data.image_size}x{data.image_size}) -> latents of "
                f"{cfg.latent.autoencoder}; conditioned on {', '.join(used) or 'nothing (unconditional)'}")
    if cfg is not None and cfg.is_unclip:
        size = f"{len(ds):,} captioned images ({data.image_size}x{data.image_size})"
        if cfg.objective == "clip":
            return f"{where}: {size}, for the contrastive image/text encoders"
        what = "the prior (caption -> image embedding)" if cfg.objective == "prior" else "the decoder"
        return f"{where}: {size} -> embeddings of the CLIP {cfg.unclip.clip}, for {what}"
    names = getattr(ds, "class_names", None)
    count = getattr(ds, "num_classes", None) or (len(names) if names else None)
    if not count:
        if data.name == "folder":
            return f"{where}: {len(ds):,} images, unlabelled (one subfolder per class makes classes)"
        return f"{where}: {len(ds):,} images, unlabelled"
    listed = f" ({', '.join(names[:6])}{', ...' if len(names) > 6 else ''})" if names else ""
    line = f"{where}: {len(ds):,} images in {count} classes{listed}"
    if task is not None:
        return f"{where}: {len(ds):,} images, degraded for {task.name} (Palette; the data's labels are not used)"
    if num_classes is None:
        line += f"; the model is unconditional (model.num_classes={count} would condition on them)"
    return line


@torch.no_grad()
def save_preview(trainer: "Trainer", path: Path) -> Path | None:
    """Sample `num_preview` images from the preview EMA with ancestral steps (fixed seed) and save them as a grid
    (None for runs whose net makes no images: unCLIP's CLIP and prior)."""
    from ..samplers import ancestral_sample

    cfg = trainer.cfg
    if cfg.objective in ("clip", "prior"):
        return None
    if cfg.unclip is not None:
        return _unclip_decoder_preview(trainer, path)
    if cfg.task is not None:
        return _palette_preview(trainer, path)
    if cfg.is_autoencoder:
        return _autoencoder_preview(trainer, path)
    if cfg.is_latent:
        return _latent_preview(trainer, path)
    net = _preview_net(trainer)
    n, size = cfg.train.num_preview, cfg.model.image_size
    g = torch.Generator().manual_seed(cfg.train.seed)
    x_T = torch.randn(n, cfg.model.out_channels, size, size, generator=g).to(trainer.acc.device)
    cond = {}
    if cfg.model.num_classes is not None:
        cond["y"] = (torch.arange(n) % cfg.model.num_classes).to(trainer.acc.device)
    steps = min(cfg.train.preview_steps, trainer.diffusion.num_steps)
    d = trainer.diffusion.respace(str(steps))
    with trainer.acc.autocast():
        x = ancestral_sample(d, net, x_T, cond=cond, generator=g)
    return save_grid(x, path, scale=2)


def _preview_net(trainer: "Trainer") -> Any:
    """A copy of the network holding the preview EMA weights, in eval mode."""
    from .objectives import build_net

    net = build_net(trainer.cfg).to(trainer.acc.device)
    net.load_state_dict(trainer.acc.unwrap_model(trainer.model).state_dict())
    trainer.ema.copy_to(net, trainer.cfg.train.preview_ema)
    return net.eval()


def _palette_preview(trainer: "Trainer", path: Path) -> Path:
    """Rows of [degraded input | output | original] for the first images of the data, degraded and sampled with
    a fixed seed (so grids are comparable across steps)."""
    from ..conditioning.concat import restore
    from .objectives import palette_condition

    cfg, dev = trainer.cfg, trainer.acc.device
    n = min(cfg.train.num_preview, len(trainer.dataset), 8)
    x0 = torch.stack([trainer.dataset[i]["image"] for i in range(n)]).to(dev)
    g = torch.Generator().manual_seed(cfg.train.seed)
    cond = palette_condition(cfg, x0, g)
    steps = min(cfg.train.preview_steps, trainer.diffusion.num_steps)
    x_T = torch.randn(x0.shape, generator=g).to(dev)
    with trainer.acc.autocast():  # ancestral steps, as the unconditional preview
        out = restore(trainer.diffusion.respace(str(steps)), _preview_net(trainer), cond, x_T,
                      objective=cfg.objective, generator=g)
    rows = torch.stack([cond["cond_image"].float().cpu(), out.float().cpu(), x0.float().cpu()], dim=1)  # (n, 3, C, H, W)
    return save_grid(rows.flatten(0, 1), path, nrow=3, scale=2)


def _autoencoder_preview(trainer: "Trainer", path: Path) -> Path:
    """Rows of [original | reconstruction (posterior mean)] for the first images of the data."""
    dev = trainer.acc.device
    n = min(trainer.cfg.train.num_preview, len(trainer.dataset), 16)
    x0 = torch.stack([trainer.dataset[i]["image"] for i in range(n)]).to(dev)
    ae = _preview_net(trainer).autoencoder
    with torch.no_grad(), trainer.acc.autocast():
        recon = ae(x0, sample=False)[0]
    rows = torch.stack([x0.float().cpu(), recon.float().clamp(-1, 1).cpu()], dim=1)
    return save_grid(rows.flatten(0, 1), path, nrow=min(8, 2 * n) // 2 * 2, scale=2)


def _latent_preview(trainer: "Trainer", path: Path) -> Path:
    """The first training captions (and maps / layouts) through the text-to-image pipeline: guidance 3, 25 DDIM
    steps, fixed seed. Rows: [training image | generated]."""
    from dataclasses import replace

    from ..interop.stable_diffusion import LatentDiffusionModel
    from ..nets.autoencoder import build_autoencoder
    from ..pipelines.text_to_image import TextToImagePipeline
    from ..pipelines.unconditional import SampleSettings

    cfg, system = trainer.cfg, trainer.system
    assert cfg.latent is not None and system is not None
    n = min(cfg.train.num_preview, len(trainer.dataset), 16)
    items = [trainer.dataset[i] for i in range(n)]
    vae = build_autoencoder(replace(system.autoencoder.cfg, scaling_factor=cfg.latent.scale_factor),
                            cfg.latent.autoencoder)
    vae.load_state_dict(system.autoencoder.state_dict())
    m = cfg.model
    bundle = LatentDiffusionModel(_preview_net(trainer), vae, system.text_encoder, cfg.diffusion,
                                  (m.image_size, m.image_size), clip_denoised=False, config=cfg)
    pipe = TextToImagePipeline(bundle, device=trainer.acc.device, spacing="pakhsh")
    c = cfg.condition
    prompts = [str(it.get("caption", "")) if pipe.takes_text else "" for it in items]
    extra: dict[str, Any] = {}
    if c is not None and c.segmap:
        extra["segmap"] = torch.stack([torch.as_tensor(it["segmentation"]) for it in items])
    if c is not None and c.layout:
        from ..conditioning.layout import batch_layout

        boxes = torch.stack([torch.as_tensor(it["boxes"]) for it in items])
        objects = torch.stack([torch.as_tensor(it["objects"]) for it in items])
        extra["layout"] = batch_layout(boxes, objects, items[0]["image"].shape[-1])
    if cfg.model.num_classes is not None:
        extra["labels"] = torch.tensor([int(it["label"]) for it in items])
    x = pipe.generate(prompts, None, SampleSettings("ddim", 25, guidance=3.0), seed=cfg.train.seed,
                      progress=False, **extra)
    rows = torch.stack([torch.stack([it["image"] for it in items]).float(), x.float()], dim=1)
    return save_grid(rows.flatten(0, 1), path, nrow=min(8, 2 * n) // 2 * 2, scale=2)


def _unclip_decoder_preview(trainer: "Trainer", path: Path) -> Path:
    """unCLIP decoder: rows of [training image | decoded from its CLIP image embedding] (guidance 3, 25 DDIM steps,
    fixed seed)."""
    from ..pipelines.unclip import decode_embeddings

    cfg, system = trainer.cfg, trainer.system
    n = min(cfg.train.num_preview, len(trainer.dataset), 16)
    batch = {"index": torch.arange(n), "image": torch.stack([trainer.dataset[i]["image"] for i in range(n)])}
    emb = system.image_embeddings(batch["index"])
    context = system.text(batch) if system.needs_text else None
    null = system.null() if system.needs_text else None
    with trainer.acc.autocast():
        x = decode_embeddings(_preview_net(trainer), trainer.diffusion, emb, seed=cfg.train.seed, guidance=3.0,
                              steps=25, context=context, null_context=null)
    rows = torch.stack([batch["image"].float().cpu(), x.float().cpu()], dim=1)
    return save_grid(rows.flatten(0, 1), path, nrow=min(8, 2 * n) // 2 * 2, scale=2)
