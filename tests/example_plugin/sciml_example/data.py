import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from sciml.data import TensorDictDataset, keep_batch


class Blobs(pl.LightningDataModule):
    """Two Gaussian classes whose means differ by `separation` in every feature."""

    def __init__(self, n: int = 512, features: int = 4, separation: float = 2.0, batch_size: int = 64, seed: int = 0):
        super().__init__()
        self.batch_size, self.input_shape = batch_size, (features,)
        g = torch.Generator().manual_seed(seed)
        y = torch.arange(n) % 2
        x = torch.randn(n, features, generator=g) + separation * y[:, None]
        self.splits = {name: TensorDictDataset(x=x[part], y=y[part]) for name, part in
                       (("train", slice(0, n // 2)), ("val", slice(n // 2, 3 * n // 4)), ("test", slice(3 * n // 4, n)))}

    def _loader(self, split, shuffle=False):
        return DataLoader(self.splits[split], batch_size=self.batch_size, shuffle=shuffle, collate_fn=keep_batch)

    def train_dataloader(self):
        return self._loader("train", shuffle=True)

    def val_dataloader(self):
        return self._loader("val")

    def test_dataloader(self):
        return self._loader("test")

    def predict_dataloader(self):
        return self._loader("test")
