"""Lightning callbacks every run gets: throughput, divergence guard, training curves, RNG state in checkpoints."""
from __future__ import annotations

import math
import random
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.data import extract_batch_size

from sciml.errors import SciMLError


class Throughput(pl.Callback):
    """Logs `train/samples_per_s`: training samples (all ranks) per second of the training loop.

    The clock runs from the start of each training epoch to its last batch, so data loading is included and
    validation is not.
    """

    def __init__(self):
        # A run resumed from the checkpoint of its last epoch gets on_train_epoch_end without a start.
        self._start, self._last, self._samples = 0.0, None, 0

    def on_train_epoch_start(self, trainer, pl_module):
        self._start, self._last, self._samples = time.perf_counter(), None, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._samples += extract_batch_size(batch)
        self._last = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        if self._last is not None and self._last > self._start:
            rate = self._samples * trainer.world_size / (self._last - self._start)
            pl_module.log("train/samples_per_s", rate, sync_dist=False, rank_zero_only=True)


class StopOnDivergence(pl.Callback):
    """Stops with a clear error when the training loss stops being finite.

    Reading the loss on the host every step would synchronise an accelerator with the host every step. Instead the
    first non-finite loss (its value, epoch and step) is recorded on the loss's device, without a synchronisation,
    and read every `check_every_n_steps` steps, before every validation, at each training epoch end and before
    every checkpoint is written. The error is raised before any checkpoint of diverged weights is saved, so
    `checkpoints/last.ckpt` stays the last good one.

    Args:
        check_every_n_steps: how often the flag is read; None: every step on CPU (a read costs nothing there),
            every 100 steps on accelerators.
    """

    def __init__(self, check_every_n_steps: int | None = None):
        if check_every_n_steps is not None and check_every_n_steps < 1:
            raise SciMLError(f"callbacks.divergence.check_every_n_steps must be >= 1, got {check_every_n_steps}")
        self.check_every_n_steps = check_every_n_steps
        self._first_bad: torch.Tensor | None = None  # (loss, epoch, step) of the first non-finite loss; step -1: none

    def on_train_start(self, trainer, pl_module):
        self._first_bad = None

    def _every(self, device: torch.device) -> int:
        if self.check_every_n_steps is not None:
            return self.check_every_n_steps
        return 1 if device.type == "cpu" else 100

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):
            return
        loss = loss.detach().float()
        if self._first_bad is None or self._first_bad.device != loss.device:
            self._first_bad = torch.tensor([0.0, -1.0, -1.0], device=loss.device, dtype=torch.float64)
        new = ~torch.isfinite(loss).all() & (self._first_bad[2] < 0)  # stays on the device: no synchronisation
        # torch.full fills on the device; torch.tensor(value, device=...) would be a synchronising copy
        here = torch.stack([loss.reshape(-1)[0].double()] + [
            torch.full((), float(v), device=loss.device, dtype=torch.float64)
            for v in (trainer.current_epoch, trainer.global_step)])
        self._first_bad = torch.where(new, here, self._first_bad)
        if (batch_idx + 1) % self._every(loss.device) == 0:
            self.check(trainer)

    def check(self, trainer) -> None:
        """Raise if a non-finite loss was recorded (one host read)."""
        if self._first_bad is None:
            return
        loss, epoch, step = self._first_bad.tolist()
        if step < 0:
            return
        ckpt = trainer.checkpoint_callback
        last = Path(ckpt.dirpath) / "last.ckpt" if ckpt and ckpt.dirpath else None
        kept = f"last good checkpoint kept: {last}" if last and last.is_file() else "no checkpoint was written yet"
        raise SciMLError(f"training diverged: loss is {loss} at epoch {int(epoch)} step {int(step)}; {kept}. "
                         "Lower optimizer.lr or add warm-up.")

    def on_validation_start(self, trainer, pl_module):
        if trainer.state.fn == "fit":
            self.check(trainer)

    def on_train_epoch_end(self, trainer, pl_module):
        self.check(trainer)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self.check(trainer)  # before the file is written: never a checkpoint of diverged weights

    def on_train_end(self, trainer, pl_module):
        self.check(trainer)


