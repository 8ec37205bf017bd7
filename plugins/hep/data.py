"""Calorimeter images in the HDF5 layout of NERSC's hep_cnn_benchmark: `data` (N, C, H, W), `label` (N),
`weight` and `normweight` (N). One file, a folder of files, or a glob.

The rows a process needs are read into memory when they fit (one pass over each file, no per-sample opens); larger
inputs are read batch by batch with one sorted fancy-index read per file. Batches are gathered with one indexing
operation (`__getitems__`), not sample by sample. Each channel is scaled by its training-set maximum, on the device,
after transfer; the maxima are saved in checkpoints so that a test-only run scales the same way.

Under DDP (more than one rank) every rank keeps only its own share of each split and reads only those rows from the
files (`shard`); the module says so with `shards_by_rank = True`, and sciml then builds the Trainer without
Lightning's DistributedSampler.
"""
from __future__ import annotations

import logging
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from sciml.data import SplitDataModule, find_files
from sciml.errors import SciMLError

log = logging.getLogger(__name__)
DEFAULT_FILE = Path(__file__).parent / "data" / "hep_top_qcd_40x40.h5"


def resolve_files(path: str | Path | None, key: str = "data.path") -> list[Path]:
    """A file, a folder of .h5/.hdf5 files, or a glob; None means the embedded default sample."""
    if path is None:
        return [DEFAULT_FILE]
    return find_files(path, ("*.h5", "*.hdf5"), key)


