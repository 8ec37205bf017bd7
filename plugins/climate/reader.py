"""Climate fields in the ClimateNet netCDF layout, read through sciml's data contract: one row is one time step.

Input variables (`variables`, default TMQ, U850, V850, PSL) and `LABELS` (0 background, 1 tropical cyclone,
2 atmospheric river) have dimensions (time, lat, lon) in any order, or (lat, lon) in a file of one time step:
ClimateNet's own files hold one time step each and store `LABELS` as (lat, lon). A file without `LABELS` is
predicted, not scored.

Each file is validated and described once, with xarray (netCDF4 engine), and closed. Rows are read from a handle
kept open per file and process (the core's `Reader.handle` bounds them): h5py for netCDF-4 files, which are HDF5
underneath, netCDF4 for classic ones. A streamed epoch visits files in shuffled chunks and reopens them all the time,
and netCDF4 reads every attribute and dimension at open: 7.3 ms per open of a 160-step file against 0.5 ms for
h5py. The raw values are CF-decoded here as xarray decodes them (`_FillValue`/`missing_value` found, `_Unsigned`,
`scale_factor`/`add_offset` applied in float64), from the encoding xarray read at open, straight into the batch's
float32 array. One read per file, variable, batch and run of time steps (steps that share a file chunk are read
together, so a chunk is decompressed once), with the optional crop (lat/lon box, longitudes wrapping) and integer
down-sampling (block mean for inputs, block majority for labels) applied as the data are read. Predictions are
CF-netCDF on the input's own coordinates (output.py).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import netCDF4
import numpy as np
import xarray as xr

from sciml.data import FileInfo, Reader
from sciml.errors import SciMLError

log = logging.getLogger(__name__)
DEFAULT_DIR = Path(__file__).parent / "data"
GRID = ("lat", "lon")


def _error(path: Path, exc: Exception) -> SciMLError:
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return SciMLError(f"{path}: not a readable netCDF file ({first})")


def _describe(path: Path) -> xr.Dataset:
    """xarray's view of a file, for validation and metadata. Times stay numbers: predictions copy them, with their
    units and calendar, unchanged."""
    try:
        return xr.open_dataset(path, engine="netcdf4", decode_times=False, cache=False)
    except Exception as exc:  # netCDF4 raises OSError, ValueError or its own errors for foreign or broken files
        raise _error(path, exc) from None


def _open(path: Path) -> h5py.File | netCDF4.Dataset:
    """The handle rows are read from: undecoded values, no chunk cache (every file may stay open, and a cache per
    file kept each chunk ever read: 8 GB streamed under a 1 GiB cap were killed by netCDF's; a streamed chunk is
    read once per epoch)."""
    try:
        if h5py.is_hdf5(path):
            return h5py.File(path, "r", rdcc_nbytes=0)
        nc = netCDF4.Dataset(path)  # netCDF-3 classic: no chunks, no cache
        nc.set_auto_maskandscale(False)
        return nc
    except Exception as exc:
        raise _error(path, exc) from None


def _variable(handle: h5py.File | netCDF4.Dataset, name: str):
    if isinstance(handle, netCDF4.Dataset):
        return handle.variables[name]
    # netCDF-4 stores a variable named like a dimension it does not span under another name
    return handle[name] if name in handle else handle[f"_nc4_non_coord_{name}"]


def _encoding(var: xr.DataArray) -> dict:
    """What reading `var` needs: its dimensions, the time steps per file chunk and its CF packing."""
    encoding = var.encoding
    chunks = encoding.get("chunksizes")
    return {"dims": var.dims,
            "time_chunk": int(chunks[var.dims.index("time")]) if chunks and "time" in var.dims else 1,
            "codes": {k: encoding[k] for k in ("_FillValue", "missing_value", "_Unsigned", "scale_factor",
                                               "add_offset") if encoding.get(k) is not None}}


def _runs(rows: np.ndarray, chunk: int) -> list[np.ndarray]:
    """Sorted rows cut where a whole file chunk without a wanted row lies between two of them: each run is read as
    one slice (reading what lies between decompresses no chunk that is not needed anyway)."""
    return np.split(rows, np.flatnonzero(np.diff(rows // chunk) >= 2) + 1)


def _region(index: np.ndarray) -> tuple[slice, np.ndarray | None]:
    """The slice that covers the positions `index` of one dimension and, when they are not that whole range (a
    crop across the longitude seam), the positions to take from what it read."""
    lo, hi = int(index.min()), int(index.max()) + 1
    if len(index) == hi - lo and np.all(np.diff(index) == 1):
        return slice(lo, hi), None
    return slice(lo, hi), index - lo


def _unsigned(codes: dict, raw: np.ndarray) -> np.ndarray:
    """Signed integers that `_Unsigned` marks as unsigned (netCDF-3 has no unsigned types), viewed as such."""
    if str(codes.get("_Unsigned", "")).lower() == "true" and raw.dtype.kind == "i":
        return raw.view(raw.dtype.str.replace("i", "u"))
    return raw


def _missing(codes: dict, raw: np.ndarray) -> np.ndarray | None:
    """Where raw values are `_FillValue` or `missing_value` (None: nowhere), as xarray's CF decoding masks them."""
    bad = None
    for key in ("_FillValue", "missing_value"):
        for value in np.atleast_1d(codes.get(key, [])):
            if raw.dtype.kind in "iu":  # a fill value of an `_Unsigned` variable may be given signed or unsigned
                hit = raw == np.asarray(value).astype(raw.dtype)
            else:
                hit = np.isnan(raw) if np.isnan(value) else raw == value
            bad = hit if bad is None else bad | hit
    return bad