class TrainingCurves(pl.Callback):
    """Records the epoch-level train/val metrics and plots them to `plots/training_curves.png`."""

    def __init__(self):
        self.history: dict[str, list[tuple[int, float]]] = defaultdict(list)

    def on_validation_end(self, trainer, pl_module):  # after the task has logged this epoch's metrics
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            self._record(trainer, "val/")

    def on_train_epoch_end(self, trainer, pl_module):
        self._record(trainer, "train/")

    def _record(self, trainer, prefix):
        for key, value in trainer.callback_metrics.items():
            if (key.startswith(prefix) and not key.endswith("_step") and value.numel() == 1
                    and math.isfinite(float(value))):
                self.history[key.removesuffix("_epoch")].append((trainer.current_epoch, float(value)))

    def on_fit_end(self, trainer, pl_module):
        if not trainer.is_global_zero or not self.history:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        names = sorted({k.split("/", 1)[1] for k in self.history if not k.endswith("samples_per_s")})
        cols = min(len(names), 4)
        rows = -(-len(names) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
        for ax in axes.flat[len(names):]:
            ax.set_visible(False)
        for ax, name in zip(axes.flat, names):
            for stage in ("train", "val"):
                points = dict(self.history.get(f"{stage}/{name}", []))  # last value per epoch
                if points:
                    ax.plot(list(points), list(points.values()), marker="o", ms=3, label=stage)
            ax.set(xlabel="epoch", title=name)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.legend()
        fig.tight_layout()
        out = Path(trainer.default_root_dir) / "plots"
        out.mkdir(parents=True, exist_ok=True)
        fig.savefig(out / "training_curves.png", dpi=110)
        plt.close(fig)

    def state_dict(self):
        return {"history": dict(self.history)}

    def load_state_dict(self, state_dict):
        self.history = defaultdict(list, state_dict.get("history", {}))


class RNGState(pl.Callback):
    """Keeps every global random generator (torch, CUDA, numpy, Python `random`) in checkpoints and restores them on
    resume, so that a rerun from `last.ckpt` draws the same shuffles, dropout masks and augmentations as the
    uninterrupted run would have: resumed runs end with the same metrics.

    The states are taken when the checkpoint is written (at the end of an epoch, after validation) and set when
    Lightning restores callbacks, before the training dataloader's iterator is created (the sanity check in between
    runs under Lightning's `isolate_rng`). Ranks of a DDP run share one seed (`seed_everything`) and draw alike, so
    rank 0's states serve every rank. Stored as plain tensors and lists: loadable with `weights_only=True`.
    """

    def state_dict(self):
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        cuda = [s.clone() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []
        version, state, python_gauss = random.getstate()
        return {"torch": torch.get_rng_state(), "cuda": cuda,
                "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
                "python": [version, list(state), python_gauss]}

    def load_state_dict(self, state_dict):
        if not state_dict:
            return  # a checkpoint written before this callback existed
        torch.set_rng_state(state_dict["torch"])
        if torch.cuda.is_available():
            for device, state in enumerate(state_dict["cuda"][:torch.cuda.device_count()]):
                torch.cuda.set_rng_state(state, device)
        name, keys, pos, has_gauss, gauss = state_dict["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        version, state, python_gauss = state_dict["python"]
        random.setstate((version, tuple(state), python_gauss))


class SpeedOptions(pl.Callback):
    """Opt-in speed options for the network, set per run (`callbacks.speed.channels_last=true`, `...compile=true`);
    docs/performance.md has what each one gains per plugin.

    - `channels_last`: the network's 4-d weights and every 4-d input batch `x` in channels-last memory layout (the
      layout oneDNN and cuDNN convolutions run fastest in).
    - `compile`: `torch.compile` the network in place (`nn.Module.compile`: the parameter names, hence checkpoints,
      stay those of the plain network). The first steps pay the compilation.
    """

    def __init__(self, channels_last: bool = False, compile: bool = False, compile_mode: str | None = None):
        self.channels_last, self.compile, self.compile_mode = channels_last, compile, compile_mode
        self._done = False

    def setup(self, trainer, pl_module, stage):
        if self._done:
            return
        network = getattr(pl_module, "model", pl_module)
        if self.channels_last:
            network.to(memory_format=torch.channels_last)
        if self.compile:
            network.compile(mode=self.compile_mode)
        self._done = True

    def _convert(self, batch):
        if self.channels_last and isinstance(batch, dict) and isinstance(batch.get("x"), torch.Tensor) \
                and batch["x"].ndim == 4:
            batch["x"] = batch["x"].contiguous(memory_format=torch.channels_last)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._convert(batch)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._convert(batch)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._convert(batch)

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self._convert(batch)
