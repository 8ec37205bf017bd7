"""The training order: a function of (seed, epoch) only, resumable in the middle of an epoch.

A run restarted from a checkpoint replays exactly the order the uninterrupted run would have used, which makes
resuming exact. The epoch is taken when an epoch's iteration starts (`EpochLoader`), not from Lightning's
`set_epoch` call: Lightning creates (and prefetches from) the first iterator of a resumed fit before it restores
the loops and sets the sampler's epoch, which would replay epoch 0's order. A checkpoint saved mid-epoch (a
preemption signal) resumes with the batches of that epoch not yet trained on, in the same order.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
from torch.utils.data import DataLoader, Sampler


class EpochShuffle(Sampler[int]):
    """A permutation of `n` rows per epoch; subclasses draw other orders by overriding `order`."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle, self.epoch, self.start = n, int(seed), shuffle, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n).tolist()

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        start, self.start = self.start, 0  # a mid-epoch resume skips what was trained on, once
        return iter(self.order()[start:])


class EpochLoader(DataLoader):
    """A DataLoader that asks `position()` for (epoch, batches already done) whenever an epoch's iteration starts,
    tells its sampler and dataset the epoch, and skips the done batches (a checkpoint saved mid-epoch).

    `position` is the datamodule's: the trainer's epoch, or once after a restore the position the checkpoint was
    saved at. (Lightning creates the first training iterator while it configures the optimizers, before it restores
    the loops' progress; the datamodule's own state is restored before that.) `state_dict`/`load_state_dict` mark
    the loader as resumable for Lightning; the position itself travels in the datamodule's state."""

    def __init__(self, *args, position: Callable[[], tuple[int, int]], **kwargs):
        super().__init__(*args, **kwargs)
        self._position = position

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def __iter__(self):
        epoch, skip = self._position()
        if skip >= len(self):  # saved at the end of an epoch: the next one starts afresh
            epoch, skip = epoch + 1, 0
        for obj in (self.sampler, self.dataset):
            if callable(getattr(obj, "set_epoch", None)):
                obj.set_epoch(epoch)
        if skip and isinstance(self.sampler, EpochShuffle) and self.batch_size:
            self.sampler.start = skip * self.batch_size  # skipped without reading them
            return super().__iter__()
        return itertools.islice(super().__iter__(), skip, None)
