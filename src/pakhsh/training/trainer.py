"""The training loop (minGPT's Trainer, iDDPM's TrainLoop): AdamW + warm-up, clipping, accumulation, EMA,
mixed precision and multi-process data parallel through HF accelerate, with exact resume.

Exactness: every source of randomness of micro-batch k (data order, t, noise, label dropout, the global torch
RNG used by dropout) is derived from (seed, k) alone, and each process takes its slice of one global batch. So
a run resumed from a checkpoint replays exactly what the uninterrupted run would have done, and N processes
compute the same gradients as one process on the combined batch.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..data import build_dataset
from ..diffusion import GaussianDiffusion, LossAwareSampler, make_timestep_sampler, training_losses
from ..nets.unet import UNet
from ..interop.config import to_dict
from .checkpoint import (
    config_diff,
    latest_checkpoint,
    load_state,
    load_weights,
    read_config,
    read_tensors,
    write_checkpoint,
)
from .ema import EMA, rate_name
from .experiment import ExperimentConfig
from .monitor import RunLog, save_preview

# train.* keys that may change between a run and its resumption (they do not change the maths)
RESUMABLE_KEYS = {"steps", "log_every", "save_every", "sample_every", "num_preview", "preview_steps", "keep_last",
                  "out_dir", "device", "num_workers"}


class TrainingError(RuntimeError):
    """Training cannot go on (diverged loss, bad resume); the message names the step and last good checkpoint."""


@dataclass
class TrainResult:
    step: int
    checkpoint: Path | None
    last_loss: float


def _stream_seed(seed: int, pos: int, salt: int) -> int:
    """A 63-bit seed for (run seed, micro-batch position, purpose): distinct streams, no shared state."""
    return (seed * 1_000_003 + pos * 7919 + salt * 104_729) % (2**63 - 1)


class GlobalBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Yields this process's slice of each global micro-batch, starting at micro-batch `start` (resume).

    Epoch e is a permutation of the dataset seeded by (seed, e); incomplete last batches are dropped.
    """

    def __init__(self, n: int, batch: int, rank: int, world: int, seed: int, start: int,
                 on_epoch: Callable[[int], None] | None = None) -> None:
        if n < batch:
            raise ValueError(f"dataset has {n} images, fewer than one batch of {batch}")
        if batch % world:
            raise ValueError(f"train.batch_size {batch} is not divisible by the {world} processes")
        self.n, self.batch, self.rank, self.world, self.seed, self.start = n, batch, rank, world, seed, start
        self.per_epoch = n // batch
        self.on_epoch = on_epoch  # tells the dataset the epoch, so its augmentation stream moves on

    def __iter__(self) -> Iterator[list[int]]:
        pos = self.start
        per = self.batch // self.world
        while True:
            epoch, offset = divmod(pos, self.per_epoch)
            if self.on_epoch is not None:
                self.on_epoch(epoch)
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(_stream_seed(self.seed, epoch, 1)))
            for b in range(offset, self.per_epoch):
                idx = perm[b * self.batch : (b + 1) * self.batch]
                yield idx[self.rank * per : (self.rank + 1) * per].tolist()
            pos = (epoch + 1) * self.per_epoch

    def __len__(self) -> int:  # an endless stream; length of one epoch for tools that ask
        return self.per_epoch


