"""The rows of several files as one indexable store, read through a plugin's `Reader`.

Rows are numbered globally across files (file offsets). `load(rows)` keeps the rows a process needs in memory when
they fit its memory budget (one read per file); otherwise `read` goes to the files batch by batch, one sorted read
per file and batch, never per sample.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sciml.data.reader import FileInfo, Reader
from sciml.errors import SciMLError

log = logging.getLogger(__name__)


class RowStore:
    """Files opened (validated) by `reader`; rows addressed by global index."""

    def __init__(self, reader: Reader, files: Sequence[Path]):
        self.reader = reader
        self.infos: list[FileInfo] = [reader.open(Path(f)) for f in files]
        for info in self.infos:
            if info.rows == 0:
                raise SciMLError(f"{info.path}: no rows (empty file)")
        shapes = {info.shape for info in self.infos}
        if len(shapes) > 1 and None not in shapes:
            first = self.infos[0]
            other = next(i for i in self.infos if i.shape != first.shape)
            raise SciMLError(f"{other.path}: rows of shape {other.shape}, but {first.path} has {first.shape}; "
                             "files read together must agree")
        self.shape: tuple[int, ...] | None = None if None in shapes else self.infos[0].shape
        self.labels = all(info.labels for info in self.infos)
        self.offsets = np.concatenate([[0], np.cumsum([info.rows for info in self.infos])]).astype(np.int64)
        self.placed = False  # whether load() has decided between memory and per-batch reads
        self._rows: np.ndarray | None = None  # global rows held in memory, sorted
        self._memory: dict[str, np.ndarray | list[np.ndarray]] | None = None

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def files(self) -> list[Path]:
        return [info.path for info in self.infos]

    def groups(self, key: str) -> np.ndarray:
        """The per-row group key `key` over all files ("file": the file each row is in)."""
        if key == "file":
            return np.repeat(np.array([str(i.path) for i in self.infos]), [i.rows for i in self.infos])
        missing = [i.path for i in self.infos if key not in i.groups]
        if missing:
            known = sorted({"file", *self.infos[0].groups})
            raise SciMLError(f"data.group_by: '{key}' is not a group key of {missing[0]} (known: {', '.join(known)})")
        return np.concatenate([np.asarray(i.groups[key]) for i in self.infos])

    def locate(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(file number, row within the file) of global rows."""
        file_id = np.searchsorted(self.offsets, index, side="right") - 1
        return file_id, index - self.offsets[file_id]

    def row_bytes(self) -> int:
        """Bytes of one row's inputs as float32 (the largest file's rows when shapes vary)."""
        if self.shape is not None:
            return int(np.prod(self.shape)) * 4
        return max(int(i.meta.get("row_bytes", 0)) for i in self.infos) or 1

    # -- reading ------------------------------------------------------------------------------------------------
    def _read_sorted(self, rows: np.ndarray) -> dict[str, np.ndarray | list[np.ndarray]]:
        file_id, local = self.locate(rows)
        gathered: dict[str, _Gather] = {}
        start = 0
        for f in np.unique(file_id):
            info = self.infos[int(f)]
            part = self.reader.read(info, local[file_id == f])
            n = int((file_id == f).sum())
            for key, value in part.items():
                if len(value) != n:
                    raise SciMLError(f"{info.path}: the reader returned {len(value)} '{key}' rows for {n} requested")
                if key not in ("y", "w") or self.labels:
                    gathered.setdefault(key, _Gather(len(rows))).put(start, value)
            start += n
        return {k: g.result() for k, g in gathered.items()}

    def load(self, rows: np.ndarray, max_bytes: float) -> bool:
        """Keep `rows` in memory when their inputs fit in `max_bytes`; otherwise reads stay per batch. Returns which."""
        rows = np.unique(rows)
        self.placed = True
        if len(rows) == 0 or len(rows) * self.row_bytes() > max_bytes:
            self._rows = self._memory = None
            return False
        self._memory, self._rows = self._read_sorted(rows), rows
        return True

    @property
    def in_memory(self) -> bool:
        return self._rows is not None

    def read(self, index: np.ndarray) -> dict[str, np.ndarray]:
        """Rows at global `index` (any order), in that order, with their `index`."""
        index = np.asarray(index, dtype=np.int64)
        rows, memory = self._rows, self._memory
        held = rows is not None and memory is not None
        if rows is not None and memory is not None:
            position = np.minimum(np.searchsorted(rows, index), len(rows) - 1)
            held = bool((rows[position] == index).all())
        if held and memory is not None:
            batch = {k: _take(v, position) for k, v in memory.items()}
        else:  # not held (or not all of them: e.g. training rows read once after a test-only run)
            sorted_rows = np.unique(index)  # one sorted read per file; repeated rows (oversampling) read once
            values = self._read_sorted(sorted_rows)
            if len(sorted_rows) == len(index) and np.array_equal(sorted_rows, index):
                batch = {k: _take(v, None) for k, v in values.items()}  # in order (a streamed buffer): no copy
            else:
                position = np.searchsorted(sorted_rows, index)
                batch = {k: _take(v, position) for k, v in values.items()}
        batch["index"] = index
        return batch

    def read_labels(self, index: np.ndarray) -> np.ndarray:
        """The labels of sorted, unique global rows, flattened (for counting): from memory when held, else through
        the reader's labels-only read."""
        if self.in_memory:
            return np.asarray(self.read(index)["y"]).ravel()
        file_id, local = self.locate(np.asarray(index, dtype=np.int64))
        return np.concatenate([np.asarray(self.reader.read_labels(self.infos[int(f)], local[file_id == f])).ravel()
                               for f in np.unique(file_id)])

    def close(self) -> None:
        self.reader.close()


class _Gather:
    """The rows of one key, read file by file, copied into one array allocated at the first part (memory: the rows
    plus one file's part, not twice the rows); a list of per-row arrays once parts differ in shape (volumes of
    different sizes)."""

    def __init__(self, rows: int):
        self.rows = rows
        self.array: np.ndarray | None = None
        self.list: list[np.ndarray] | None = None

    def put(self, start: int, value: np.ndarray) -> None:
        if self.list is None:
            if self.array is None:
                self.array = np.empty((self.rows, *value.shape[1:]), dtype=value.dtype)
            if self.array.shape[1:] == value.shape[1:]:
                self.array[start:start + len(value)] = value
                return
            self.list, self.array = list(self.array[:start]), None  # shapes differ: rows so far become a list
        self.list.extend(value)

    def result(self) -> np.ndarray | list[np.ndarray]:
        if self.list is not None:
            return self.list
        assert self.array is not None, "no part was put"
        return self.array


def _concat(parts: list) -> np.ndarray | list[np.ndarray]:
    """One array when the rows agree in shape, else a list of per-row arrays (volumes of different sizes)."""
    if len({p.shape[1:] for p in parts}) == 1:
        return np.concatenate(parts) if len(parts) > 1 else parts[0]
    return [row for p in parts for row in p]


def _take(values, position: np.ndarray | None) -> np.ndarray:
    """Rows `position` of `values` (None: all, in order, without a copy) as one array."""
    if isinstance(values, np.ndarray):
        return values if position is None else values[position]
    chosen = list(values) if position is None else [values[int(p)] for p in position]
    if len({c.shape for c in chosen}) > 1:
        raise SciMLError("rows of different shapes cannot share a batch; evaluate them one per batch")
    return np.stack(chosen)
