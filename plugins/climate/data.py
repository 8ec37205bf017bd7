"""Semi-supervised training on top of sciml's DataModule: only `labeled_fraction` of the training time steps keep
their labels (a seeded choice); the others feed the auto-encoder loss (`unlabeled=reconstruct`) or are left out
(`unlabeled=drop`). Everything else (files, splits, shards, statistics, loaders, predictions) is the core's; the
file format is `reader.ClimateNetReader`."""
from __future__ import annotations

import logging

import numpy as np
from torch.utils.data import Dataset

from sciml.data import DataModule, Rows, shard
from sciml.errors import SciMLError

log = logging.getLogger(__name__)


class ClimateDataModule(DataModule):
    """Args (besides the core's and the reader's `data.` keys):
        labeled_fraction: fraction of the training rows whose labels are used (seeded by `split_seed`).
        unlabeled: what the other training rows do: `reconstruct` (they feed the auto-encoder loss only, batches
            carry a `labeled` flag; the labelled rows are repeated to match their number, so that a typical batch
            holds both) or `drop` (supervised on the labelled fraction alone).
    """

    def __init__(self, labeled_fraction: float = 1.0, unlabeled: str = "reconstruct", **kwargs):
        if not 0 < labeled_fraction <= 1:
            raise SciMLError(f"data.labeled_fraction must be in (0, 1], got {labeled_fraction}")
        if unlabeled not in ("reconstruct", "drop"):
            raise SciMLError(f"data.unlabeled must be 'reconstruct' or 'drop', got '{unlabeled}'")
        super().__init__(**kwargs)
        self.labeled_fraction, self.unlabeled = float(labeled_fraction), unlabeled
        self.labeled_rows: np.ndarray | None = None  # the training rows whose labels are used (all ranks')
        self._dealt: np.ndarray | None = None

    @property
    def semi_supervised(self) -> bool:
        return self.labeled_fraction < 1

    def deal_train_rows(self, rows: np.ndarray) -> np.ndarray:
        """Choose the labelled rows among all training rows, and deal them first, so that each rank gets its share."""
        if not self.semi_supervised:
            self.labeled_rows = rows
            return rows
        n = max(1, int(round(self.labeled_fraction * len(rows))))
        self.labeled_rows = np.sort(rows[np.random.default_rng([self.split_seed, 2]).permutation(len(rows))[:n]])
        labeled = np.isin(rows, self.labeled_rows)
        self._dealt = np.concatenate([rows[labeled], rows[~labeled]])
        log.info("semi-supervised: %d of %d training rows labelled, the others %s", n, len(rows),
                 "feed the auto-encoder" if self.unlabeled == "reconstruct" else "left out")
        return self._dealt

    def _plan(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One rank's training rows and their `labeled` flags."""
        labeled = np.isin(rows, self.labeled_rows)
        if self.unlabeled == "drop":
            return rows[labeled], np.ones(labeled.sum(), bool)
        # the few labelled rows are repeated to balance the unlabelled ones, so that a typical batch holds both and
        # the segmentation head is not starved (every unlabelled row is still seen once per epoch)
        repeats = max(1, int(round((len(self._dealt) - len(self.labeled_rows)) / len(self.labeled_rows))))
        index = np.concatenate([rows[~labeled], np.repeat(rows[labeled], repeats)])
        return index, np.concatenate([np.zeros((~labeled).sum(), bool), np.ones(labeled.sum() * repeats, bool)])

    def train_dataset(self, rows: np.ndarray) -> Dataset:
        if not self.semi_supervised:
            return super().train_dataset(rows)
        index, flags = self._plan(rows)
        # DDP needs the same number of batches on every rank: ranks whose share came out shorter repeat own rows
        world = self.trainer.world_size if self.trainer is not None else 1
        longest = max(len(self._plan(shard(self._dealt, r, world, equal=True))[0]) for r in range(world))
        if len(index) == 0:
            raise SciMLError(f"data.labeled_fraction={self.labeled_fraction}: {len(self.labeled_rows)} labelled "
                             f"training rows, fewer than the {world} ranks (data.unlabeled=drop)")
        index, flags = np.resize(index, longest), np.resize(flags, longest)
        return Rows(self.store, index, {"labeled": flags} if self.unlabeled == "reconstruct" else None)

    def class_frequencies(self, rows: np.ndarray | None = None) -> np.ndarray:
        """Pixel counts per class over the labelled training rows (for inverse-frequency class weights)."""
        counts = super().class_frequencies(self.labeled_rows if rows is None else rows)
        names = self.reader.class_names
        counts = np.pad(counts, (0, max(0, len(names) - len(counts))))  # classes absent from the training labels
        log.info("training pixel fractions: %s", ", ".join(
            f"{n} {f:.4f}" for n, f in zip(names, counts / max(counts.sum(), 1))))
        return counts
