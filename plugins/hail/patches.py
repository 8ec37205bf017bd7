"""Reader for storm-centred patch files in the layout of the NCAR/AMS storm-patch data (Gagne et al. 2019): netCDF
with a patch dimension `p` and grid dimensions `row`, `col`; input fields such as `REFL_COM_curr`, `T2_curr`,
`U10_curr`, `V10_curr`; a target such as `HAIL_MAXK1_future`, either one value per patch (p) or a field
(p, row, col) reduced to its patch maximum. Usually one file per run day.

Target units are converted to millimetres from the variable's `units` attribute (m, cm, mm, in); a file without
one needs `data.target_units`. Every file is opened once and read whole (xarray, CF-decoded).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr

from sciml.data import find_files
from sciml.errors import SciMLError

DEFAULT_DIR = Path(__file__).parent / "data" / "patches"
TO_MM = {"m": 1000.0, "meter": 1000.0, "meters": 1000.0, "metre": 1000.0, "metres": 1000.0, "cm": 10.0,
         "mm": 1.0, "millimeter": 1.0, "millimeters": 1.0, "in": 25.4, "inch": 25.4, "inches": 25.4}


@dataclass
class Patches:
    """Patches of one or more files: `x` (p, variables, row, col) float32, `size_mm` (p,), `day` (p,) run day as
    'YYYY-MM-DD' (or 'file:NAME' for files without `run_date`), `file_id` (p,) and `row_in_file` (p,) to trace every patch back."""

    x: np.ndarray
    size_mm: np.ndarray
    day: np.ndarray
    file_id: np.ndarray
    row_in_file: np.ndarray
    files: list[Path]
    variables: list[str]
    meta: dict[str, np.ndarray]


def resolve_patch_files(path: str | Path | None, key: str = "data.path") -> list[Path]:
    """A netCDF file, a folder of .nc files, or a glob; None means the embedded simulated sample."""
    return find_files(DEFAULT_DIR if path is None else path, ("*.nc",), key)


def _to_mm(var: xr.DataArray, path: Path, name: str, target_units: str | None) -> float:
    units = target_units or var.attrs.get("units")
    if units is None:
        raise SciMLError(f"{path}: variable '{name}' has no 'units' attribute; set data.target_units "
                         f"(one of {', '.join(sorted(set(TO_MM)))})")
    factor = TO_MM.get(str(units).strip().lower())
    if factor is None:
        raise SciMLError(f"{path}: variable '{name}' has units '{units}', expected a length "
                         f"({', '.join(sorted(set(TO_MM)))})")
    return factor


def read_file(path: Path, variables: list[str], target: str, target_units: str | None = None,
              day_variable: str = "run_date") -> dict[str, np.ndarray]:
    """One file's inputs, target (mm), run days and per-patch metadata, checked variable by variable."""
    try:
        ds = xr.open_dataset(path, engine="netcdf4")
    except (OSError, ValueError) as exc:
        raise SciMLError(f"{path}: not a readable netCDF file ({str(exc).splitlines()[0]})") from None
    with ds:
        missing = [v for v in [*variables, target] if v not in ds.variables]
        if missing:
            raise SciMLError(f"{path}: missing variable(s) {', '.join(missing)}; the file has "
                             f"{', '.join(sorted(str(v) for v in ds.data_vars))}")
        arrays = []
        for name in variables:
            var = ds[name]
            if var.dims != ("p", "row", "col"):
                raise SciMLError(f"{path}: variable '{name}' has dimensions {var.dims}, expected ('p', 'row', 'col')")
            arrays.append(var.to_numpy().astype(np.float32, copy=False))
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise SciMLError(f"{path}: input variables differ in shape: {sorted(shapes)}")
        x = np.stack(arrays, axis=1)
        for name, a in zip(variables, arrays):
            bad = int((~np.isfinite(a)).sum())
            if bad:
                raise SciMLError(f"{path}: {bad} NaN, missing or infinite value(s) in variable '{name}'")
        var = ds[target]
        if var.dims not in (("p",), ("p", "row", "col")):
            raise SciMLError(f"{path}: target '{target}' has dimensions {var.dims}, expected ('p',) or "
                             "('p', 'row', 'col')")
        values = var.to_numpy().astype(np.float64)
        if not np.isfinite(values).all():
            raise SciMLError(f"{path}: {int((~np.isfinite(values)).sum())} NaN, missing or infinite value(s) in "
                             f"target '{target}'")
        size = (values.max(axis=(1, 2)) if values.ndim == 3 else values) * _to_mm(var, path, target, target_units)
        if (size < 0).any():
            raise SciMLError(f"{path}: negative hail sizes in target '{target}'")
        if day_variable in ds.variables:
            day = ds[day_variable].to_numpy().astype("datetime64[D]")
        else:  # no run dates: the file is its own day
            day = np.full(len(size), np.datetime64("NaT"), dtype="datetime64[D]")
        meta = {k: ds[k].to_numpy() for k in ("track_id", "forecast_hour", "centroid_lon", "centroid_lat")
                if k in ds.variables and ds[k].dims == ("p",)}
    if x.shape[0] == 0:
        raise SciMLError(f"{path}: no patches (dimension 'p' is empty)")
    return {"x": x, "size_mm": size.astype(np.float32), "day": day, **{f"meta/{k}": v for k, v in meta.items()}}


def read_patches(files: list[Path], variables: list[str], target: str, target_units: str | None = None,
                 key: str = "data.path") -> Patches:
    """All patches of `files`, one read per file; grids must agree across files."""
    if not variables:
        raise SciMLError(f"{key}: data.variables is empty; name the input fields, e.g. [REFL_COM_curr, T2_curr]")
    parts = [read_file(f, list(variables), target, target_units) for f in files]
    grid = parts[0]["x"].shape[2:]
    for f, part in zip(files, parts):
        if part["x"].shape[2:] != grid:
            raise SciMLError(f"{f}: patches of {part['x'].shape[2:]} grid points, but {files[0]} has {grid}")
        # Whole days are the unit of the train/validation/test split; a file without run dates is its own day.
        part["day"] = np.where(np.isnat(part["day"]), f"file:{f.name}", np.datetime_as_string(part["day"], unit="D"))
    meta_keys = set.intersection(*(set(k for k in p if k.startswith("meta/")) for p in parts))
    return Patches(
        x=np.concatenate([p["x"] for p in parts]),
        size_mm=np.concatenate([p["size_mm"] for p in parts]),
        day=np.concatenate([p["day"] for p in parts]),
        file_id=np.concatenate([np.full(len(p["size_mm"]), i) for i, p in enumerate(parts)]),
        row_in_file=np.concatenate([np.arange(len(p["size_mm"])) for p in parts]),
        files=list(files), variables=list(variables),
        meta={k.removeprefix("meta/"): np.concatenate([p[k] for p in parts]) for k in sorted(meta_keys)},
    )
