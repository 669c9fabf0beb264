"""Training batches from a torch DataLoader: worker processes read and stack the next batches while the
device trains on this one.

A batch is a function of (seed, iteration) alone (:func:`regbench.data.prepared.training_batch`), so the
loader is a map-style dataset indexed by iteration and read in order: the batches, and a resumed run's
batches, are those of the loop without workers. Label maps cross to the device in their stored type
(uint8 for most atlases) and become int64 there (:func:`regbench.data.prepared.to_device`).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import DataLoader, Dataset

#: worker processes for ``data_workers: auto``: on CUDA enough to hide a 3D batch's read behind a step; on CPU
#: none, as the training itself uses the job's cores
AUTO_WORKERS = {"cuda": 4, "cpu": 0}
#: batches each worker reads ahead (torch's default); host memory holds at most workers x this many batches
PREFETCH = 2


class IterationBatches(Dataset):
    """Item ``i``: the batch of training iteration ``i``, ``make_batch(i, batch_size, seed)``."""

    def __init__(self, make_batch: Callable[[int, int, int], dict], batch_size: int, seed: int):
        self.make_batch, self.batch_size, self.seed = make_batch, int(batch_size), int(seed)

    def __getitem__(self, iteration: int) -> dict[str, torch.Tensor]:
        return self.make_batch(int(iteration), self.batch_size, self.seed)


def worker_count(setting: int | str, device: torch.device) -> int:
    """The number of loader processes: the config's ``data_workers``, or :data:`AUTO_WORKERS` for ``auto``."""
    if setting == "auto":
        return AUTO_WORKERS.get(torch.device(device).type, 0)
    return int(setting)


def _one_thread(_worker_id: int) -> None:
    torch.set_num_threads(1)   # a worker reads files; the job's threads belong to the training


def batch_loader(make_batch: Callable[[int, int, int], dict], iterations: range, batch_size: int, seed: int,
                 workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """A DataLoader yielding the batches of ``iterations`` in order, read by ``workers`` processes (0: in this
    one), in pinned memory when ``pin_memory`` (for asynchronous copies to a GPU)."""
    # a generator of its own: a DataLoader draws its workers' base seed from it, and a draw from torch's global
    # generator would shift the training's random stream (and a resumed run's, differently)
    return DataLoader(IterationBatches(make_batch, batch_size, seed), sampler=iterations, batch_size=None,
                      num_workers=workers, pin_memory=pin_memory, worker_init_fn=_one_thread if workers else None,
                      prefetch_factor=PREFETCH if workers else None, generator=torch.Generator().manual_seed(seed))
