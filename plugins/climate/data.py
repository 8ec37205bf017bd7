"""Climate fields in the ClimateNet netCDF layout: variables with dimensions (time, lat, lon) such as TMQ, U850, V850,
PSL, and `LABELS` (0 background, 1 tropical cyclone, 2 atmospheric river). One file, a folder or a glob.

Files are opened lazily with xarray (netCDF4 engine), one handle per file and a global time index over all of them;
nothing is read until needed. The rows a split needs are read into memory when they fit in `max_memory_gb` (one read
per file and variable), otherwise batch by batch (one read per file and variable per batch). Optional crop (lat/lon
box) and integer down-sampling (block mean for inputs, block majority for labels) are applied as the data are read.

Per-variable mean and standard deviation are computed once on the training rows and applied on the device after
transfer; they are part of the datamodule's state, so checkpoints carry them and a test-only run
(`train=false ckpt_path=...`) normalises a new file exactly as in training.

Predictions are written as CF-netCDF on the input's own coordinates (one file per input file: `LABELS_PRED`,
`PROB_<CLASS>`, and the truth `LABELS` when the input has it) plus PNG maps of truth vs prediction on lat/lon axes.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import xarray as xr
from torch.utils.data import Dataset

from sciml.data import SplitDataModule, find_files
from sciml.errors import SciMLError

log = logging.getLogger(__name__)
DEFAULT_DIR = Path(__file__).parent / "data"
SUFFIXES = (".nc", ".nc4", ".netcdf")
DIMS = ("time", "lat", "lon")


def resolve_files(path: str | Path | None, key: str = "data.path") -> list[Path]:
    """A file, a folder of netCDF files, or a glob; None means the embedded default sample."""
    if path is None:
        files = sorted(DEFAULT_DIR.glob("*.nc"))
        if not files:
            raise SciMLError(f"{key}: the embedded default sample is missing from {DEFAULT_DIR}")
        return files
    return find_files(path, tuple(f"*{suffix}" for suffix in SUFFIXES), key)


def _open(path: Path) -> xr.Dataset:
    try:  # times stay numbers: predictions copy them, with their units and calendar, unchanged
        return xr.open_dataset(path, engine="netcdf4", decode_times=False, cache=False)
    except Exception as exc:  # netCDF4 raises OSError, ValueError or its own errors for foreign or broken files
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SciMLError(f"{path}: not a readable netCDF file ({first})") from None


def _box(values: np.ndarray, bounds: Sequence[float] | None, name: str, periodic: bool) -> np.ndarray:
    """Indices of coordinate `values` inside [lo, hi] (for longitudes modulo 360, so [300, 30] wraps)."""
    if bounds is None:
        return np.arange(len(values))
    if len(bounds) != 2:
        raise SciMLError(f"data.crop.{name} must be [min, max], got {list(bounds)}")
    lo, hi = map(float, bounds)
    if periodic:
        inside = (values - lo) % 360.0 <= (hi - lo) % 360.0
        index = np.flatnonzero(inside)
        if len(index) and not np.all(np.diff(index) == 1):  # a box across the seam: east part after west part
            split = np.flatnonzero(np.diff(index) > 1)[0] + 1
            index = np.concatenate([index[split:], index[:split]])
    else:
        if lo > hi:
            raise SciMLError(f"data.crop.{name}: min {lo} > max {hi}")
        index = np.flatnonzero((values >= lo) & (values <= hi))
    return index


def block_mean(a: np.ndarray, f: int) -> np.ndarray:
    """(..., H, W) -> (..., H // f, W // f), trailing rows/columns that do not fill a block dropped."""
    if f == 1:
        return a
    h, w = a.shape[-2] // f * f, a.shape[-1] // f * f
    a = a[..., :h, :w]
    return a.reshape(*a.shape[:-2], h // f, f, w // f, f).mean(axis=(-3, -1))


def coarsen_1d(values: np.ndarray, f: int) -> np.ndarray:
    """Block means of a coordinate, matching `block_mean` of the fields."""
    n = len(values) // f * f
    return values[:n].reshape(-1, f).mean(axis=1) if f > 1 else values


def block_majority(labels: np.ndarray, f: int, num_classes: int) -> np.ndarray:
    """The most frequent class in each f x f block (ties to the rarer, higher class: events are not erased)."""
    if f == 1:
        return labels
    onehot = np.stack([labels == k for k in range(num_classes)], axis=-3).astype(np.float32)
    counts = block_mean(onehot, f) + np.arange(num_classes, dtype=np.float32)[:, None, None] * 1e-3
    return counts.argmax(axis=-3)


class NetCDFFields:
    """The time steps of one or more netCDF files as one indexable source, validated on open.

    All files must share the grid (after crop and down-sampling). `read(index)` returns `x` (B, C, H, W) float32,
    `y` (B, H, W) int64 (when the files have labels) and `index`.
    """

    def __init__(self, files: list[Path], variables: Sequence[str], num_classes: int, labels: str | None = "LABELS",
                 crop: Mapping | None = None, downsample: int = 1, max_memory_gb: float = 4.0):
        self.files, self.variables, self.num_classes = files, list(variables), num_classes
        self.downsample, self.max_memory_gb = int(downsample), max_memory_gb
        if self.downsample < 1:
            raise SciMLError(f"data.downsample must be an integer >= 1, got {downsample}")
        crop = dict(crop or {})
        unknown = set(crop) - {"lat", "lon"}
        if unknown:
            raise SciMLError(f"data.crop: unknown keys {sorted(unknown)}; expected lat: [min, max], lon: [min, max]")
        self.datasets, counts, first = [], [], None
        for path in files:
            ds = _open(path)
            self._validate(ds, path, labels)
            grid = (ds["lat"].values, ds["lon"].values)
            if first is None:
                first = (path, grid)
                self.lat_index = _box(grid[0], crop.get("lat"), "lat", periodic=False)
                self.lon_index = _box(grid[1], crop.get("lon"), "lon", periodic=True)
                if len(self.lat_index) < self.downsample or len(self.lon_index) < self.downsample:
                    raise SciMLError(f"{path}: data.crop {crop} leaves {len(self.lat_index)} x "
                                     f"{len(self.lon_index)} grid points (downsample {self.downsample})")
            elif any(a.shape != b.shape or not np.allclose(a, b) for a, b in zip(grid, first[1])):
                raise SciMLError(f"{path}: lat/lon grid {tuple(map(len, grid))} differs from that of {first[0]} "
                                 f"{tuple(map(len, first[1]))}; files read together must share one grid")
            counts.append(ds.sizes["time"])
            self.datasets.append(ds)
        self.has_labels = labels is not None and all(labels in ds for ds in self.datasets)
        self.labels = labels
        self.offsets = np.concatenate([[0], np.cumsum(counts)])
        f = self.downsample
        lat, lon = self.datasets[0]["lat"].values, self.datasets[0]["lon"].values
        self.lat = coarsen_1d(lat[self.lat_index], f)
        unwrapped = np.rad2deg(np.unwrap(np.deg2rad(lon[self.lon_index])))  # block means across the seam
        self.lon = coarsen_1d(unwrapped, f) % 360.0
        if lon.min() < 0:  # keep the input's convention (-180..180)
            self.lon = (self.lon + 180.0) % 360.0 - 180.0
        if f == 1:
            self.lon = lon[self.lon_index]
        self.shape = (len(self.variables), len(self.lat_index) // f, len(self.lon_index) // f)
        self._rows: np.ndarray | None = None
        self._arrays: dict[str, np.ndarray] | None = None

    def _validate(self, ds: xr.Dataset, path: Path, labels: str | None) -> None:
        for coord in ("lat", "lon"):
            if coord not in ds.variables:
                raise SciMLError(f"{path}: no '{coord}' coordinate; expected dimensions (time, lat, lon) as in "
                                 "ClimateNet")
        names = self.variables + ([labels] if labels and labels in ds else [])
        for name in self.variables:
            if name not in ds:
                found = ", ".join(sorted(v for v in ds.data_vars)) or "none"
                raise SciMLError(f"{path}: missing variable '{name}' (data.variables = {self.variables}); "
                                 f"variables in the file: {found}")
        for name in names:
            dims = ds[name].dims
            if set(dims) != set(DIMS) or len(dims) != 3:
                raise SciMLError(f"{path}: variable '{name}' has dimensions {dims}, expected (time, lat, lon)")
        if ds.sizes["time"] == 0:
            raise SciMLError(f"{path}: no time steps")

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def nbytes(self) -> int:
        return len(self) * int(np.prod(self.shape)) * 4

    def _read_file(self, file_id: int, local: np.ndarray) -> dict[str, np.ndarray]:
        """Time steps `local` (sorted) of one file: one outer-indexed read per variable, then checks."""
        ds, path = self.datasets[file_id], self.files[file_id]
        where = {"time": local, "lat": self.lat_index, "lon": self.lon_index}
        try:
            x = np.stack([ds[v].isel(where).transpose(*DIMS).values.astype(np.float32) for v in self.variables], 1)
            y = ds[self.labels].isel(where).transpose(*DIMS).values if self.has_labels else None
        except SciMLError:
            raise
        except Exception as exc:
            raise SciMLError(f"{path}: read failed ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
        bad = ~np.isfinite(x)
        if bad.any():
            counts = bad.sum(axis=(0, 2, 3))
            which = ", ".join(f"'{v}' ({int(c)})" for v, c in zip(self.variables, counts) if c)
            t = int(local[np.flatnonzero(bad.any(axis=(1, 2, 3)))[0]])
            raise SciMLError(f"{path}: NaN, infinite or missing (_FillValue) values in {which}, first at time "
                             f"index {t}")
        out = {"x": block_mean(x, self.downsample)}
        if y is not None:
            if not np.isfinite(y).all() or ((y < 0) | (y >= self.num_classes) | (y != np.round(y))).any():
                found = np.unique(y[np.isfinite(y)])[:8]
                raise SciMLError(f"{path}: '{self.labels}' must hold classes 0..{self.num_classes - 1} "
                                 f"(0 background, 1 TC, 2 AR), found {found.tolist()}"
                                 + (" and NaN" if not np.isfinite(y).all() else ""))
            out["y"] = block_majority(y.astype(np.int64), self.downsample, self.num_classes).astype(np.int64)
        return out

    def _read_sorted(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        which = np.searchsorted(self.offsets, rows, side="right") - 1
        parts = [self._read_file(int(f), rows[which == f] - self.offsets[f]) for f in np.unique(which)]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def load(self, rows: np.ndarray) -> bool:
        """Keep `rows` in memory when they fit in `max_memory_gb`; otherwise reads stay lazy. Returns which."""
        rows = np.unique(rows)
        if len(rows) == 0 or len(rows) * np.prod(self.shape) * 4 > self.max_memory_gb * 2**30:
            return False
        self._rows, self._arrays = rows, self._read_sorted(rows)
        return True

    @property
    def in_memory(self) -> bool:
        return self._rows is not None

    def read(self, index: np.ndarray) -> dict[str, np.ndarray]:
        """Rows at global `index` (any order), in that order."""
        index = np.asarray(index)
        if self._rows is not None and np.isin(index, self._rows).all():
            batch = {k: v[np.searchsorted(self._rows, index)] for k, v in self._arrays.items()}
        else:
            order = np.argsort(index, kind="stable")
            sorted_batch = self._read_sorted(index[order])
            inverse = np.empty_like(order)
            inverse[order] = np.arange(len(order))
            batch = {k: v[inverse] for k, v in sorted_batch.items()}
        batch["index"] = index
        return batch

    def moments(self, rows: np.ndarray, block: int = 64) -> tuple[np.ndarray, np.ndarray]:
        """Per-variable mean and standard deviation over `rows`, in blocks (bounded memory), in float64."""
        total = np.zeros(self.shape[0])
        total_sq = np.zeros(self.shape[0])
        count = 0
        rows = np.sort(rows)
        for start in range(0, len(rows), block):
            x = self.read(rows[start:start + block])["x"].astype(np.float64)
            total += x.sum(axis=(0, 2, 3))
            total_sq += (x**2).sum(axis=(0, 2, 3))
            count += x.shape[0] * x.shape[2] * x.shape[3]
        mean = total / count
        return mean, np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))

    def class_counts(self, rows: np.ndarray, block: int = 256) -> np.ndarray:
        counts = np.zeros(self.num_classes)
        rows = np.sort(rows)
        for start in range(0, len(rows), block):
            counts += np.bincount(self.read(rows[start:start + block])["y"].ravel(), minlength=self.num_classes)
        return counts

    def locate(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(file id, time index within the file) of global rows."""
        file_id = np.searchsorted(self.offsets, index, side="right") - 1
        return file_id, index - self.offsets[file_id]

    def close(self) -> None:
        for ds in self.datasets:
            ds.close()


class Rows(Dataset):
    """A split of a `NetCDFFields` source; `__getitems__` reads a whole batch at once. `labeled` (per row) marks the
    rows whose labels may be used (semi-supervised training)."""

    def __init__(self, source: NetCDFFields, index: np.ndarray, labeled: np.ndarray | None = None):
        self.source, self.index, self.labeled = source, np.asarray(index), labeled

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i):
        return self.__getitems__([i])

    def __getitems__(self, positions):
        positions = np.asarray(positions)
        batch = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in
                 self.source.read(self.index[positions]).items()}
        if self.labeled is not None:
            batch["labeled"] = torch.from_numpy(self.labeled[positions])
        if "y" not in batch:  # files without labels: predicted, never scored
            batch["y"] = torch.zeros((len(positions), *self.source.shape[1:]), dtype=torch.int64)
            batch["labeled"] = torch.zeros(len(positions), dtype=torch.bool)
        return batch


class ClimateDataModule(SplitDataModule):
    """Extreme-weather segmentation data (ClimateNet layout).

    Args:
        path: netCDF file, folder or glob; None = the embedded default sample.
        test_path: files that replace the test split (their own grid is kept; a trained run predicts them with
            `train=false ckpt_path=...`). When set, `path` is split into training and validation only.
        variables: input variables, in channel order.
        labels: the label variable (classes 0..num_classes-1).
        class_names: names of the classes, for the prediction variables (PROB_TC, PROB_AR).
        crop: {lat: [min, max], lon: [min, max]} in degrees, or null; longitudes wrap ([300, 30] is allowed).
        downsample: integer factor; block mean for inputs, block majority for labels.
        labeled_fraction: fraction of the training rows whose labels are used (seeded choice).
        unlabeled: what the other training rows do: `reconstruct` (semi-supervised: they feed the auto-encoder
            loss only; the labelled rows are repeated to match their number) or `drop` (supervised on the
            labelled fraction alone).
        batch_size, num_workers: per device.
        val_fraction, test_fraction, split_seed: random split of the time steps of `path`.
        max_memory_gb: a split larger than this is read batch by batch instead of held in memory.
        num_maps: PNG maps of truth vs prediction written after prediction.
    """

    def __init__(self, path: str | None = None, test_path: str | None = None,
                 variables: Sequence[str] = ("TMQ", "U850", "V850", "PSL"), labels: str = "LABELS",
                 class_names: Sequence[str] = ("background", "tc", "ar"), crop: Mapping | None = None,
                 downsample: int = 1, labeled_fraction: float = 1.0, unlabeled: str = "reconstruct",
                 batch_size: int = 16, num_workers: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.15,
                 split_seed: int = 0, max_memory_gb: float = 4.0, num_maps: int = 4):
        super().__init__()
        if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
            raise SciMLError(f"data.val_fraction={val_fraction}, data.test_fraction={test_fraction}: "
                             "each in [0, 1) and together below 1")
        if not 0 < labeled_fraction <= 1:
            raise SciMLError(f"data.labeled_fraction must be in (0, 1], got {labeled_fraction}")
        if unlabeled not in ("reconstruct", "drop"):
            raise SciMLError(f"data.unlabeled must be 'reconstruct' or 'drop', got '{unlabeled}'")
        if batch_size < 1:
            raise SciMLError(f"data.batch_size must be >= 1, got {batch_size}")
        if not variables:
            raise SciMLError("data.variables is empty; expected input variable names such as [TMQ, U850, V850, PSL]")
        self.path, self.test_path = path, test_path
        self.variables, self.labels = list(variables), labels
        self.class_names = [str(c) for c in class_names]
        self.crop, self.downsample = crop, downsample
        self.labeled_fraction, self.unlabeled = float(labeled_fraction), unlabeled
        self.batch_size, self.num_workers = batch_size, num_workers
        self.val_fraction, self.test_fraction = val_fraction, 0.0 if test_path else test_fraction
        self.split_seed, self.max_memory_gb, self.num_maps = split_seed, max_memory_gb, num_maps
        self.splits: dict[str, Rows] = {}
        self._source: NetCDFFields | None = None
        self._frequencies: np.ndarray | None = None
        self.mean: torch.Tensor | None = None
        self.std: torch.Tensor | None = None

    def _fields(self, path, key: str) -> NetCDFFields:
        return NetCDFFields(resolve_files(path, key), self.variables, len(self.class_names), self.labels, self.crop,
                            self.downsample, self.max_memory_gb)

    @property
    def input_shape(self) -> tuple[int, ...] | None:
        split = self.splits["train"] if "train" in self.splits else self.splits.get("test")
        return None if split is None else split.source.shape

    def setup(self, stage: str) -> None:
        """Open the files and split the time steps (seeded). Fitting also computes the normalisation statistics and
        class frequencies on the training rows. A test-only run with `test_path` opens only the test files."""
        if stage == "fit" or not self.test_path:
            self._setup_path()
        if "test" not in self.splits and self.test_path:
            test = self._fields(self.test_path, "data.test_path")
            if not test.has_labels:
                log.warning("data.test_path: no '%s' variable in %s: predictions only, no test metrics",
                            self.labels, ", ".join(str(f) for f, ds in zip(test.files, test.datasets)
                                                   if self.labels not in ds))
            test.load(np.arange(len(test)))
            self.splits["test"] = Rows(test, np.arange(len(test)))
            log.info("test files: %s (grid %d x %d)", ", ".join(map(str, test.files)), *test.shape[1:])
        if stage == "fit" and self.mean is None:
            train = self.splits["train"]
            mean, std = train.source.moments(self._stat_rows)
            self._set_stats(mean, std)
            log.info("normalisation (training rows): %s", ", ".join(
                f"{v} {m:.4g}±{s:.3g}" for v, m, s in zip(self.variables, mean, std)))

    def _setup_path(self) -> None:
        if self._source is not None:
            return
        source = self._fields(self.path, "data.path")
        if not source.has_labels:
            raise SciMLError(f"data.path: {source.files[0]} has no '{self.labels}' variable (data.labels); "
                             "training needs labels")
        n = len(source)
        order = np.random.default_rng(self.split_seed).permutation(n)
        n_test, n_val = int(round(self.test_fraction * n)), int(round(self.val_fraction * n))
        train, val, test = (np.sort(order[n_test + n_val:]), np.sort(order[n_test:n_test + n_val]),
                            np.sort(order[:n_test]))
        if len(train) == 0:
            raise SciMLError(f"data.path: no training time steps left in {source.files[0]} ({n} steps in all)")
        n_labeled = max(1, int(round(self.labeled_fraction * len(train))))
        labeled = np.zeros(len(train), dtype=bool)
        labeled[np.random.default_rng([self.split_seed, 1]).permutation(len(train))[:n_labeled]] = True
        self._stat_rows = train  # inputs need no labels: statistics use every training row
        self._label_rows = train[labeled]
        if self.labeled_fraction < 1 and self.unlabeled == "drop":
            self.splits["train"] = Rows(source, train[labeled])
        elif self.labeled_fraction < 1:
            # the few labelled rows are repeated to balance the unlabelled ones, so that a typical batch holds
            # both and the segmentation head is not starved (every unlabelled row is still seen once per epoch)
            repeats = max(1, int(round((~labeled).sum() / labeled.sum())))
            index = np.concatenate([train[~labeled], np.repeat(train[labeled], repeats)])
            flags = np.concatenate([np.zeros((~labeled).sum(), bool), np.ones(labeled.sum() * repeats, bool)])
            self.splits["train"] = Rows(source, index, flags)
        else:
            self.splits["train"] = Rows(source, train)
        self.splits["val"] = Rows(source, val)
        if not self.test_path:
            self.splits["test"] = Rows(source, test)
        source.load(np.concatenate([train, val, test if not self.test_path else []]).astype(int))
        self._source = source
        where = "in memory" if source.in_memory else "read per batch"
        log.info("climate data: %d files, %d time steps, grid %d x %d, %s; train %d (%d labelled), val %d, test %s",
                 len(source.files), n, *source.shape[1:], where, len(train), n_labeled, len(val),
                 "from data.test_path" if self.test_path else len(test))

    def class_frequencies(self) -> np.ndarray:
        """Pixel counts per class over the labelled training rows (for inverse-frequency class weights)."""
        if self._frequencies is None:
            self._frequencies = self._source.class_counts(self._label_rows)
            log.info("training pixel fractions: %s", ", ".join(
                f"{n} {f:.4f}" for n, f in zip(self.class_names, self._frequencies / self._frequencies.sum())))
        return self._frequencies

    def _set_stats(self, mean, std) -> None:
        self.mean = torch.as_tensor(np.asarray(mean), dtype=torch.float32)
        std = torch.as_tensor(np.asarray(std), dtype=torch.float32)
        self.std = torch.where(std > 0, std, torch.ones_like(std))  # a constant variable is only centred

    def on_after_batch_transfer(self, batch, dataloader_idx):
        if self.mean is None:
            raise SciMLError("no normalisation statistics: train first, or test from a checkpoint of a trained run")
        shape = (1, -1, 1, 1)
        batch["x"] = (batch["x"] - self.mean.to(batch["x"].device).view(shape)) / \
            self.std.to(batch["x"].device).view(shape)
        return batch

    def state_dict(self):
        return {"variables": self.variables,
                "mean": None if self.mean is None else self.mean.tolist(),
                "std": None if self.std is None else self.std.tolist()}

    def load_state_dict(self, state_dict):
        if state_dict.get("mean") is None:
            return
        trained = list(state_dict.get("variables", []))
        if trained != self.variables:
            raise SciMLError(f"the checkpoint was trained on variables {trained}, but data.variables is "
                             f"{self.variables}")
        self._set_stats(state_dict["mean"], state_dict["std"])

    def save_predictions(self, predictions: dict[str, np.ndarray], directory: Path) -> None:
        from sciml_plugins.climate.output import write_maps, write_netcdf

        source = self.splits["test"].source
        order = np.argsort(predictions["index"], kind="stable")
        predictions = {k: v[order] for k, v in predictions.items()}
        written = write_netcdf(source, predictions, self.class_names, directory)
        maps = write_maps(source, predictions, self.class_names, directory.parent / "plots", self.num_maps)
        log.info("predictions: %s; maps: %s", ", ".join(p.name for p in written), ", ".join(p.name for p in maps))
