"""Datasets that serve a whole batch at a time.

DataLoader fetches through `__getitems__` when a dataset has it, so a batch is one indexing operation (one read of
the row store) instead of a Python loop over samples followed by collation.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch.utils.data import Dataset


def keep_batch(batch):
    """`collate_fn` for datasets whose `__getitems__` already returns a batch."""
    return batch


def as_tensors(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """numpy arrays as tensors sharing their memory (made contiguous where needed)."""
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}


class TensorDictDataset(Dataset):
    """Samples as named tensors sharing their first dimension: `x`, `y` and optionally `w` for the tasks."""

    def __init__(self, **tensors: torch.Tensor):
        lengths = {len(t) for t in tensors.values()}
        if len(lengths) != 1:
            raise ValueError(f"tensors of different lengths: { {k: len(t) for k, t in tensors.items()} }")
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, i):
        return {k: t[i] for k, t in self.tensors.items()}

    def __getitems__(self, indices):
        index = torch.as_tensor(indices)
        return {k: t[index] for k, t in self.tensors.items()}


class Rows(Dataset):
    """Rows `index` (global row numbers) of a `RowStore`; `extra` holds per-row arrays added to each batch (e.g. a
    `labeled` flag for semi-supervised training)."""

    def __init__(self, store, index: np.ndarray, extra: Mapping[str, np.ndarray] | None = None):
        self.store, self.index, self.extra = store, np.asarray(index, dtype=np.int64), dict(extra or {})

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i):
        return self.__getitems__([i])

    def __getitems__(self, positions):
        positions = np.asarray(positions)
        batch = as_tensors(self.store.read(self.index[positions]))
        batch |= {k: torch.from_numpy(v[positions]) for k, v in self.extra.items()}
        return batch
