"""The trainer's data path: worker processes must yield exactly what in-process loading yields, every epoch."""

from __future__ import annotations

import itertools

import torch

from pakhsh.data import DataConfig, build_dataset
from pakhsh.training.loader import GlobalBatchSampler, auto_workers, make_loader


def _batches(workers: int, count: int, start: int = 0) -> list[torch.Tensor]:
    # digits (1797 train images... a few hundred kept) with random flips: augmentation depends on the epoch
    ds = build_dataset(DataConfig(name="digits", image_size=8, random_flip=True, length=24))
    sampler = GlobalBatchSampler(len(ds), 8, rank=0, world=1, seed=3, start=start)
    loader = make_loader(ds, sampler, workers, torch.device("cpu"))
    return [b["image"] for b in itertools.islice(iter(loader), count)]


def test_workers_replay_in_process_loading_across_epochs():
    inproc = _batches(0, 9)  # 3 batches per epoch -> epochs 0, 1, 2
    workers = _batches(2, 9)
    for a, b in zip(inproc, workers):
        assert torch.equal(a, b)


def test_epochs_draw_new_augmentations_and_resume_mid_epoch_matches():
    ds = build_dataset(DataConfig(name="digits", image_size=8, random_flip=True, length=24))
    flips = []
    for epoch in range(4):  # the same images in epoch order: flipped in some epochs, not others
        ds.set_epoch(epoch)
        flips.append(torch.stack([ds[i]["image"] for i in range(24)]))
    assert any(not torch.equal(flips[0], f) for f in flips[1:])
    full = _batches(2, 7)
    resumed = _batches(2, 3, start=4)  # micro-batch 4 onwards, as a resumed run asks for
    for a, b in zip(full[4:], resumed):
        assert torch.equal(a, b)


def test_auto_workers_stay_in_process_on_cpu():
    assert auto_workers(torch.device("cpu")) == 0
    assert auto_workers(torch.device("cuda"), world=1) >= 1
