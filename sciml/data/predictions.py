"""Predictions streamed to disk: each rank writes its batches as they come, one merge writes the domain format.

`PredictionWriter` (a Lightning `BasePredictionWriter`) saves every predicted batch of every rank as a small `.npz`
part; nothing is gathered in memory. At the end rank 0 merges the parts one input file at a time and hands each
file's predictions, sorted by row, to the plugin's reader, which writes them in the field's format (HDF5 scores,
CF-netCDF, NIfTI, ...) next to nothing else. Memory is bounded by one input file's predictions.
"""
from __future__ import annotations

import logging
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
from pytorch_lightning.callbacks import BasePredictionWriter

from sciml.data.store import RowStore, _concat
from sciml.errors import SciMLError

log = logging.getLogger(__name__)


class PredictionWriter(BasePredictionWriter):
    """Writes `trainer.predict` outputs (dicts of tensors with the global row `index`) into `directory`."""

    def __init__(self, directory: str | Path):
        super().__init__(write_interval="batch")
        self.directory = Path(directory)
        self.written: list[Path] = []

    @property
    def parts_dir(self) -> Path:
        return self.directory / ".parts"

    def on_predict_start(self, trainer, pl_module):
        if trainer.is_global_zero:
            shutil.rmtree(self.parts_dir, ignore_errors=True)
            self.parts_dir.mkdir(parents=True)
        trainer.strategy.barrier()

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        if "index" not in prediction:
            raise SciMLError(f"{type(pl_module).__name__}.predict_step must return the batch's 'index' with its "
                             "predictions (the rows they belong to)")
        arrays = {k: v.detach().cpu().numpy() for k, v in prediction.items()}
        part = self.parts_dir / f"rank{trainer.global_rank:05d}-{dataloader_idx}-{batch_idx:08d}.npz"
        np.savez(part, **arrays)

    def on_exception(self, trainer, pl_module, exception):
        if trainer.is_global_zero:  # nothing half-written stays behind
            shutil.rmtree(self.parts_dir, ignore_errors=True)

    def on_predict_end(self, trainer, pl_module):
        trainer.strategy.barrier()  # every rank's parts are on disk
        if trainer.is_global_zero:
            parts = sorted(self.parts_dir.glob("*.npz"))
            self.written = trainer.datamodule.write_predictions(parts, self.directory) if parts else []
            shutil.rmtree(self.parts_dir, ignore_errors=True)
            log.info("predictions: %s", ", ".join(str(p.relative_to(self.directory)) for p in self.written[:8])
                     + (f" and {len(self.written) - 8} more" if len(self.written) > 8 else ""))
        trainer.strategy.barrier()


def merge_parts(parts: list[Path], store: RowStore, directory: Path) -> list[Path]:
    """The parts' predictions grouped by input file, sorted by row, written by `store.reader`."""
    by_file: dict[int, list[tuple[Path, np.ndarray]]] = defaultdict(list)
    for part in parts:
        with np.load(part) as arrays:  # only the index is read here
            index = arrays["index"].reshape(-1).astype(np.int64)
        file_id, _ = store.locate(index)
        for f in np.unique(file_id):
            by_file[int(f)].append((part, np.flatnonzero(file_id == f)))
    written: list[Path] = []
    directory.mkdir(parents=True, exist_ok=True)
    for f in sorted(by_file):
        pieces: dict[str, list[np.ndarray]] = defaultdict(list)
        for part, positions in by_file[f]:
            with np.load(part) as arrays:
                for key in arrays.files:
                    pieces[key].append(arrays[key][positions])
        outputs = {k: _concat(v) for k, v in pieces.items()}
        index = np.asarray(outputs.pop("index")).reshape(-1)
        order = np.argsort(index, kind="stable")
        outputs = {k: (v[order] if isinstance(v, np.ndarray) else [v[i] for i in order]) for k, v in outputs.items()}
        _, local = store.locate(index[order])
        written += store.reader.write(store.infos[f], local, outputs, directory)
    return written