def _collate(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    out = {"image": torch.stack([s["image"] for s in samples])}
    if "label" in samples[0]:
        out["label"] = torch.tensor([int(s["label"]) for s in samples], dtype=torch.long)
    return out


class Trainer:
    """Build everything from an ExperimentConfig and run `fit()`; `accelerate launch` runs it unchanged."""

    def __init__(self, cfg: ExperimentConfig, *, resume: bool = False, progress: bool = True,
                 dataset: Dataset | None = None) -> None:
        from accelerate import Accelerator

        tc = cfg.train
        if tc.mixed_precision == "fp16" and not torch.cuda.is_available():
            raise ValueError("train.mixed_precision=fp16 needs a GPU; use bf16 on CPU")
        self.cfg, self.progress = cfg, progress
        self.acc = Accelerator(mixed_precision=tc.mixed_precision, cpu=tc.device == "cpu")
        self.out = Path(tc.out_dir)
        self.diffusion = GaussianDiffusion.from_config(cfg.diffusion)
        self._check_model_fits()
        torch.manual_seed(tc.seed)  # identical initial weights on every process
        self.net = UNet(cfg.model)
        self.ema = EMA(self.net, tc.ema_rates)
        decay, no_decay = [], []
        for name, p in self.net.named_parameters():
            (no_decay if p.ndim <= 1 else decay).append(p)  # no weight decay on norms and biases
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr, betas=tc.betas)
        self.t_sampler = make_timestep_sampler(tc.timestep_sampler, self.diffusion.num_steps)
        self.step = 0
        if resume:
            self._resume(opt)
        self.model, self.opt = self.acc.prepare(self.net, opt)
        self.dataset = dataset if dataset is not None else build_dataset(cfg.data)
        self.log = RunLog(self.out, enabled=self.acc.is_main_process, tensorboard=True)
        if self.acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2, sort_keys=True) + "\n")
            self.log.truncate_after(self.step)
        self._stop_requested = False

    # ------------------------------------------------------------------ setup
    def _check_model_fits(self) -> None:
        m, d = self.cfg.model, self.cfg.diffusion
        want = m.out_channels * (2 if d.variance.value == "learned_range" else 1)
        if m.out_dim != want:
            raise ValueError(
                f"model.learn_sigma={m.learn_sigma} does not fit diffusion.variance={d.variance.value}: "
                "set model.learn_sigma=true exactly when the variance is learned_range"
            )
        if m.out_channels != self.cfg.data.channels and self.cfg.data.channels is not None:
            raise ValueError(f"model.out_channels={m.out_channels} but data.channels={self.cfg.data.channels}")

    def _resume(self, opt: torch.optim.Optimizer) -> None:
        ckpt = latest_checkpoint(self.out)
        if ckpt is None:
            raise TrainingError(f"--resume: no checkpoint under {self.out / 'checkpoints'}")
        saved = read_config(ckpt)
        diffs = [d for d in config_diff(saved, self.cfg) if not (d.startswith("train.") and d.split(":")[0][6:] in RESUMABLE_KEYS)]
        if diffs:
            raise TrainingError(f"--resume: the config differs from the checkpoint {ckpt}: " + "; ".join(diffs))
        load_weights(self.net, ckpt / "model.safetensors")
        for r in self.ema.rates:
            self.ema.load_state_dict(r, read_tensors(ckpt / f"{rate_name(r)}.safetensors"))
        opt.load_state_dict(load_state(ckpt, "optimizer.pt"))
        state = load_state(ckpt, "state.pt")
        self.step = int(state["step"])
        if isinstance(self.t_sampler, LossAwareSampler) and "loss_history" in state:
            self.t_sampler.load_state_dict({"loss_history": state["loss_history"].numpy(), "counts": state["counts"].numpy()})
        self.resumed_from = ckpt

    # ------------------------------------------------------------------ the loop
    def fit(self) -> TrainResult:
        tc = self.cfg.train
        world, rank = self.acc.num_processes, self.acc.process_index
        # in-process loading lets the sampler advance the dataset's augmentation epoch (flips, random crops);
        # worker processes hold copies, so there each epoch reuses epoch 0's augmentation draws
        on_epoch = getattr(self.dataset, "set_epoch", None) if tc.num_workers == 0 else None
        sampler = GlobalBatchSampler(len(self.dataset), tc.batch_size, rank, world, tc.seed, self.step * tc.grad_accum, on_epoch)
        loader = DataLoader(self.dataset, batch_sampler=sampler, num_workers=tc.num_workers, collate_fn=_collate)
        batches = iter(loader)
        old_handler = self._install_sigint()
        bar = tqdm(total=tc.steps, initial=self.step, disable=not (self.progress and self.acc.is_main_process),
                   desc=self.cfg.name, unit="step", dynamic_ncols=True)
        last_loss, window, t0 = float("nan"), [], time.time()
        ckpt: Path | None = None
        try:
            while self.step < tc.steps and not self._stop_requested:
                stats = self._train_step(batches)
                self.step += 1
                last_loss = stats["loss"]
                window.append(stats)
                bar.update(1)
                bar.set_postfix(loss=f"{last_loss:.4f}")
                if self.step % tc.log_every == 0 or self.step == tc.steps:
                    self._log_window(window, time.time() - t0)
                    window, t0 = [], time.time()
                if tc.sample_every and self.step % tc.sample_every == 0:
                    self.preview()
                if self.step % tc.save_every == 0 or self.step == tc.steps:
                    ckpt = self.save()
            if self._stop_requested:
                ckpt = self.save()
                self.acc.print(f"interrupted: saved step {self.step} to {ckpt}")
        finally:
            bar.close()
            if old_handler is not None:
                signal.signal(signal.SIGINT, old_handler)
        self.acc.wait_for_everyone()
        return TrainResult(self.step, ckpt, last_loss)

    def _train_step(self, batches: Iterator[dict[str, torch.Tensor]]) -> dict[str, float]:
        tc = self.cfg.train
        lr = tc.lr * min(1.0, (self.step + 1) / tc.warmup_steps) if tc.warmup_steps else tc.lr
        for group in self.opt.param_groups:
            group["lr"] = lr
        totals: dict[str, Any] = {"loss": 0.0, "mse": 0.0, "vb": 0.0}
        for micro in range(tc.grad_accum):
            pos = self.step * tc.grad_accum + micro
            batch = next(batches)
            sync = micro == tc.grad_accum - 1
            ctx = self.acc.no_sync(self.model) if not sync and self.acc.num_processes > 1 else contextlib.nullcontext()
            with ctx:
                terms = self._micro_losses(batch, pos)
                self.acc.backward(terms["loss"] / tc.grad_accum)
            for k in totals:
                totals[k] += terms[k].detach() / tc.grad_accum
        # the logged numbers (and the NaN verdict) are means over all processes, so every rank agrees
        summary = torch.stack([totals[k].float().reshape(()) for k in totals]).to(self.acc.device)
        if self.acc.num_processes > 1:
            summary = self.acc.reduce(summary, reduction="mean")
        totals = dict(zip(totals, summary.tolist()))
        if not math.isfinite(totals["loss"]):
            good = latest_checkpoint(self.out)
            raise TrainingError(
                f"loss became {totals['loss']} at step {self.step + 1}; stopping. Last good checkpoint: {good or 'none yet'}"
            )
        grad_norm = self.acc.clip_grad_norm_(self.model.parameters(), tc.grad_clip) if tc.grad_clip > 0 else None
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.ema.update(self.net, self.step if tc.ema_warmup else None)
        totals["lr"] = lr
        if grad_norm is not None:
            totals["grad_norm"] = float(grad_norm)
        return totals

    def _micro_losses(self, batch: dict[str, torch.Tensor], pos: int) -> dict[str, torch.Tensor]:
        """Losses of this process's slice of global micro-batch `pos`; all randomness derived from (seed, pos)."""
        tc, dev = self.cfg.train, self.acc.device
        world, rank = self.acc.num_processes, self.acc.process_index
        x0 = batch["image"].to(dev)
        per = x0.shape[0]
        g = torch.Generator().manual_seed(_stream_seed(tc.seed, pos, 2))
        # draw for the whole global batch, keep our slice: N processes == 1 process on the combined batch
        ts = self.t_sampler.sample(per * world, generator=g)
        noise = torch.randn((per * world, *x0.shape[1:]), generator=g)
        drop = torch.rand(per * world, generator=g) < tc.class_dropout
        sl = slice(rank * per, (rank + 1) * per)
        t, weights, noise = ts.t[sl].to(dev), ts.weights[sl].to(dev), noise[sl].to(dev)
        cond: dict[str, torch.Tensor] = {}
        if self.cfg.model.num_classes is not None:
            if "label" not in batch:
                raise ValueError(f"model.num_classes={self.cfg.model.num_classes} but dataset '{self.cfg.data.name}' has no labels")
            y = batch["label"].to(dev)
            cond["y"] = torch.where(drop[sl].to(dev), torch.full_like(y, self.cfg.model.num_classes), y)
        torch.manual_seed(_stream_seed(tc.seed, pos, 3 + rank))  # dropout masks
        with self.acc.autocast():
            terms = training_losses(self.diffusion, self.model, x0, t, loss_type=self.cfg.diffusion.loss,
                                    noise=noise, cond=cond, vlb_weight=self.cfg.diffusion.vlb_weight)
        if isinstance(self.t_sampler, LossAwareSampler):
            all_t, all_vb = self.acc.gather((t, terms.vb.detach().float()))
            self.t_sampler.update(all_t.cpu(), all_vb.cpu())
        loss = (terms.loss.float() * weights).mean()
        return {"loss": loss, "mse": terms.mse.detach().float().mean(), "vb": terms.vb.detach().float().mean()}

    # ------------------------------------------------------------------ outputs
    def _log_window(self, window: list[dict[str, float]], seconds: float) -> None:
        rec: dict[str, Any] = {"step": self.step}
        for k in window[0]:
            rec[k] = sum(w[k] for w in window) / len(window)
        rec["steps_per_s"] = len(window) / max(seconds, 1e-9)
        rec["images_per_s"] = rec["steps_per_s"] * self.cfg.train.batch_size * self.cfg.train.grad_accum
        self.log.write(rec)

    def save(self) -> Path | None:
        """Write a checkpoint (main process) and the loss curve; returns its folder."""
        self.acc.wait_for_everyone()
        path = None
        if self.acc.is_main_process:
            state: dict[str, Any] = {"step": self.step, "micro_batch": self.step * self.cfg.train.grad_accum,
                                     "seed": self.cfg.train.seed}
            if isinstance(self.t_sampler, LossAwareSampler):
                sd = self.t_sampler.state_dict()
                state["loss_history"] = torch.from_numpy(sd["loss_history"])
                state["counts"] = torch.from_numpy(sd["counts"])
            files: dict[str, Any] = {"model.safetensors": self.acc.unwrap_model(self.model).state_dict(),
                                     "optimizer.pt": self.opt.optimizer.state_dict() if hasattr(self.opt, "optimizer") else self.opt.state_dict(),
                                     "state.pt": state}
            for r in self.ema.rates:
                files[f"{rate_name(r)}.safetensors"] = self.ema.state_dict(r)
            path = write_checkpoint(self.out, self.step, files, self.cfg, self.cfg.train.keep_last)
            self.log.plot_loss()
        self.acc.wait_for_everyone()
        return path

    def preview(self) -> None:
        """A grid of EMA samples (fixed seed, so grids are comparable across steps)."""
        if self.acc.is_main_process:
            save_preview(self, self.out / "samples" / f"step_{self.step:07d}.png")

    def _install_sigint(self) -> Any:
        """Ctrl-C finishes the current step, saves a checkpoint and stops."""
        try:
            def handler(signum: int, frame: Any) -> None:
                if self._stop_requested:  # a second Ctrl-C stops at once
                    raise KeyboardInterrupt
                self._stop_requested = True
                self.acc.print("\nCtrl-C: saving a checkpoint after this step (press again to abort)")
            return signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread
            return None


