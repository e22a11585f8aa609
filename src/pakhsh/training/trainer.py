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
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..data import build_dataset
from ..diffusion import GaussianDiffusion, LossAwareSampler, make_timestep_sampler
from ..config import to_dict
from .checkpoint import (
    CheckpointError,
    ResumeState,
    check_fits,
    config_diff,
    read_resume_state,
    latest_checkpoint,
    read_tensors,
    step_folders,
    tensors_problem,
    write_checkpoint,
)
from .ema import EMA, rate_name
from .distributed import TrainingError, make_accelerator
from .experiment import ExperimentConfig
from .objectives import Draws, build_net, compute_losses
from .loader import GlobalBatchSampler, auto_workers, make_loader, stream_seed as _stream_seed
from .data_checks import check_label_range, check_labels_fit, check_model_fits, with_class_names
from .lock import RunLock
from .monitor import RunLog, describe_data, save_preview
from .precision import choose_precision
from .run_folder import remove_run, run_contents, set_aside

# train.* keys that may change between a run and its resumption (they do not change the maths)
RESUMABLE_KEYS = {"steps", "log_every", "save_every", "sample_every", "num_preview", "preview_steps", "keep_last",
                  "out_dir", "device", "num_workers", "max_minutes"}


# weights beyond this are a blow-up (healthy UNet weights stay below ~10): such a state is never saved
MAX_SANE_WEIGHT = 1e6
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass
class TrainResult:
    step: int
    checkpoint: Path | None  # the newest checkpoint on disk (None only on non-main processes)
    last_loss: float
    interrupted: int | None = None  # the signal (SIGINT / SIGTERM) that stopped the run early, after saving


