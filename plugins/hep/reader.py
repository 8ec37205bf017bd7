"""HEP events in HDF5, the layout of NERSC's hep_cnn_benchmark: inputs (`data`, (N, C, H, W) calorimeter images),
`label` (N; 1 = signal, 0 = background; optional: files without it are predicted, not scored) and per-event
weights (`weight_key`: `normweight`, `weight`, or null for none). Predictions: `<input stem>_scores.h5`.

`H5Events` is what any HEP HDF5 input shares (labels, weights, block-wise reads, value checks, the scores file);
`CaloImages` adds the image layout. Another kind of input (particle lists) is another subclass beside it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from sciml.data import FileInfo, Reader
from sciml.errors import SciMLError

DEFAULT_FILE = Path(__file__).parent / "data" / "hep_top_qcd_40x40.h5"
WINDOW_BYTES = 64 * 2**20  # the most one contiguous read may span


def open_h5(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise SciMLError(f"{path}: not a readable HDF5 file ({str(exc).splitlines()[0]})") from None


def read_rows(dataset: h5py.Dataset, rows: np.ndarray) -> np.ndarray:
    """Rows `rows` (sorted, unique) of `dataset` in few reads. Wanted rows close to each other (within one chunk, or
    1 MiB of an unchunked dataset, and within one aligned window of `WINDOW_BYTES`) are read as one contiguous slice
    and kept; the isolated rest as one fancy-index read. Loading a split into memory thus becomes a few large
    sequential reads — several times faster than fancy indexing on chunked, compressed files — while a random batch
    of a large file stays one read. Memory: the kept rows plus one window."""
    rows = np.asarray(rows, dtype=np.int64)
    row_bytes = max(1, dataset.dtype.itemsize * int(np.prod(dataset.shape[1:])))
    window = max(1, WINDOW_BYTES // row_bytes)
    gap = dataset.chunks[0] if dataset.chunks else max(1, 2**20 // row_bytes)  # rows cheaper to read than to skip
    out = np.empty((len(rows), *dataset.shape[1:]), dtype=dataset.dtype)
    if len(rows) == 0:
        return out
    breaks = np.flatnonzero((np.diff(rows) > gap) | (np.diff(rows // window) != 0)) + 1
    isolated = []
    for run in np.split(np.arange(len(rows)), breaks):
        if len(run) == 1:
            isolated.append(run[0])
            continue
        first, last = int(rows[run[0]]), int(rows[run[-1]])
        values = dataset[first:last + 1]
        out[run] = values if last + 1 - first == len(run) else values[rows[run] - first]
    if isolated:
        out[isolated] = dataset[rows[isolated]]
    return out


@dataclass
class H5Events(Reader):
    """Args (`data.` keys):
        weight_key: per-event weights used in loss and metrics (`normweight`, `weight`), or null for none.
    """

    weight_key: str | None = "normweight"
    patterns = ("*.h5", "*.hdf5")
    inputs = "data"  # the dataset holding the inputs

    def default_path(self):
        return DEFAULT_FILE

    def check_inputs(self, dataset: h5py.Dataset, path: Path) -> None:
        """Refuse inputs of the wrong layout (a `SciMLError` naming the file)."""

    def open(self, path):
        h5 = self.handle(path, open_h5)
        if not isinstance(h5.get(self.inputs), h5py.Dataset):
            raise SciMLError(f"{path}: missing dataset '{self.inputs}' ({self.layout()})")
        inputs = h5[self.inputs]
        self.check_inputs(inputs, path)
        labels = isinstance(h5.get("label"), h5py.Dataset)
        weights = bool(self.weight_key) and isinstance(h5.get(self.weight_key), h5py.Dataset)
        if labels and self.weight_key and not weights:
            raise SciMLError(f"{path}: missing dataset '{self.weight_key}' ({self.layout()}; data.weight_key=null "
                             "for unweighted events)")
        for key in ["label"] * labels + [self.weight_key] * weights:
            if h5[key].shape != (len(inputs),):
                raise SciMLError(f"{path}: '{key}' has shape {h5[key].shape}, expected ({len(inputs)},) to match "
                                 f"'{self.inputs}'")
        meta = {"weights": weights, "chunk_rows": inputs.chunks[0] if inputs.chunks else None}  # streaming reads chunks
        return FileInfo(path, len(inputs), tuple(inputs.shape[1:]), labels=labels, meta=meta)

    def input_layout(self) -> str:
        return f"'{self.inputs}'"

    def layout(self) -> str:
        return f"expected {self.input_layout()}, optionally 'label' (N)" + (
            f" and '{self.weight_key}' (N)" if self.weight_key else "")

    def read_labels(self, info, rows):
        return read_rows(self.handle(info.path, open_h5)["label"], rows).astype(np.int64)

    def read(self, info, rows):
        h5 = self.handle(info.path, open_h5)
        out = {"x": read_rows(h5[self.inputs], rows).astype(np.float32, copy=False)}
        if info.labels:
            label = read_rows(h5["label"], rows)
            if not np.isin(label, (0, 1)).all():
                raise SciMLError(f"{info.path}: 'label' must be 0 (background) or 1 (signal), found "
                                 f"{np.unique(label[~np.isin(label, (0, 1))])[:5]}")
            out["y"] = label.astype(np.int64)
        if info.meta["weights"]:
            out["w"] = read_rows(h5[self.weight_key], rows).astype(np.float32, copy=False)
        for key, name in (("x", self.inputs), ("w", self.weight_key)):
            if key in out and not np.isfinite(out[key]).all():
                bad = int((~np.isfinite(out[key])).sum())
                raise SciMLError(f"{info.path}: {bad} NaN or infinite values in '{name}'")
        return out

    def write(self, info, rows, outputs, directory):
        """`<stem>_scores.h5`: `score` = P(signal), `probabilities` (all classes), `label` and `weight` when the
        input has them, `row` = each event's row in the input file (attribute `source`)."""
        target = directory / f"{info.path.stem}_scores.h5"
        sources = self.__dict__.setdefault("_written", {})
        if sources.setdefault(target.name, info.path) != info.path:  # a/x.h5 and b/x.h5: keep both
            target = directory / f"{info.path.parent.name}_{target.name}"
        tmp = directory / f".{target.name}.tmp"
        probabilities = np.asarray(outputs["score"], dtype=np.float32)
        with h5py.File(tmp, "w") as h5:
            h5["score"] = probabilities[:, 1]
            h5["probabilities"] = probabilities
            for key in ("label", "weight"):
                if key in outputs:
                    h5[key] = np.asarray(outputs[key])
            h5["row"] = np.asarray(rows, dtype=np.int64)
            h5.attrs["source"] = str(info.path)
            h5.attrs["score"] = "probability of label 1 (signal)"
        tmp.replace(target)
        return [target]


@dataclass
class CaloImages(H5Events):
    """Calorimeter images `data` (N, C, H, W); channels and image size come from the file.

    Args (`data.` keys):
        channels: null, or the number of channels the files must have (a check, nothing else).
    """

    channels: int | None = None

    def input_layout(self) -> str:
        return f"'{self.inputs}' (N, {self.channels or 'C'}, H, W)"

    def check_inputs(self, dataset, path):
        if dataset.ndim != 4 or not np.issubdtype(dataset.dtype, np.number):
            raise SciMLError(f"{path}: '{self.inputs}' has shape {dataset.shape} and type {dataset.dtype}, "
                             f"{self.layout()}")
        if self.channels is not None and dataset.shape[1] != self.channels:
            raise SciMLError(f"{path}: '{self.inputs}' has {dataset.shape[1]} channels, expected {self.channels} "
                             "(data.channels)")
