"""The resumable data order: the global batch b of epoch e is a fixed slice of a permutation drawn from (seed, e);
every item's random crop/flip is drawn from a seed derived from (seed, e, index) (see SeededItems); the loader has
its own generator. A restarted run therefore skips the consumed batches of its epoch and sees exactly the batches
the uninterrupted run would have seen.
"""
import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from larp.core.errors import VideoReadError, one_line

SKIP_HINT = "set data.skip_bad true to skip unreadable videos (they are counted and reported)"


def item_seed(seed, epoch, index):
    return ((seed * 1_000_003 + epoch) * 1_000_033 + index) % (2 ** 63)


class SeededItems(Dataset):
    """Wraps a dataset so item `index` of epoch `epoch` draws its randomness from a seed of (seed, epoch, index),
    whatever worker loads it and wherever the epoch was resumed. Keys are (index, item_seed) pairs."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, s = key
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(s)
                random.seed(s)
                np.random.seed(s % (2 ** 32))
                return self.dataset[index]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class ResumableBatchSampler:
    """Per-rank batches of one epoch: global batch b = perm[b*B:(b+1)*B] of a permutation seeded by (seed, epoch),
    rank r takes its contiguous share; the first `start_batch` batches are skipped (already trained on)."""

    def __init__(self, num_items, global_batch, rank, world, seed, epoch, start_batch=0, shuffle=True):
        self.n, self.B, self.rank, self.world = num_items, global_batch, rank, world
        self.seed, self.epoch, self.start, self.shuffle = seed, epoch, start_batch, shuffle
        self.per_rank = global_batch // world

    def __len__(self):
        return self.n // self.B - self.start

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(item_seed(self.seed, self.epoch, 7)))
        else:
            order = torch.arange(self.n)
        for b in range(self.start, self.n // self.B):
            chunk = order[b * self.B + self.rank * self.per_rank: b * self.B + (self.rank + 1) * self.per_rank]
            yield [(int(i), item_seed(self.seed, self.epoch, int(i))) for i in chunk]


def batches(loader):
    """Iterate `loader`; an unreadable video (possibly raised in a worker process) names the file and the way to
    skip such files instead of the worker's traceback."""
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except VideoReadError as e:
            raise VideoReadError(f"{one_line(e)}; {SKIP_HINT}") from e
        yield batch


def make_loader(dataset, batch_size, num_workers, seed, info, epoch, start_batch):
    """The loader of epoch `epoch` from its batch `start_batch` on, for this rank."""
    sampler = ResumableBatchSampler(len(dataset), batch_size, info.rank, info.world_size, seed, epoch, start_batch)
    return DataLoader(SeededItems(dataset), batch_sampler=sampler, num_workers=num_workers,
                      pin_memory=info.device.type == "cuda",
                      generator=torch.Generator().manual_seed(item_seed(seed, epoch, 3)),
                      persistent_workers=False, prefetch_factor=4 if num_workers > 0 else None)