class Trainer:
    """Build everything from an ExperimentConfig and run `fit()`; `accelerate launch` runs it unchanged."""

    def __init__(self, cfg: ExperimentConfig, *, resume: bool = False, progress: bool = True,
                 dataset: Dataset | None = None, overwrite: bool = False) -> None:
        tc = cfg.train
        if resume and overwrite:
            raise ValueError("--resume continues the run in the folder and --overwrite deletes it: use one of them")
        # the autocast actually used; cfg keeps "auto" so that a resumed run compares equal (see _comparable)
        self.precision, why = choose_precision(tc.mixed_precision, tc.device)
        if self.precision == "fp16" and not torch.cuda.is_available():
            raise ValueError("train.mixed_precision=fp16 needs a GPU; use bf16 on CPU")
        self.cfg, self.progress = cfg, progress
        self.out = Path(tc.out_dir or f"runs/{cfg.name}")
        self.diffusion = GaussianDiffusion.from_config(cfg.diffusion)
        check_model_fits(cfg)
        self.acc = make_accelerator(tc, self.precision)
        if cfg.objective == "clip" and (tc.grad_accum > 1 or self.acc.num_processes > 1):
            # the contrastive loss takes the rest of the batch as negatives: a slice of it is another objective
            raise ValueError("objective=clip trains on one process with train.grad_accum=1 (the contrastive loss "
                             "uses the whole batch as negatives; a micro-batch or per-process slice would see "
                             "fewer); raise train.batch_size instead")
        self.acc.print(f"mixed precision: {self.precision} ({why})")
        self.lock = RunLock(self.out)  # main process only: one writer per run folder
        self.resumed_from: Path | None = None
        self._saved: Path | None = None  # the newest checkpoint this trainer wrote
        self._saved_step: int | None = None
        self._stop_signal: int | None = None
        self._previewed_step: int | None = None
        self.system: Any = None  # the frozen parts of a latent run (training/latent.py)
        self._time_up = False  # train.max_minutes has passed
        try:
            self._setup(resume, overwrite, dataset)
        except BaseException:
            self.lock.release()
            raise

    def _setup(self, resume: bool, overwrite: bool, dataset: Dataset | None) -> None:
        cfg, tc = self.cfg, self.cfg.train
        self._on_main(lambda: self._claim_run_folder(resume, overwrite), "could not take the run folder")
        # the data first: a wrong path or class count fails before any model is built, and the class names go
        # into the config before a resume compares it with the checkpoint's
        self.dataset = dataset if dataset is not None else build_dataset(cfg.data)
        check_labels_fit(cfg, self.dataset)
        self.cfg = with_class_names(cfg, self.dataset)
        cfg = self.cfg
        if cfg.is_dreambooth:  # the base's frozen parts, subject and class images (training/dreambooth.py), which
            from .dreambooth import start_dreambooth_system  # says what it trains on once the base is loaded

            self.system, self.cfg = start_dreambooth_system(
                cfg, self.dataset, self.acc.device, latest_checkpoint(self.out) if resume else None,
                progress=self.progress and self.acc.is_main_process, out=self.out if self.acc.is_main_process else None)
        else:
            self.acc.print(describe_data(self.dataset, cfg.data, cfg.model.num_classes, cfg.task, cfg))
            self.system = self._latent_system(resume) if cfg.is_latent else None
        if cfg.is_unclip:
            from .unclip import start_unclip_system

            self.system, self.cfg = start_unclip_system(
                cfg, self.dataset, self.acc.device, latest_checkpoint(self.out) if resume else None,
                progress=self.progress and self.acc.is_main_process)
        cfg = self.cfg
        torch.manual_seed(tc.seed)  # identical initial weights on every process
        self.net = build_net(cfg)
        if hasattr(self.system, "init_net"):  # a fine-tune starts from its base's weights (DreamBooth)
            self.system.init_net(self.net)
        self.ema = EMA(self.net, tc.ema_rates)
        decay, no_decay = [], []
        for name, p in self.net.named_parameters():
            (no_decay if p.ndim <= 1 else decay).append(p)  # no weight decay on norms and biases
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr, betas=tc.betas)
        self.t_sampler = make_timestep_sampler(tc.timestep_sampler, self.diffusion.num_steps)
        self.step = 0
        damaged: list[Path] = []
        if resume:
            damaged = self._resume(opt)
        self.model, self.opt = self.acc.prepare(self.net, opt)
        self.ema.to(self.acc.device)  # the averages live where accelerate put the weights (GPU)
        self.log = RunLog(self.out, enabled=self.acc.is_main_process, tensorboard=True)
        if self.acc.is_main_process:
            (self.out / "config.json").write_text(json.dumps(to_dict(self.cfg), indent=2, sort_keys=True) + "\n")
            self.log.truncate_after(self.step)
            for folder in damaged:  # every process has read the checkpoints by now (prepare synchronises)
                set_aside(folder)

    # ------------------------------------------------------------------ setup
    def _latent_system(self, resume: bool) -> Any:
        """The frozen parts of a latent run (training/latent.py); the config gains the measured scale factor."""
        from .latent import start_latent_system

        system, self.cfg, measured = start_latent_system(
            self.cfg, self.dataset, self.acc.device, latest_checkpoint(self.out) if resume else None,
            progress=self.progress and self.acc.is_main_process)
        if measured:
            self.acc.print(f"latent scale factor: {self.cfg.latent.scale_factor:.5f} (1 / std of the latents of the "
                           f"first {min(self.cfg.latent.scale_samples, len(self.dataset))} training images)")
        return system

    def _claim_run_folder(self, resume: bool, overwrite: bool) -> None:
        """Lock the run folder (and prove it writable) before any work; refuse to train over another run."""
        self.lock.acquire()
        if resume:
            return
        found = run_contents(self.out)
        if found and not overwrite:
            raise TrainingError(f"{self.out} already holds a run ({', '.join(found)}); continue it with --resume, "
                                "replace it with --overwrite, or train into a new --out folder")
        if found:
            remove_run(self.out)

    def _on_main(self, fn: Callable[[], Any], what: str) -> None:
        """Run `fn` on the main process only; if it fails, every process stops (none waits forever)."""
        err: Exception | None = None
        if self.acc.is_main_process:
            try:
                fn()
            except Exception as e:
                err = e
        failed = err is not None
        if self.acc.num_processes > 1:
            flag = torch.tensor([float(failed)], device=self.acc.device)
            failed = float(self.acc.reduce(flag, reduction="sum")) > 0
        if err is not None:
            raise err
        if failed:
            raise TrainingError(f"the main process {what}; see its error")

    def _barrier(self) -> None:
        """Every process waits here. Not accelerate's wait_for_everyone: it passes device_ids to the barrier, and
        a gloo (CPU) run on a machine with fewer GPUs than processes then fails with 'invalid device ordinal'."""
        if self.acc.num_processes > 1:
            self.acc.reduce(torch.zeros(1, device=self.acc.device), reduction="sum")

    def _notice(self, text: str) -> None:
        if self.acc.is_main_process:
            print(f"pakhsh train: notice: {text}", file=sys.stderr, flush=True)

    def _resume(self, opt: torch.optim.Optimizer) -> list[Path]:
        """Load the newest checkpoint that reads back whole; returns the damaged newer ones it passed over."""
        folders = step_folders(self.out)
        if not folders:
            raise TrainingError(f"--resume: no checkpoint under {self.out / 'checkpoints'}; train without --resume")
        problems: list[str] = []
        for i, folder in enumerate(folders):
            try:
                found = read_resume_state(folder, self.ema.rates)
            except CheckpointError as e:
                problems.append(str(e))
                self._notice(f"checkpoint {folder.name} is damaged: {e}")
                continue
            self._check_same_config(found)
            try:
                self._load(found, opt)
            except (CheckpointError, ValueError, KeyError) as e:
                problems.append(f"{folder}: {e}")
                self._notice(f"checkpoint {folder.name} is damaged: {folder}: {e}")
                continue
            if problems:
                self._notice(f"resuming from {folder} (step {self.step}), the newest good checkpoint; "
                             "the damaged ones are renamed to *.damaged")
            self.resumed_from = folder
            if self.cfg.class_names is None:
                self.cfg = replace(self.cfg, class_names=found.config.class_names)
            self._announce_resume(found)
            return folders[:i]
        raise TrainingError(f"--resume: no usable checkpoint under {self.out / 'checkpoints'}: " + " | ".join(problems))

    def _check_same_config(self, found: ResumeState) -> None:
        saved, now = self._comparable(found.config), self._comparable(self.cfg)
        # names are compared where both sides know them: runs saved before names were recorded have none, and
        # a dataset object handed in may not say (the run then keeps the names it recorded)
        if saved["class_names"] is None or now["class_names"] is None:
            saved["class_names"] = now["class_names"] = None
        diffs = [d for d in config_diff(saved, now)
                 if not (d.startswith("train.") and d.split(":")[0][6:] in RESUMABLE_KEYS)]
        if diffs:
            hint = ""
            if any(d.startswith("train.mixed_precision") for d in diffs):
                hint = f" (train.mixed_precision=auto is {self._auto_precision()} on this machine)"
            raise TrainingError(f"--resume: the config differs from the checkpoint {found.folder}: "
                                + "; ".join(diffs) + hint)

    def _auto_precision(self) -> str:
        return choose_precision("auto", self.cfg.train.device)[0]

    def _comparable(self, cfg: ExperimentConfig) -> dict[str, Any]:
        """A config as a dict with train.mixed_precision=auto replaced by what auto chooses here: "auto" and the
        setting it stands for are the same run, whichever of them the checkpoint or the command line says."""
        d = to_dict(cfg)
        if d["train"]["mixed_precision"] == "auto":
            d["train"]["mixed_precision"] = self._auto_precision()
        return d

    def _announce_resume(self, found: ResumeState) -> None:
        """Say where the run continues from, whether it extends a finished run, and whether "auto" now picks
        another autocast than the run trained with (the steps then differ from an uninterrupted run's)."""
        self.acc.print(f"resuming from step {self.step} (checkpoint {found.folder})")
        if self.step >= found.config.train.steps and self.cfg.train.steps > self.step:
            self.acc.print(f"extending the finished run from step {self.step} to {self.cfg.train.steps}")
        before = found.state.get("mixed_precision")
        if isinstance(before, str) and before != self.precision:
            self._notice(f"the run trained with mixed precision {before} up to step {self.step} and continues "
                         f"with {self.precision}: the steps from here differ from an uninterrupted run's")

    def _load(self, found: ResumeState, opt: torch.optim.Optimizer) -> None:
        """Put a checked checkpoint into the network, EMA, optimizer and timestep sampler."""
        check_fits(self.net, found.model, found.folder / "model.safetensors")
        for r in self.ema.rates:
            check_fits(self.net, found.ema[r], found.folder / f"{rate_name(r)}.safetensors", partial_params_only=True)
        self.net.load_state_dict(found.model)
        for r in self.ema.rates:
            self.ema.load_state_dict(r, found.ema[r])
        opt.load_state_dict(found.optimizer)
        state = found.state
        if isinstance(self.t_sampler, LossAwareSampler) and "loss_history" in state:
            self.t_sampler.load_state_dict({"loss_history": state["loss_history"].numpy(), "counts": state["counts"].numpy()})
        self.step = int(state["step"])
        self._saved, self._saved_step = found.folder, self.step

    # ------------------------------------------------------------------ the loop
    def fit(self) -> TrainResult:
        tc = self.cfg.train
        world, rank = self.acc.num_processes, self.acc.process_index
        data = self.system.training_view(self.dataset) if self.system is not None else self.dataset
        # the view's items are what batches draw from (DreamBooth's pair subject and class images)
        sampler = GlobalBatchSampler(len(data), tc.batch_size, rank, world, tc.seed, self.step * tc.grad_accum)
        workers = tc.num_workers if tc.num_workers is not None else auto_workers(self.acc.device, world)
        loader = make_loader(data, sampler, workers, self.acc.device)
        batches = iter(loader)
        if self.acc.is_main_process:
            self.lock.acquire()  # held since __init__; taken again when fit() runs a second time
        old_handlers = self._install_stop_handlers()
        bar = tqdm(total=tc.steps, initial=self.step, disable=not (self.progress and self.acc.is_main_process),
                   desc=self.cfg.name, unit="step", dynamic_ncols=True)
        last_loss, window, t0 = float("nan"), [], time.time()
        stopped = False
        start = self.step
        if self.step >= tc.steps:
            self.acc.print(f"nothing to train: the run is at step {self.step} and train.steps={tc.steps}; extend "
                           f"it with --resume --set train.steps=N (N > {self.step})")
        started = time.monotonic()
        try:
            while self.step < tc.steps and not stopped:
                if tc.max_minutes is not None and time.monotonic() - started > 60 * tc.max_minutes:
                    self._time_up = True
                stats = self._train_step(batches)
                # every process agrees (a mean over processes), so they all stop after the same step
                stopped = stats.pop("stop") > 0 or (world == 1 and (self._stop_signal is not None or self._time_up))
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
                    self.save()
            if stopped:
                if window:  # the steps since the last log line belong in the log and the loss curve
                    self._log_window(window, time.time() - t0)
                self.save()
                if self._time_up and self._stop_signal is None:
                    self.acc.print(f"train.max_minutes={tc.max_minutes:g} reached: saved step {self.step} to "
                                   f"{self._saved}; continue with --resume")
                    stopped = False  # not an interruption: the run ends normally, early
                else:
                    self._stop_signal = self._stop_signal or signal.SIGTERM  # told by another process
                    self.acc.print(f"interrupted: saved step {self.step} to {self._saved}")
            if self.step > start:  # something was trained in this call
                self._final_outputs()
        finally:
            bar.close()
            for sig, old in old_handlers.items():
                signal.signal(sig, old)
            self.lock.release()
        self._barrier()
        ckpt = self._saved if self.acc.is_main_process else None
        return TrainResult(self.step, ckpt, last_loss, self._stop_signal if stopped else None)

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
            for k in terms:  # loss, mse, vb and any parts the objective reports (DreamBooth: subject, prior)
                totals[k] = totals.get(k, 0.0) + terms[k].detach() / tc.grad_accum
        # the logged numbers, the NaN verdict and the stop request (a signal on any process) are means over all
        # processes, so every rank agrees on them
        totals["stop"] = torch.tensor(float(self._stop_signal is not None or self._time_up))
        summary = torch.stack([totals[k].float().reshape(()).to(self.acc.device) for k in totals])
        if self.acc.num_processes > 1:
            summary = self.acc.reduce(summary, reduction="mean")
        totals = dict(zip(totals, summary.tolist()))
        if not math.isfinite(totals["loss"]):
            raise TrainingError(
                f"loss became {totals['loss']} at step {self.step + 1}; stopping. Last good checkpoint: {self._last_good()}"
            )
        # without clipping, an infinite max norm still measures the norm (and clips nothing)
        grad_norm = float(self.acc.clip_grad_norm_(self.model.parameters(), tc.grad_clip or math.inf))
        if not math.isfinite(grad_norm) and self.precision != "fp16":  # fp16: the grad scaler skips the step
            raise TrainingError(f"gradient norm became {grad_norm} at step {self.step + 1}; stopping before the "
                                f"update. Last good checkpoint: {self._last_good()}")
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.ema.update(self.net, self.step if tc.ema_warmup else None)
        totals["lr"] = lr
        totals["grad_norm"] = grad_norm
        return totals

    def _micro_losses(self, batch: dict[str, torch.Tensor], pos: int) -> dict[str, torch.Tensor]:
        """Losses of this process's slice of global micro-batch `pos`; all randomness derived from (seed, pos)."""
        tc, dev = self.cfg.train, self.acc.device
        world, rank = self.acc.num_processes, self.acc.process_index
        x0 = batch["image"]
        per = x0.shape[0]
        g = torch.Generator().manual_seed(_stream_seed(tc.seed, pos, 2))
        # draw for the whole global batch, keep our slice: N processes == 1 process on the combined batch
        ts = self.t_sampler.sample(per * world, generator=g)
        shape = self._diffusion_shape(tuple(x0.shape[1:]))
        noise = torch.randn((per * world, *shape), generator=g)
        drop = torch.rand(per * world, generator=g) < tc.class_dropout
        sl = slice(rank * per, (rank + 1) * per)
        latent_eps = u = None
        if self.cfg.is_latent or self.cfg.is_autoencoder:  # drawn after the others: older systems' streams stay
            latent_eps = torch.randn((per * world, *self._latent_shape(tuple(x0.shape[1:]))), generator=g)[sl].to(dev)
            u = torch.rand(per * world, 3, generator=g)[sl]
        elif self.cfg.is_unclip:  # caption / embedding dropout of the prior and decoder
            u = torch.rand(per * world, 3, generator=g)[sl]
        t, weights, noise = ts.t[sl].to(dev), ts.weights[sl].to(dev), noise[sl].to(dev)
        if self.cfg.model.num_classes is not None and self.cfg.task is None:
            if "label" not in batch:
                raise ValueError(f"model.num_classes={self.cfg.model.num_classes} but dataset '{self.cfg.data.name}' has no labels")
            check_label_range(batch["label"], self.cfg.model.num_classes, self.cfg.data.name)
        # degradations (Palette) draw from their own stream; per process, so N processes degrade differently
        # from one (the diffusion draws above stay global)
        draws = Draws(t, noise, drop[sl].to(dev), torch.Generator().manual_seed(_stream_seed(tc.seed, pos, 1000 + rank)),
                      self.step, latent_eps, u)
        torch.manual_seed(_stream_seed(tc.seed, pos, 3 + rank))  # dropout masks
        with self.acc.autocast():
            terms = compute_losses(self.cfg, self.model, self.diffusion, batch, draws, dev, self.system)
        if isinstance(self.t_sampler, LossAwareSampler):
            all_t, all_vb = self.acc.gather((t, terms.vb.detach().float()))
            self.t_sampler.update(all_t.cpu(), all_vb.cpu())
        loss = (terms.loss.float() * weights).mean()
        out = {"loss": loss, "mse": terms.mse.detach().float().mean(), "vb": terms.vb.detach().float().mean()}
        for k, v in getattr(terms, "parts", {}).items():  # logged beside the loss (DreamBooth's two halves)
            out[k] = v.detach().float().mean()
        return out

    def _latent_shape(self, image_shape: tuple[int, ...]) -> tuple[int, ...]:
        """(C, h, w) of the autoencoder latents of images of this shape (latent and autoencoder runs)."""
        if self.system is not None:
            return self.system.latent_shape(image_shape)
        ae = self.cfg.autoencoder
        assert ae is not None
        f = ae.downsample_factor
        return ae.latent_channels, image_shape[-2] // f, image_shape[-1] // f

    def _diffusion_shape(self, image_shape: tuple[int, ...]) -> tuple[int, ...]:
        """What the diffusion noises: the images, or a latent run's latents."""
        return self.system.latent_shape(image_shape) if self.system is not None else image_shape

    # ------------------------------------------------------------------ outputs
    def _log_window(self, window: list[dict[str, float]], seconds: float) -> None:
        rec: dict[str, Any] = {"step": self.step}
        for k in window[0]:
            rec[k] = sum(w[k] for w in window) / len(window)
        rec["steps_per_s"] = len(window) / max(seconds, 1e-9)
        rec["images_per_s"] = rec["steps_per_s"] * self.cfg.train.batch_size * self.cfg.train.grad_accum
        self.log.write(rec)

    def save(self) -> Path | None:
        """Write a checkpoint (main process) and the loss curve; returns its folder (None on other processes).

        Weights that blew up are never saved, so every checkpoint on disk is one training can go on from.
        """
        if self._saved_step == self.step:  # e.g. Ctrl-C right after a periodic save: that one is this state
            return self._saved if self.acc.is_main_process else None
        files = self._checkpoint_files()
        for name, tensors in files.items():  # on every process: they hold the same weights and stop together
            if name.endswith(".safetensors") and (problem := tensors_problem(tensors, MAX_SANE_WEIGHT)):
                raise TrainingError(f"the weights at step {self.step} blew up ({problem} of {name}); not saving them. "
                                    f"Last checkpoint with sane weights: {self._last_good()}; lower train.lr and "
                                    "--resume")
        path: Path | None = None

        def write() -> None:
            nonlocal path
            path = write_checkpoint(self.out, self.step, files, self.cfg, self.cfg.train.keep_last)
            self.log.plot_loss()

        self._on_main(write, f"could not save step {self.step}")  # also the barrier after the write
        self._saved, self._saved_step = path, self.step
        return path

    def _checkpoint_files(self) -> dict[str, Any]:
        state: dict[str, Any] = {"step": self.step, "micro_batch": self.step * self.cfg.train.grad_accum,
                                 "seed": self.cfg.train.seed, "mixed_precision": self.precision}
        if isinstance(self.t_sampler, LossAwareSampler):
            sd = self.t_sampler.state_dict()
            state["loss_history"] = torch.from_numpy(sd["loss_history"])
            state["counts"] = torch.from_numpy(sd["counts"])
        files: dict[str, Any] = {"model.safetensors": self.acc.unwrap_model(self.model).state_dict(),
                                 "optimizer.pt": self.opt.optimizer.state_dict() if hasattr(self.opt, "optimizer") else self.opt.state_dict(),
                                 "state.pt": state}
        for r in self.ema.rates:
            files[f"{rate_name(r)}.safetensors"] = self.ema.state_dict(r)
        if self.system is not None:
            files.update(self.system.checkpoint_files())
        return files

    def _last_good(self) -> str:
        """The newest checkpoint on disk whose weights are sane (checkpoints saved before that check existed
        may hold a blow-up), for error messages."""
        for folder in step_folders(self.out):
            try:
                if tensors_problem(read_tensors(folder / "model.safetensors"), MAX_SANE_WEIGHT) is None:
                    return str(folder)
            except CheckpointError:
                continue
        return "none yet"

    def preview(self) -> Path | None:
        """A grid of EMA samples (fixed seed, so grids are comparable across steps); its path on the main process."""
        self._previewed_step = self.step
        if not self.acc.is_main_process or self.cfg.train.num_preview < 1:
            return None
        path = self.out / "samples" / f"step_{self.step:07d}.png"
        if hasattr(self.system, "preview"):  # a system with its own grid (DreamBooth: subject and class rows)
            return self.system.preview(self, path)
        return save_preview(self, path)

    def _final_outputs(self) -> None:
        """The loss curve and a sample grid of the final weights, whatever log_every and sample_every are: every
        run, a short or an interrupted one too, leaves something to look at (written after the checkpoint)."""
        grid = self.preview() if self._previewed_step != self.step else self._grid_path()
        curve = self.log.plot_loss() if self.acc.is_main_process else None
        shown = [str(p) for p in (curve, grid) if p is not None and p.is_file()]
        if shown:
            self.acc.print(f"wrote {' and '.join(shown)}")

    def _grid_path(self) -> Path:
        return self.out / "samples" / f"step_{self.step:07d}.png"

    def _install_stop_handlers(self) -> dict[int, Any]:
        """Ctrl-C (SIGINT) and SIGTERM (kill, job schedulers, torchrun) finish the current step, save a checkpoint
        and stop; a second signal stops at once. Returns the handlers to restore."""
        def handler(signum: int, frame: Any) -> None:
            if self._stop_signal is not None:
                raise KeyboardInterrupt
            self._stop_signal = signum
            name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            self.acc.print(f"\n{name}: saving a checkpoint after this step (send it again to abort)")

        old: dict[int, Any] = {}
        for sig in STOP_SIGNALS:
            try:
                old[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread: leave signals alone
                break
        return old
