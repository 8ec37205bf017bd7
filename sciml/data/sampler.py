"""The training order: a seeded shuffle that is a function of (seed, epoch) only.

A run restarted from a checkpoint replays exactly the order the uninterrupted run would have used, which makes
resuming exact. Lightning calls `set_epoch` on the sampler at the start of every epoch.
"""
from __future__ import annotations

import numpy as np
from torch.utils.data import Sampler


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
