"""Climate fields in the ClimateNet netCDF layout, read through sciml's data contract: one row is one time step.

Input variables (`variables`, default TMQ, U850, V850, PSL) and `LABELS` (0 background, 1 tropical cyclone,
2 atmospheric river) have dimensions (time, lat, lon) in any order, or (lat, lon) in a file of one time step:
ClimateNet's own files hold one time step each and store `LABELS` as (lat, lon). A file without `LABELS` is
predicted, not scored.

Files are opened lazily with xarray (netCDF4 engine; xarray's file cache bounds the open handles), once per file and
process. One read per file, variable and batch (or per file and variable for the rows held in memory), with the
optional crop (lat/lon box, longitudes wrapping) and integer down-sampling (block mean for inputs, block majority
for labels) applied as the data are read. Predictions are CF-netCDF on the input's own coordinates (output.py).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import netCDF4
import numpy as np
import xarray as xr

from sciml.data import FileInfo, Reader
from sciml.errors import SciMLError

log = logging.getLogger(__name__)
DEFAULT_DIR = Path(__file__).parent / "data"
GRID = ("lat", "lon")


def _open(path: Path) -> xr.Dataset:
    # No HDF5 chunk cache: every file stays open, and netCDF's default cache (up to 16 MB per variable and open
    # file) kept each chunk ever read: 8 GB of fields streamed under a 1 GiB cap were killed by it. Reads are whole
    # time steps, sorted, so a cached chunk is never read again within an epoch.
    netCDF4.set_chunk_cache(0, 0, 0.75)
    try:  # times stay numbers: predictions copy them, with their units and calendar, unchanged
        return xr.open_dataset(path, engine="netcdf4", decode_times=False, cache=False)
    except Exception as exc:  # netCDF4 raises OSError, ValueError or its own errors for foreign or broken files
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SciMLError(f"{path}: not a readable netCDF file ({first})") from None


def _box(values: np.ndarray, bounds: Sequence[float] | None, name: str, periodic: bool) -> np.ndarray:
    """Indices of coordinate `values` inside [lo, hi] (for longitudes modulo 360, so [300, 30] wraps)."""
    if bounds is None:
        return np.arange(len(values))
    lo, hi = map(float, bounds)
    if periodic:
        index = np.flatnonzero((values - lo) % 360.0 <= (hi - lo) % 360.0)
        if len(index) and not np.all(np.diff(index) == 1):  # a box across the seam: east part after west part
            cut = np.flatnonzero(np.diff(index) > 1)[0] + 1
            index = np.concatenate([index[cut:], index[:cut]])
        return index
    return np.flatnonzero((values >= lo) & (values <= hi))


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


def _days(time: xr.DataArray) -> np.ndarray | None:
    """The calendar day of each time value (group key `day`), None when the times cannot be decoded."""
    try:
        import cftime

        dates = cftime.num2date(np.atleast_1d(time.values), time.attrs["units"], time.attrs.get("calendar",
                                                                                                "standard"))
        return np.array([d.strftime("%Y-%m-%d") for d in dates])
    except Exception:  # no units, or units cftime does not know: no day groups for this file
        return None


@dataclass
class ClimateNetReader(Reader):
    """Options (`data.KEY=`):
        variables: input variables, in channel order.
        labels: the label variable (classes 0..len(class_names)-1); files without it are predicted, not scored.
        class_names: names of the classes (prediction variables PROB_TC, PROB_AR, flag meanings).
        crop: {lat: [min, max], lon: [min, max]} in degrees, or null; longitudes wrap ([300, 30] is allowed).
        downsample: integer factor; block mean for inputs, block majority for labels.
        num_maps: PNG maps of truth vs prediction written with the predictions (the time steps with most events).
    Group keys for `data.group_by`: `file` (the core's) and `day` (the calendar day, when the times decode).
    """

    variables: Sequence[str] = ("TMQ", "U850", "V850", "PSL")
    labels: str | None = "LABELS"
    class_names: Sequence[str] = ("background", "tc", "ar")
    crop: Mapping | None = None
    downsample: int = 1
    num_maps: int = 4

    patterns = ("*.nc", "*.nc4", "*.netcdf")
    fixed_dims = 1  # a fully convolutional network: test and predicted files may have another grid

    def __post_init__(self):
        self.variables = [str(v) for v in self.variables]
        self.class_names = [str(c).lower() for c in self.class_names]
        if not self.variables:
            raise SciMLError("data.variables is empty; expected input variable names such as [TMQ, U850, V850, PSL]")
        self.crop = dict(self.crop or {})
        unknown = set(self.crop) - set(GRID)
        if unknown:
            raise SciMLError(f"data.crop: unknown keys {sorted(unknown)}; expected lat: [min, max], lon: [min, max]")
        for name, bounds in self.crop.items():
            if bounds is not None and (len(bounds) != 2 or (name == "lat" and bounds[0] > bounds[1])):
                raise SciMLError(f"data.crop.{name} must be [min, max], got {list(bounds)}")
        if isinstance(self.downsample, bool) or not isinstance(self.downsample, int) or self.downsample < 1:
            raise SciMLError(f"data.downsample must be an integer >= 1, got {self.downsample}")
        self._maps: list[tuple[int, Path]] = []  # the maps written so far, (event pixels, path), best first

    def default_path(self):
        return DEFAULT_DIR

    # -- opening and validating -----------------------------------------------------------------------------------
    def open(self, path: Path) -> FileInfo:
        ds = self.handle(path, _open)
        for coord in GRID:
            if coord not in ds.variables or ds[coord].dims != (coord,):
                raise SciMLError(f"{path}: no 1-D '{coord}' coordinate; expected dimensions (time, lat, lon) as in "
                                 "ClimateNet")
        has_time = "time" in ds.dims
        steps = ds.sizes["time"] if has_time else 1
        if steps == 0:
            raise SciMLError(f"{path}: no time steps")
        for name in self.variables:
            if name not in ds:
                found = ", ".join(sorted(map(str, ds.data_vars))) or "none"
                raise SciMLError(f"{path}: missing variable '{name}' (data.variables = {self.variables}); "
                                 f"variables in the file: {found}")
        labels = self.labels is not None and self.labels in ds
        for name in self.variables + ([self.labels] if labels else []):
            dims = ds[name].dims
            if set(dims) == set(GRID) and len(dims) == 2:
                if steps > 1:  # which time step would a 2-D field belong to?
                    raise SciMLError(f"{path}: variable '{name}' has dimensions {dims} but the file has {steps} time "
                                     "steps; (lat, lon) variables are allowed in one-time-step files only")
            elif set(dims) != {"time", *GRID} or len(dims) != 3:
                raise SciMLError(f"{path}: variable '{name}' has dimensions {dims}, expected (time, lat, lon) or "
                                 "(lat, lon)")
        lat_index = _box(ds["lat"].values, self.crop.get("lat"), "lat", periodic=False)
        lon_index = _box(ds["lon"].values, self.crop.get("lon"), "lon", periodic=True)
        f = self.downsample
        if len(lat_index) < f or len(lon_index) < f:
            raise SciMLError(f"{path}: data.crop {self.crop} leaves {len(lat_index)} x {len(lon_index)} grid points "
                             f"(data.downsample {f})")
        time = ds["time"] if "time" in ds.variables else None
        days = _days(time) if time is not None else None
        meta = {"lat_index": lat_index, "lon_index": lon_index, "has_time": has_time,
                "lat": coarsen_1d(ds["lat"].values[lat_index], f), "lon": self._coarse_lon(ds["lon"].values[lon_index]),
                "lat_attrs": dict(ds["lat"].attrs), "lon_attrs": dict(ds["lon"].attrs),
                "time": None if time is None else np.atleast_1d(time.values),
                "time_attrs": {} if time is None else dict(time.attrs),
                "units": str(ds[self.variables[0]].attrs.get("units", ""))}
        shape = (len(self.variables), len(lat_index) // f, len(lon_index) // f)
        return FileInfo(path, steps, shape, labels, groups={} if days is None else {"day": days}, meta=meta)

    def _coarse_lon(self, lon: np.ndarray) -> np.ndarray:
        f = self.downsample
        if f == 1:
            return lon
        coarse = coarsen_1d(np.rad2deg(np.unwrap(np.deg2rad(lon))), f) % 360.0  # block means across the seam
        return (coarse + 180.0) % 360.0 - 180.0 if lon.min() < 0 else coarse  # keep the input's convention

    # -- reading --------------------------------------------------------------------------------------------------
    def _field(self, info: FileInfo, name: str, rows: np.ndarray) -> np.ndarray:
        """Variable `name` at time steps `rows` on the cropped grid, (len(rows), lat, lon): one outer-indexed read."""
        # the bare Variable: a DataArray's isel re-indexes its coordinates on every read (a third of the read time)
        var = self.handle(info.path, _open).variables[name]
        where = {"lat": info.meta["lat_index"], "lon": info.meta["lon_index"]}
        try:
            if "time" in var.dims:
                return var.isel(time=rows, **where).transpose("time", *GRID).values
            field = var.isel(where).transpose(*GRID).values  # a one-time-step file: rows is [0]
            return np.broadcast_to(field, (len(rows), *field.shape))
        except Exception as exc:
            raise SciMLError(f"{info.path}: reading '{name}' failed ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''})") from None

    def read_labels(self, info: FileInfo, rows: np.ndarray) -> np.ndarray:
        y = self._field(info, self.labels, rows)
        k = len(self.class_names)
        if not np.isfinite(y).all() or ((y < 0) | (y >= k) | (y != np.round(y))).any():
            found = np.unique(y[np.isfinite(y)])[:8]
            raise SciMLError(f"{info.path}: '{self.labels}' must hold classes 0..{k - 1} "
                             f"({', '.join(f'{i} {n}' for i, n in enumerate(self.class_names))}), found "
                             f"{found.tolist()}" + (" and NaN" if not np.isfinite(y).all() else ""))
        # uint8 in memory and between processes (8x less than int64: pixel masks are as large as a channel of
        # inputs); the core makes them int64 on the device
        return block_majority(y.astype(np.int64), self.downsample, k).astype(np.uint8 if k <= 256 else np.int64)

    def read(self, info: FileInfo, rows: np.ndarray) -> dict[str, np.ndarray]:
        x = np.stack([self._field(info, v, rows).astype(np.float32) for v in self.variables], 1)
        bad = ~np.isfinite(x)
        if bad.any():
            counts = bad.sum(axis=(0, 2, 3))
            which = ", ".join(f"'{v}' ({int(c)})" for v, c in zip(self.variables, counts) if c)
            t = int(rows[np.flatnonzero(bad.any(axis=(1, 2, 3)))[0]])
            raise SciMLError(f"{info.path}: NaN, infinite or missing (_FillValue) values in {which}, first at time "
                             f"index {t}")
        out = {"x": block_mean(x, self.downsample)}
        if info.labels:
            out["y"] = self.read_labels(info, rows)
        return out

    # -- predictions ----------------------------------------------------------------------------------------------
    def write(self, info: FileInfo, rows: np.ndarray, outputs: dict[str, np.ndarray], directory: Path
              ) -> list[Path]:
        from sciml_plugins.climate.output import write_maps, write_netcdf

        truth = self.read_labels(info, rows) if info.labels else None
        stems = self.__dict__.setdefault("_stems", {})  # output stem -> input (two inputs of one name)
        stem = info.path.stem
        if stems.setdefault(stem, info.path) != info.path:
            stem = f"{stem}_{len(stems)}"
            stems[stem] = info.path
        target = write_netcdf(info, rows, outputs, truth, self.class_names, directory, self.downsample, stem)
        if self.num_maps > 0:
            self._maps = write_maps(self, info, rows, outputs["label"], truth, directory.parent / "plots",
                                    self._maps)
        return [target]
