"""Processes and devices for training: how many processes a launcher started, and an Accelerator that forms
one data-parallel run of them on the device train.device names (never N independent trainers)."""

from __future__ import annotations

import os
import sys
from typing import Any

import torch

from .experiment import TrainConfig


class TrainingError(RuntimeError):
    """Training cannot go on (diverged loss, bad resume); the message names the step and last good checkpoint."""


def env_world_size() -> int:
    """The number of processes the launcher started (torchrun / accelerate launch / MPI), 1 when unlaunched."""
    for var in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        try:
            return max(1, int(os.environ[var]))
        except (KeyError, ValueError):
            continue
    return 1


def make_accelerator(tc: TrainConfig, precision: str) -> Any:
    """An Accelerator for train.device, checked: a named GPU must exist, and N launched processes must form one
    data-parallel run (never N independent trainers writing one folder)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    world, device = env_world_size(), tc.device
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"train.device={device}: no CUDA GPU is visible here (torch.cuda.is_available() is "
                             "False); use train.device=cpu or auto")
        if ":" in device:
            index, count = int(device.split(":")[1]), torch.cuda.device_count()
            if index >= count:
                raise ValueError(f"train.device={device}: there are {count} CUDA device(s) here (cuda:0 .. "
                                 f"cuda:{count - 1})")
            if world > 1:
                raise ValueError(f"train.device={device} names one GPU but {world} processes were launched; use "
                                 "train.device=cuda or auto (each process takes its own GPU)")
            torch.cuda.set_device(index)  # accelerate's single-process device is the current CUDA device
    # accelerate sets up gloo data parallel over several CPU processes only when told cpu=True
    cpu = device == "cpu" or (device == "auto" and world > 1 and not torch.cuda.is_available())
    local, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", world)), torch.cuda.device_count()
    if world > 1 and not cpu and local > gpus:  # NCCL cannot put two processes on one GPU
        raise ValueError(f"{local} processes on this machine but {gpus} GPU(s): launch one process per GPU "
                         f"(--nproc_per_node {gpus}) or set train.device=cpu")
    # accelerate keeps one AcceleratorState per process and refuses a second Accelerator with another precision;
    # a notebook or script that trains twice must not fail, so clear it (the process group, PartialState, stays)
    AcceleratorState._reset_state()
    acc = Accelerator(mixed_precision=precision, cpu=cpu)
    if acc.num_processes != world:
        raise TrainingError(
            f"{world} processes were launched (WORLD_SIZE={world}) but accelerate set up {acc.num_processes} "
            f"({acc.distributed_type}); launch with `torchrun --nproc_per_node {world} -m pakhsh.cli train ...` or "
            f"`accelerate launch --multi_gpu --num_processes {world} -m pakhsh.cli train ...` (CPUs too)"
        )
    if device.startswith("cuda") and acc.device.type != "cuda":
        raise TrainingError(f"train.device={device} but accelerate chose {acc.device} (ACCELERATE_USE_CPU set, or "
                            "accelerate already initialised on CPU in this process)")
    return acc


def end_process_group(finished: bool = False) -> None:
    """Leave the process group of a several-process run once training is over. Left to interpreter exit, the
    group's teardown can race its own threads and abort a rank ("terminate called without an active exception",
    SIGABRT), failing a run that trained and saved correctly; torch asks for this call at the end of every script.
    `finished`: training ended normally on every rank, so all ranks first wait for each other (a rank that left
    early while another still held the group was one way to that abort); after an error there is no barrier,
    which could wait on a rank that is gone."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def exit_worker_rank(code: int) -> None:
    """End a worker rank (RANK > 0 of a several-process run) at once, once its work is done and the group is left:
    the main rank reports and owns the run folder, and skipping the interpreter's teardown of torch's C++ state
    keeps a late abort in it (seen once in 2-process gloo runs after correct training) from failing the run."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) > 0:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def fit_run(cfg: Any, *, resume: bool, overwrite: bool, progress: bool) -> Any:
    """Train `cfg` to the end (`Trainer.fit`, what `pakhsh train` and `pakhsh dreambooth` run) and leave the process
    group; a worker rank of a several-process run that finished normally ends here (`exit_worker_rank`)."""
    from .trainer import Trainer

    finished = False
    try:
        result = Trainer(cfg, resume=resume, overwrite=overwrite, progress=progress).fit()
        finished = not result.interrupted
    finally:
        end_process_group(finished)
    if finished:
        exit_worker_rank(0)
    return result
