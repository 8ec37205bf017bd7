"""What every task shares: the network, optimizer and schedule from config, an input-shape check, run paths.

Batches are dicts: `x` (inputs), `y` (targets) and optionally `w` (per-sample weights).
"""
from __future__ import annotations

import math
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

from sciml.errors import SciMLError
from sciml.optim.factory import build_optimizer, build_scheduler


class SciMLTask(pl.LightningModule):
    def __init__(self, model: torch.nn.Module, optimizer: DictConfig | None = None,
                 scheduler: DictConfig | None = None):
        super().__init__()
        self.model = model
        self.optimizer_cfg = optimizer
        self.scheduler_cfg = scheduler

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def setup(self, stage: str) -> None:
        """Fail early, in words, when the network does not fit the data's declared input shape."""
        shape = getattr(self.trainer.datamodule, "input_shape", None) if self._trainer else None
        if shape is None:
            return
        try:
            with torch.no_grad():
                was_training = self.model.training
                self.model.eval()
                self.model(torch.zeros(2, *shape))
                self.model.train(was_training)
        except RuntimeError as exc:
            raise SciMLError(f"model {type(self.model).__name__} does not accept the data's input shape "
                             f"{tuple(shape)}: {str(exc).splitlines()[0]}") from None

    def log_train_loss(self, loss: torch.Tensor, batch_size: int) -> None:
        """`train/loss` per step and per epoch. In the progress bar only on CPU: a per-step progress-bar value is
        read on the host after every step (Lightning's `convert_tensors_to_scalars`), a synchronisation that stalls
        an accelerator's queue; on CPU the read costs nothing."""
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=self.device.type == "cpu",
                 batch_size=batch_size)

    @staticmethod
    def to_host(outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Predict-step outputs on the host; floating point as float32, since the bf16/fp16 outputs of mixed
        precision have no numpy type (prediction writers use numpy)."""
        return {k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu() for k, v in outputs.items()}

    @property
    def global_batch_size(self) -> int:
        per_device = getattr(self.trainer.datamodule, "batch_size", None)
        if per_device is None:
            raise SciMLError("the datamodule must expose `batch_size` (per device) for the LR scaling rule")
        return int(per_device) * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def configure_optimizers(self):
        if self.optimizer_cfg is None:
            raise SciMLError("no optimizer configured")
        optimizer = build_optimizer(self.optimizer_cfg, self.model, self.global_batch_size)
        total = self.trainer.estimated_stepping_batches  # also sets up the train dataloader
        batches = self.trainer.num_training_batches
        per_epoch = math.ceil(batches / self.trainer.accumulate_grad_batches) if math.isfinite(batches) else total
        scheduler = build_scheduler(self.scheduler_cfg or {}, optimizer, total, max(int(per_epoch), 1))
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @property
    def plots_dir(self) -> Path:
        path = Path(self.trainer.default_root_dir) / "plots"
        path.mkdir(parents=True, exist_ok=True)
        return path
