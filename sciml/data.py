"""Data helpers for plugins: in-memory samples served a whole batch at a time.

DataLoader fetches through `__getitems__` when a dataset has it, so a batch is one indexing operation on
each tensor instead of a Python loop over samples followed by collation.
"""
from __future__ import annotations

import glob
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from sciml.errors import SciMLError


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


def find_files(path: str | Path, patterns: tuple[str, ...], key: str = "data.path") -> list[Path]:
    """What a user may give as `data.path`: a file, a folder (its files matching `patterns`) or a glob, sorted.
    Nothing found is a one-line error naming the key."""
    text = str(path)
    if any(c in text for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(text))
        if not files:
            raise SciMLError(f"{key}: no files match '{text}'")
    elif Path(text).is_dir():
        files = sorted({f for pattern in patterns for f in Path(text).glob(pattern)})
        if not files:
            raise SciMLError(f"{key}: no {', '.join(patterns)} files in the folder '{text}'")
    elif Path(text).is_file():
        files = [Path(text)]
    else:
        raise SciMLError(f"{key}: no such file or folder '{text}'")
    return files


class SplitDataModule(pl.LightningDataModule):
    """Loaders over `self.splits` ('train', 'val', 'test': datasets that serve whole batches through
    `__getitems__`); prediction runs on the test split. Subclasses set `splits`, `batch_size`, `num_workers`."""

    splits: dict[str, Dataset]
    batch_size: int
    num_workers: int = 0

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(self.splits[split], batch_size=self.batch_size, shuffle=shuffle, collate_fn=keep_batch,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def train_dataloader(self):
        return self._loader("train", shuffle=True)

    def val_dataloader(self):
        return self._loader("val", shuffle=False)

    def test_dataloader(self):
        return self._loader("test", shuffle=False)

    def predict_dataloader(self):
        return self._loader("test", shuffle=False)
