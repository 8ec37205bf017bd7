"""Callbacks that tests add to a CLI run (`+callbacks.NAME._target_=resilience_helpers.X`, with tests/ on
PYTHONPATH) to interrupt it at a chosen point."""
from __future__ import annotations

import os
import signal
import signal as signal_module
import time

import pytorch_lightning as pl


class KillAt(pl.Callback):
    """SIGKILL this process at the start of training batch `batch` of epoch `epoch` (0-based): a crash that no
    handler sees, mid-epoch."""

    def __init__(self, epoch: int, batch: int):
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)


class SlowBatches(pl.Callback):
    """Sleep after each training batch, so that a signal sent from outside lands while training runs."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        time.sleep(self.seconds)


class Fail(pl.Callback):
    """An unexpected error inside the fit (not a SciMLError)."""

    def on_train_start(self, trainer, pl_module):
        raise RuntimeError("injected failure for the error.log test")


class SignalAt(pl.Callback):
    """Send `signal` to this process at the start of training batch `batch` of epoch `epoch`: a preemption that
    lands mid-epoch (the run stops at the next step with a checkpoint)."""

    def __init__(self, epoch: int, batch: int, signal: str = "SIGTERM"):
        self.epoch, self.batch, self.signal = epoch, batch, getattr(signal_module, signal)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), self.signal)