class H5Images:
    """The rows of one or more HDF5 files as one indexable source, validated on open.

    Reads are lazy (one sorted read per file and batch) until `load(rows)` keeps the rows this process needs in
    memory, when they fit in `max_memory_gb`.
    """

    def __init__(self, files: list[Path], channels: int, weight_key: str | None, max_memory_gb: float):
        self.files, self.weight_key, self.max_memory_gb = files, weight_key, max_memory_gb
        counts, shape = [], None
        for f in files:
            with _open(f) as h5:
                n, file_shape = _validate(h5, f, channels, weight_key)
            if shape is not None and file_shape != shape:
                raise SciMLError(f"{f}: images of shape {file_shape}, but {files[0]} has {shape}")
            shape = file_shape
            counts.append(n)
        self.shape = shape
        self.offsets = np.concatenate([[0], np.cumsum(counts)])
        self.in_memory = False
        self._rows: np.ndarray | None = None  # the global rows held in memory, sorted
        self._arrays: dict[str, np.ndarray] | None = None  # their values, in the order of _rows
        self._handles: dict[int, h5py.File] = {}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def load(self, rows: np.ndarray | None = None) -> None:
        """Keep `rows` (global indices; None: all) in memory if they fit in `max_memory_gb`; reads stay lazy
        otherwise. Only these rows are kept: a rank of a sharded run holds its shard, not the files."""
        rows = np.arange(len(self)) if rows is None else np.unique(rows)
        self.in_memory = 0 < len(rows) * np.prod(self.shape) * 4 <= self.max_memory_gb * 2**30
        if not self.in_memory:
            return
        which = np.searchsorted(self.offsets, rows, side="right") - 1
        parts = [self._read_rows(file_id, rows[which == file_id] - self.offsets[file_id])
                 for file_id in np.unique(which)]
        self._rows = rows
        self._arrays = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _read_rows(self, file_id: int, local: np.ndarray, block_bytes: int = 64 * 2**20) -> dict[str, np.ndarray]:
        """Rows `local` (sorted) of one file. The file is walked in windows of `block_bytes`; each window holding
        wanted rows is read as one contiguous slice and only those rows are kept. With chunked, compressed files this
        is several times faster than a fancy-index read of scattered rows, and memory stays at the kept rows plus
        one window."""
        path = self.files[file_id]
        rows_per_block = max(1, block_bytes // int(np.prod(self.shape) * 4))
        keys = {"x": "data", "y": "label", **({"w": self.weight_key} if self.weight_key else {})}
        dtypes = {"x": np.float32, "y": np.int64, "w": np.float32}
        parts: dict[str, list[np.ndarray]] = {k: [] for k in keys}
        with _open(path) as h5:
            for block in np.split(local, np.flatnonzero(np.diff(local // rows_per_block)) + 1):
                first, stop = int(block[0]), int(block[-1]) + 1
                for key, name in keys.items():
                    values = h5[name][first:stop]
                    if stop - first != len(block):  # not contiguous: keep the wanted rows only
                        values = values[block - first]
                    parts[key].append(values.astype(dtypes[key], copy=False))
        arrays = {k: np.concatenate(v) for k, v in parts.items()}
        _check_finite(arrays, path, self.weight_key)
        return arrays

    def read(self, index: np.ndarray) -> dict[str, np.ndarray]:
        """Rows at global `index` (any order), in that order."""
        if self.in_memory:
            position = np.searchsorted(self._rows, index)
            if (position >= len(self._rows)).any() or (self._rows[position] != index).any():
                raise IndexError("H5Images.read: rows outside those loaded into memory")
            batch = {k: v[position] for k, v in self._arrays.items()}
            batch["index"] = index
            return batch
        order = np.argsort(index, kind="stable")
        sorted_index = index[order]
        which = np.searchsorted(self.offsets, sorted_index, side="right") - 1
        parts = []
        for file_id in np.unique(which):  # h5py needs increasing indices: one read per file and batch
            local = sorted_index[which == file_id] - self.offsets[file_id]
            h5 = self._handles.get(file_id) or self._handles.setdefault(file_id, _open(self.files[file_id]))
            part = {"x": h5["data"][local].astype(np.float32), "y": h5["label"][local].astype(np.int64)}
            if self.weight_key:
                part["w"] = h5[self.weight_key][local].astype(np.float32)
            _check_finite(part, self.files[file_id], self.weight_key)
            parts.append(part)
        batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        batch = {k: v[inverse] for k, v in batch.items()}
        batch["index"] = index
        return batch

    def channel_max(self, index: np.ndarray, block: int = 8192) -> np.ndarray:
        """Per-channel maximum over the rows `index`, in blocks (bounded memory for large inputs)."""
        result = np.zeros(self.shape[0], dtype=np.float64)
        for start in range(0, len(index), block):
            x = self.read(np.sort(index[start:start + block]))["x"]
            result = np.maximum(result, x.max(axis=(0, 2, 3)))
        return result

    def __getstate__(self):  # open h5py handles do not cross process boundaries (DataLoader workers)
        return {**self.__dict__, "_handles": {}}


def shard(rows: np.ndarray, rank: int, world: int, equal: bool) -> np.ndarray:
    """Rank `rank`'s share of `rows` among `world` ranks: every `world`-th row from offset `rank`, so the shares are
    disjoint and together hold all of `rows`. `equal`: cut every share to `len(rows) // world` rows (at most
    `world - 1` rows of the split are left out), so that every rank runs the same number of batches."""
    mine = rows[rank::world]
    return mine[:len(rows) // world] if equal else mine


class Rows(Dataset):
    """A split of an `H5Images` source; `__getitems__` gathers a whole batch with one indexed read."""

    def __init__(self, source: H5Images, index: np.ndarray):
        self.source, self.index = source, index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i):
        return self.__getitems__([i])

    def __getitems__(self, positions):
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in
                self.source.read(self.index[np.asarray(positions)]).items()}


class HEPDataModule(SplitDataModule):
    """Signal vs background calorimeter images.

    Args:
        path: file, folder or glob of HDF5 files; None = the embedded default sample.
        test_path: files that replace the test split (the test fraction of `path` is then not held out).
        batch_size: per device.
        val_fraction, test_fraction: random split of `path`, seeded by `split_seed`.
        weight_key: per-event weights used in loss and metrics (`normweight`, `weight`, or None).
        channels: expected number of image channels.
        max_memory_gb: inputs larger than this are read batch by batch instead of whole.

    Under DDP each rank keeps `shard(split, rank, world)` of every split: equal-size shards for training and
    validation, an exact partition for testing and prediction; see `setup`.
    """

    shards_by_rank = True  # sciml builds the Trainer without Lightning's DistributedSampler

    def __init__(self, path: str | None = None, test_path: str | None = None, batch_size: int = 128,
                 val_fraction: float = 0.15, test_fraction: float = 0.15, weight_key: str | None = "normweight",
                 channels: int = 3, num_workers: int = 0, split_seed: int = 0, max_memory_gb: float = 8.0):
        super().__init__()
        if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
            raise SciMLError(f"data.val_fraction={val_fraction}, data.test_fraction={test_fraction}: "
                             "each in [0, 1) and together below 1")
        if batch_size < 1:
            raise SciMLError(f"data.batch_size must be >= 1, got {batch_size}")
        self.path, self.test_path = path, test_path
        self.batch_size, self.num_workers = batch_size, num_workers
        self.val_fraction, self.test_fraction = val_fraction, 0.0 if test_path else test_fraction
        self.weight_key, self.channels = weight_key, channels
        self.split_seed, self.max_memory_gb = split_seed, max_memory_gb
        self.splits: dict[str, Rows] = {}
        self._set_channel_max(None)

    def _set_channel_max(self, channel_max):
        self.channel_max = None if channel_max is None else torch.as_tensor(channel_max, dtype=torch.float32)

    @property
    def input_shape(self) -> tuple[int, ...] | None:
        return self._source.shape if self.splits else None

    def setup(self, stage: str) -> None:
        """Split the rows (seeded), keep this rank's share of each split in memory and, when fitting, compute the
        per-channel maxima of the whole training split."""
        if self.splits:
            return
        rank, world = self._rank_and_world()
        self._source = H5Images(resolve_files(self.path), self.channels, self.weight_key, self.max_memory_gb)
        n = len(self._source)
        order = np.random.default_rng(self.split_seed).permutation(n)
        n_test, n_val = int(round(self.test_fraction * n)), int(round(self.val_fraction * n))
        train, val = np.sort(order[n_test + n_val:]), np.sort(order[n_test:n_test + n_val])
        if self.test_path:
            test_source = H5Images(resolve_files(self.test_path, "data.test_path"), self.channels, self.weight_key,
                                   self.max_memory_gb)
            if test_source.shape != self._source.shape:
                raise SciMLError(f"data.test_path: images of shape {test_source.shape}, "
                                 f"training data {self._source.shape}")
            test = np.arange(len(test_source))
        else:
            test_source, test = self._source, np.sort(order[:n_test])
        if stage == "fit" and len(train) < world:
            where = self.path or DEFAULT_FILE
            raise SciMLError(f"data.path: no training rows left in {where}" if world == 1 else
                             f"data.path: {len(train)} training rows in {where}, fewer than the {world} ranks")
        # Training and validation run through DDP's wrapped model, whose collectives need the same number of
        # batches on every rank: equal shards. Test and predict do not (Lightning does not wrap the model there and
        # the metrics sync once per epoch): their shards cover every row exactly once.
        self.splits["train"] = Rows(self._source, shard(train, rank, world, equal=True))
        self.splits["val"] = Rows(self._source, shard(val, rank, world, equal=True))
        self.splits["test"] = Rows(test_source, shard(test, rank, world, equal=False))
        max_rows = shard(train, rank, world, equal=False)  # with the rows cut from the shard: the maxima see all
        if test_source is self._source:
            self._source.load(np.concatenate([max_rows, self.splits["val"].index, self.splits["test"].index]))
        else:
            self._source.load(np.concatenate([max_rows, self.splits["val"].index]))
            test_source.load(self.splits["test"].index)
        if self.channel_max is None and stage == "fit":
            self._set_channel_max(self._global_max(self._source.channel_max(max_rows)))
            log.info("per-channel training maxima: %s", np.round(self.channel_max.numpy(), 3).tolist())
        where = f" (rank {rank} of {world})" if world > 1 else ""
        log.info("HEP data%s: %s", where, ", ".join(f"{k} {len(v)}" for k, v in self.splits.items()))

    def _rank_and_world(self) -> tuple[int, int]:
        """This process's rank and the number of ranks; (0, 1) outside a distributed Trainer."""
        trainer = self.trainer
        if trainer is None or trainer.world_size == 1:
            return 0, 1
        # Lightning's DistributedSampler would split each rank's shard again. (Private attribute: there is no
        # public accessor; without it the check is skipped.)
        if getattr(trainer._accelerator_connector, "use_distributed_sampler", False):
            raise SciMLError("HEPDataModule gives each rank its own shard: build the Trainer with "
                             "use_distributed_sampler=False (sciml does so for modules with shards_by_rank = True)")
        return trainer.global_rank, trainer.world_size

    def _global_max(self, local: np.ndarray) -> np.ndarray:
        """The element-wise maximum of `local` over all ranks (every rank must call it)."""
        if self.trainer is None or self.trainer.world_size == 1:
            return local
        strategy = self.trainer.strategy
        maxima = torch.as_tensor(local, dtype=torch.float32, device=strategy.root_device)
        return strategy.reduce(maxima, reduce_op="max").cpu().numpy()

    def on_after_batch_transfer(self, batch, dataloader_idx):
        if self.channel_max is None:
            raise SciMLError("no channel normalisation: train first, or test from a checkpoint of a trained run")
        scale = torch.where(self.channel_max > 0, 1.0 / self.channel_max, torch.ones_like(self.channel_max))
        batch["x"] = batch["x"] * scale.to(batch["x"].device).view(1, -1, 1, 1)
        return batch

    def state_dict(self):
        return {"channel_max": None if self.channel_max is None else self.channel_max.tolist()}

    def load_state_dict(self, state_dict):
        self._set_channel_max(state_dict.get("channel_max"))

    def save_predictions(self, predictions: dict[str, np.ndarray], directory: Path) -> None:
        """Test-set scores as HDF5, with the row of each event in its source file, in file order (also when the
        ranks of a distributed run predicted interleaved shards)."""
        source = self.splits["test"].source
        order = np.argsort(predictions["index"], kind="stable")
        predictions = {k: v[order] for k, v in predictions.items()}
        index = predictions["index"]
        file_id = np.searchsorted(source.offsets, index, side="right") - 1
        target = directory / "test_scores.h5"
        tmp = target.with_suffix(".h5.tmp")
        with h5py.File(tmp, "w") as h5:
            h5["score"] = predictions["score"][:, 1].astype(np.float32)
            h5["probabilities"] = predictions["score"].astype(np.float32)
            h5["label"] = predictions["label"]
            if "weight" in predictions:
                h5["weight"] = predictions["weight"]
            h5["file_id"] = file_id
            h5["row"] = index - source.offsets[file_id]
            h5.attrs["files"] = [str(f) for f in source.files]
            h5.attrs["score"] = "probability of label 1 (signal)"
        tmp.replace(target)


def _open(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise SciMLError(f"{path}: not a readable HDF5 file ({str(exc).splitlines()[0]})") from None


def _validate(h5: h5py.File, path: Path, channels: int, weight_key: str | None) -> tuple[int, tuple[int, ...]]:
    expected = f"expected 'data' (N, {channels}, H, W), 'label' (N)" + (f", '{weight_key}' (N)" if weight_key else "")
    for key in ("data", "label") + ((weight_key,) if weight_key else ()):
        if key not in h5 or not isinstance(h5[key], h5py.Dataset):
            raise SciMLError(f"{path}: missing dataset '{key}' ({expected})")
    shape = h5["data"].shape
    if len(shape) != 4:
        raise SciMLError(f"{path}: 'data' has shape {shape}, {expected}")
    if shape[1] != channels:
        raise SciMLError(f"{path}: 'data' has {shape[1]} channels, expected {channels} (data.channels)")
    for key in ("label",) + ((weight_key,) if weight_key else ()):
        if h5[key].shape != (shape[0],):
            raise SciMLError(f"{path}: '{key}' has shape {h5[key].shape}, expected ({shape[0]},) to match 'data'")
    if shape[0] == 0:
        raise SciMLError(f"{path}: no events")
    return shape[0], tuple(shape[1:])


def _check_finite(arrays: dict[str, np.ndarray], path: Path, weight_key: str | None) -> None:
    names = {"x": "data", "w": weight_key}
    for key, value in arrays.items():
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            bad = int((~np.isfinite(value)).sum())
            raise SciMLError(f"{path}: {bad} NaN or infinite values in '{names[key]}'")
        if key == "y" and ((value < 0) | (value > 1)).any():
            raise SciMLError(f"{path}: 'label' must be 0 (background) or 1 (signal), found {np.unique(value)[:5]}")
