"""The divergence guard records a non-finite loss on the device and raises at its next check: before any
checkpoint of the diverged weights is written, with the epoch and step of the first bad loss."""
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from sciml.callbacks import StopOnDivergence
from sciml.errors import SciMLError


class Diverging(pl.LightningModule):
    def __init__(self, bad_step: int):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.bad_step = bad_step

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        return loss * float("nan") if self.global_step >= self.bad_step else loss

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit(tmp_path, bad_step, every):
    data = TensorDataset(torch.randn(64, 4), torch.randn(64, 1))
    last = ModelCheckpoint(dirpath=tmp_path, filename="last", monitor=None, enable_version_counter=False)
    trainer = pl.Trainer(max_epochs=4, callbacks=[StopOnDivergence(every), last], logger=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         limit_val_batches=1, num_sanity_val_steps=0)
    model = Diverging(bad_step)
    with pytest.raises(SciMLError) as error:
        trainer.fit(model, DataLoader(data, batch_size=8), DataLoader(data, batch_size=8))
    return str(error.value), trainer


def test_deferred_check_names_the_first_bad_step(tmp_path):
    message, trainer = fit(tmp_path, bad_step=10, every=5)  # 8 steps per epoch: the bad step is epoch 1, batch 2
    assert message.startswith("training diverged: loss is nan at epoch 1 step 11;")  # steps count after the update
    assert "last good checkpoint kept" in message and "Lower optimizer.lr" in message
    assert trainer.global_step == 13, "read at the 5th batch of epoch 1, not at once"
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert saved["epoch"] == 0 and all(torch.isfinite(v).all() for v in saved["state_dict"].values())


def test_no_checkpoint_of_diverged_weights_between_checks(tmp_path):
    # The last batch of epoch 0 diverges and the periodic check is far away: the check before validation (and
    # before saving) still stops the run before last.ckpt is written.
    message, _ = fit(tmp_path, bad_step=7, every=1000)
    assert "at epoch 0 step 8" in message and "no checkpoint was written yet" in message
    assert not (tmp_path / "last.ckpt").exists()


def test_invalid_interval():
    with pytest.raises(SciMLError, match="check_every_n_steps"):
        StopOnDivergence(0)
