"""Data helpers for plugins: in-memory samples served a whole batch at a time.

DataLoader fetches through `__getitems__` when a dataset has it, so a batch is one indexing operation on
each tensor instead of a Python loop over samples followed by collation.
"""
from __future__ import annotations

import torch
from torch.utils.data import Dataset


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


def keep_batch(batch):
    """`collate_fn` for datasets whose `__getitems__` already returns a batch."""
    return batch
