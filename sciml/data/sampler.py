"""The training order: a function of (seed, epoch) only.

A run restarted from a checkpoint replays exactly the order the uninterrupted run would have used, which makes
resuming exact. The epoch is taken from the trainer when an epoch's iteration starts (`EpochLoader`), not from
Lightning's `set_epoch` call: Lightning creates (and prefetches from) the first iterator of a resumed fit before it
sets the sampler's epoch, which would replay epoch 0's order.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
from torch.utils.data import DataLoader, Sampler


class EpochShuffle(Sampler[int]):
    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle, self.epoch = n, int(seed), shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.n))
        return iter(np.random.default_rng([self.seed, self.epoch]).permutation(self.n).tolist())


class EpochLoader(DataLoader):
    """A DataLoader that tells its sampler and dataset the epoch (`epoch()`, the trainer's) whenever an epoch's
    iteration starts."""

    def __init__(self, *args, epoch: Callable[[], int], **kwargs):
        super().__init__(*args, **kwargs)
        self._epoch = epoch

    def __iter__(self):
        epoch = self._epoch()
        for obj in (self.sampler, self.dataset):
            if callable(getattr(obj, "set_epoch", None)):
                obj.set_epoch(epoch)
        return super().__iter__()
