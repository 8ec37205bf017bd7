"""The one interface a plugin implements for its data: a reader of its file format.

A reader opens and validates one file (`open`), reads rows of it (`read`) and writes predictions for rows of it in
the domain's format (`write`). Everything else — finding files, splits, per-rank shards, holding rows in memory or
reading them per batch, statistics, loaders, streamed prediction writing — is the core's `sciml.data.DataModule`.

A reader is a dataclass whose fields are the plugin's data options: `data.KEY=` on the command line sets them (the
datamodule forwards every key it does not own to the reader, and names unknown keys in one line).

Rows are the unit of splitting and batching (an image, a time step, a storm, a case). Arrays returned by `read`:

    x   inputs, (n, *shape) — `FileInfo.shape` is one row's shape
    y   targets, when the file has them (`FileInfo.labels`)
    w   per-row weights, optional

All three are numpy arrays with one entry per requested row, in the requested (sorted) order.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from sciml.data.files import find_files


@dataclass
class FileInfo:
    """What `Reader.open` learns about one file without reading its rows.

    rows: number of rows. shape: one row's input shape, e.g. (C, H, W); None when rows differ in shape (whole
    volumes of different sizes: evaluation then runs one row per batch). labels: the file has targets. groups: per-row
    keys that splits may keep together (`data.group_by`), e.g. {"day": array of dates}; the core adds "file".
    meta: whatever `read` and `write` need later (coordinates, affine, header, ...).
    """

    path: Path
    rows: int
    shape: tuple[int, ...] | None
    labels: bool = True
    groups: Mapping[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


class Reader(ABC):
    """A plugin's file format. Subclasses are dataclasses (their fields are `data.` options) and implement `open`,
    `read` and `write`; `patterns` and `default_path` say which files a folder holds and what the embedded sample
    is. Readers are pickled into DataLoader workers: keep open file handles out of the pickled state."""

    patterns: ClassVar[tuple[str, ...]] = ()
    """Glob patterns of the files in a folder given as `data.path`, e.g. ("*.h5", "*.hdf5")."""

    fixed_dims: ClassVar[int | None] = None
    """How many leading dimensions of a row's shape a trained network is bound to (None: all). A reader whose rows
    a fully convolutional network segments on any grid sets 1 (channels): test and prediction files may then have
    another grid than the training files (files read together still share one shape)."""

    def default_path(self) -> Path | list[Path] | None:
        """The embedded sample used when `data.path` is null (None: the plugin has none)."""
        return None

    def find(self, path, key: str) -> list[Path]:
        """The inputs named by `path` (a file, folder, glob or list). Override for inputs that are folders."""
        return find_files(path, self.patterns, key)

    @abstractmethod
    def open(self, path: Path) -> FileInfo:
        """Validate one file (variables, shapes, dtypes) and describe it; a problem is a `SciMLError` naming the
        file and what was expected."""

    @abstractmethod
    def read(self, info: FileInfo, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Rows `rows` (sorted, unique, local to this file) as `x` and, when present, `y` and `w`. Checks the values
        (NaN, label range) and names the file on failure."""

    def read_labels(self, info: FileInfo, rows: np.ndarray) -> np.ndarray:
        """The labels `y` of rows `rows` (sorted, unique, local), for class counts over a training set that is not
        held in memory. Override to read them without the inputs (a pass over labels alone is far cheaper)."""
        return self.read(info, rows)["y"]

    @abstractmethod
    def write(self, info: FileInfo, rows: np.ndarray, outputs: dict[str, np.ndarray], directory: Path
              ) -> list[Path]:
        """Write the predictions `outputs` (arrays, one entry per row of `rows`, sorted) for rows of one input file
        into `directory`, in the domain's format, and return the files written. Write to a temporary name and rename
        so that readers never see half a file."""

    max_open_files: ClassVar[int] = 16

    def handle(self, path: Path, opener):
        """An open file kept for later reads (one open per file and process, not per batch). At most
        `max_open_files` stay open, the least recently used is closed first: each open HDF5 or netCDF file holds
        caches of its own (about 2 MB per climate file), and a data set of thousands of files read in turn would
        otherwise keep all of them (8 GB streamed in 243 files under a 1 GiB cap was killed by it)."""
        handles = self.__dict__.setdefault("_handles", {})
        if path in handles:
            handles[path] = handles.pop(path)  # most recently used last
        else:
            while len(handles) >= max(1, self.max_open_files):
                handles.pop(next(iter(handles))).close()
            handles[path] = opener(path)
        return handles[path]

    def close(self) -> None:
        """Release the open files."""
        for handle in self.__dict__.pop("_handles", {}).values():
            handle.close()

    def __getstate__(self):  # open files do not cross process boundaries (DataLoader workers open their own)
        return {k: v for k, v in self.__dict__.items() if k != "_handles"}
