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

    It raises at once, before any checkpoint of the diverged weights is written, so `checkpoints/last.ckpt`
    stays the last good one.
    """

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor) and not torch.isfinite(loss.detach()).all():
            ckpt = trainer.checkpoint_callback
            last = Path(ckpt.dirpath) / "last.ckpt" if ckpt and ckpt.dirpath else None
            kept = f"last good checkpoint kept: {last}" if last and last.is_file() else "no checkpoint was written yet"
            raise SciMLError(f"training diverged: loss is {loss.item()} at epoch {trainer.current_epoch} "
                             f"step {trainer.global_step}; {kept}. Lower optimizer.lr or add warm-up.")


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
