"""Transitional: the loaders of plugins not yet on `sciml.data.DataModule`. Removed once every plugin is migrated."""
from __future__ import annotations

import pytorch_lightning as pl
from torch.utils.data import DataLoader, Dataset

from sciml.data.datasets import keep_batch


class SplitDataModule(pl.LightningDataModule):
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
