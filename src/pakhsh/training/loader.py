"""The trainer's data path: a global-batch sampler that makes every run replayable, and a loader that keeps a
GPU fed.

Replayability: micro-batch k is a fixed function of (seed, k) whatever the number of processes or loader
workers. The sampler therefore yields *global positions* `epoch * n + i` rather than bare indices, and
`EpochView` decodes them, so each worker applies the augmentation stream of the right epoch without any state
shared with the main process (a `set_epoch` call in the main process never reaches worker copies).
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Dataset


def stream_seed(seed: int, pos: int, salt: int) -> int:
    """A 63-bit seed for (run seed, micro-batch position, purpose): distinct streams, no shared state."""
    return (seed * 1_000_003 + pos * 7919 + salt * 104_729) % (2**63 - 1)


class GlobalBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Yields this process's slice of each global micro-batch, starting at micro-batch `start` (resume).

    Epoch e is a permutation of the dataset seeded by (seed, e); incomplete last batches are dropped. Items are
    global positions `e * n + i` (decode with `EpochView`).
    """

    def __init__(self, n: int, batch: int, rank: int, world: int, seed: int, start: int) -> None:
        if n < batch:
            raise ValueError(f"dataset has {n} images, fewer than one batch of train.batch_size={batch}")
        if batch % world:
            raise ValueError(f"train.batch_size {batch} is not divisible by the {world} processes")
        self.n, self.batch, self.rank, self.world, self.seed, self.start = n, batch, rank, world, seed, start
        self.per_epoch = n // batch

    def __iter__(self) -> Iterator[list[int]]:
        pos = self.start
        per = self.batch // self.world
        while True:
            epoch, offset = divmod(pos, self.per_epoch)
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(stream_seed(self.seed, epoch, 1)))
            for b in range(offset, self.per_epoch):
                idx = perm[b * self.batch : (b + 1) * self.batch]
                yield (idx[self.rank * per : (self.rank + 1) * per] + epoch * self.n).tolist()
            pos = (epoch + 1) * self.per_epoch

    def __len__(self) -> int:  # an endless stream; length of one epoch for tools that ask
        return self.per_epoch


class EpochView(Dataset):
    """Maps a global position `epoch * n + i` to item i of `base` under epoch `epoch`'s augmentation draws."""

    def __init__(self, base: Dataset) -> None:
        self.base = base
        self.n = len(base)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, pos: int) -> Any:
        epoch, i = divmod(int(pos), self.n)
        set_epoch = getattr(self.base, "set_epoch", None)
        if set_epoch is not None and getattr(self.base, "epoch", None) != epoch:
            set_epoch(epoch)
        item = self.base[i]
        if isinstance(item, dict):  # the dataset index: latent runs look their cached encodings up by it
            item = {**item, "index": i}
        return item


# per-sample keys the objectives use besides the image and label: conditions of latent models
_STACKED = ("segmentation", "boxes", "objects")


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack images, integer labels, dataset indices (caches of latent runs) and the condition tensors; captions
    stay a list of strings. Other per-sample keys are not trained on."""
    first = samples[0]
    out: dict[str, Any] = {"image": torch.stack([s["image"] for s in samples])}
    if "label" in first:
        out["label"] = torch.tensor([int(s["label"]) for s in samples], dtype=torch.long)
    if "index" in first:
        out["index"] = torch.tensor([int(s["index"]) for s in samples], dtype=torch.long)
    if "caption" in first:
        out["caption"] = [str(s.get("caption", "")) for s in samples]
    for key in _STACKED:
        if key in first:
            out[key] = torch.stack([torch.as_tensor(s[key]) for s in samples])
    return out


def available_cores() -> int:
    """CPU cores this process may run on (the affinity mask, not the machine's count: containers, taskset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def auto_workers(device: torch.device, world: int = 1) -> int:
    """Loader worker processes when train.num_workers is not set.

    On a GPU the built-in datasets decode or draw each image in Python (0.2-0.4 ms), so one process caps
    training at ~3k images/s: use the spare cores, shared among the processes of this machine. On a CPU the
    cores are busy with the network itself and extra processes only compete: load in-process.
    """
    if device.type != "cuda":
        return 0
    return max(1, min(8, (available_cores() - world) // max(1, world)))


def make_loader(dataset: Dataset, sampler: GlobalBatchSampler, workers: int, device: torch.device) -> DataLoader:
    """A DataLoader over global positions; pinned memory and prefetching when feeding a GPU."""
    extra: dict[str, Any] = {}
    if workers > 0:
        extra = {"prefetch_factor": 4, "persistent_workers": False}
    return DataLoader(EpochView(dataset), batch_sampler=sampler, num_workers=workers, collate_fn=collate,
                      pin_memory=device.type == "cuda", **extra)