def _decode(codes: dict, raw: np.ndarray, out: np.ndarray) -> None:
    """CF-decode raw values into `out` (float32): scale and offset, computed in float64 as xarray does (in float32,
    an offset of 800 and a scale of 0.05 would round values by 1e-6)."""
    if "scale_factor" not in codes and "add_offset" not in codes:
        np.copyto(out, raw, casting="unsafe")
        return
    values = raw * np.float64(codes.get("scale_factor", 1.0))
    values += np.float64(codes.get("add_offset", 0.0))
    np.copyto(out, values, casting="unsafe")


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
        ds = _describe(path)
        try:
            return self._info(path, ds)
        finally:
            ds.close()

    def _info(self, path: Path, ds: xr.Dataset) -> FileInfo:
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
                "units": str(ds[self.variables[0]].attrs.get("units", "")),
                "encoding": {name: _encoding(ds[name]) for name in self.variables + ([self.labels] if labels else [])}}
        shape = (len(self.variables), len(lat_index) // f, len(lon_index) // f)
        return FileInfo(path, steps, shape, labels, groups={} if days is None else {"day": days}, meta=meta)

    def _coarse_lon(self, lon: np.ndarray) -> np.ndarray:
        f = self.downsample
        if f == 1:
            return lon
        coarse = coarsen_1d(np.rad2deg(np.unwrap(np.deg2rad(lon))), f) % 360.0  # block means across the seam
        return (coarse + 180.0) % 360.0 - 180.0 if lon.min() < 0 else coarse  # keep the input's convention

    # -- reading --------------------------------------------------------------------------------------------------
    def _raw(self, info: FileInfo, name: str, rows: np.ndarray) -> tuple[dict, np.ndarray]:
        """Variable `name` at time steps `rows` on the cropped grid, undecoded but for `_Unsigned`, (len(rows),
        lat, lon), and its CF packing."""
        encoding = info.meta["encoding"][name]
        dims = encoding["dims"]
        var = _variable(self.handle(info.path, _open), name)
        grid = {"lat": _region(info.meta["lat_index"]), "lon": _region(info.meta["lon_index"])}
        try:
            if "time" in dims:
                axis = dims.index("time")

                def span(run: np.ndarray) -> np.ndarray:  # the steps from the run's first to its last, kept: the run
                    block = np.asarray(var[tuple(slice(run[0], run[-1] + 1) if d == "time" else grid[d][0]
                                                 for d in dims)])
                    return block if len(run) == run[-1] - run[0] + 1 else np.take(block, run - run[0], axis=axis)

                parts = [span(run) for run in _runs(rows, encoding["time_chunk"])]
                raw = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=axis)
            else:
                raw = np.asarray(var[tuple(grid[d][0] for d in dims)])
        except Exception as exc:
            raise SciMLError(f"{info.path}: reading '{name}' failed ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
        for axis, dim in enumerate(dims):
            if dim in grid and grid[dim][1] is not None:
                raw = np.take(raw, grid[dim][1], axis=axis)
        raw = raw.transpose([dims.index(d) for d in ("time", *GRID) if d in dims])
        if "time" not in dims:  # a one-time-step file: rows is [0]
            raw = np.broadcast_to(raw, (len(rows), *raw.shape))
        return encoding["codes"], _unsigned(encoding["codes"], raw)

    def read_labels(self, info: FileInfo, rows: np.ndarray) -> np.ndarray:
        codes, y = self._raw(info, self.labels, rows)
        absent = _missing(codes, y)
        if "scale_factor" in codes or "add_offset" in codes:
            decoded = np.empty(y.shape, np.float32)
            _decode(codes, y, decoded)
            y = decoded
        if y.dtype.kind == "f":
            absent = ~np.isfinite(y) if absent is None else absent | ~np.isfinite(y)
        k = len(self.class_names)
        invalid = (y < 0) | (y >= k)
        if y.dtype.kind == "f":
            invalid |= y != np.round(y)
        if absent is not None:
            invalid |= absent
        if invalid.any():
            found = np.unique(y if absent is None else y[~absent])[:8]
            raise SciMLError(f"{info.path}: '{self.labels}' must hold classes 0..{k - 1} "
                             f"({', '.join(f'{i} {n}' for i, n in enumerate(self.class_names))}), found "
                             f"{found.tolist()}" + (" and NaN or missing values" if absent is not None and absent.any()
                                                    else ""))
        # uint8 in memory and between processes (8x less than int64: pixel masks are as large as a channel of
        # inputs); the core makes them int64 on the device
        return block_majority(y.astype(np.int64), self.downsample, k).astype(np.uint8 if k <= 256 else np.int64)

    def read(self, info: FileInfo, rows: np.ndarray) -> dict[str, np.ndarray]:
        x = np.empty((len(rows), len(self.variables), len(info.meta["lat_index"]), len(info.meta["lon_index"])),
                     np.float32)
        for c, name in enumerate(self.variables):
            codes, raw = self._raw(info, name, rows)
            _decode(codes, raw, x[:, c])
            missing = _missing(codes, raw)
            bad = ~np.isfinite(x[:, c]) if missing is None else ~np.isfinite(x[:, c]) | missing
            if bad.any():
                t = int(rows[np.flatnonzero(bad.any(axis=(1, 2)))[0]])
                raise SciMLError(f"{info.path}: NaN, infinite or missing (_FillValue) values in '{name}' "
                                 f"({int(bad.sum())}), first at time index {t}")
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
