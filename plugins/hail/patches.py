"""Reader of storm-centred patch files in the layout of the NCAR/AMS storm-patch data (Gagne et al. 2019): netCDF
with a patch dimension `p` and grid dimensions `row`, `col`; input fields such as `REFL_COM_curr`, `T2_curr`,
`U10_curr`, `V10_curr`; a target such as `HAIL_MAXK1_future`, either one value per patch (p) or a field
(p, row, col) reduced to its patch maximum. Usually one file per run day (`run_date`, per patch).

One row is one patch. Target units are converted to millimetres from the variable's `units` attribute (m, cm, mm,
in); a file without one needs `data.target_units`. A file without the target is predicted, not scored.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import xarray as xr

from sciml.data import FileInfo, Reader
from sciml.errors import SciMLError
from sciml_plugins.hail.data import HailTargets

DEFAULT_DIR = Path(__file__).parent / "data" / "patches"
TO_MM = {"m": 1000.0, "meter": 1000.0, "meters": 1000.0, "metre": 1000.0, "metres": 1000.0, "cm": 10.0,
         "mm": 1.0, "millimeter": 1.0, "millimeters": 1.0, "in": 25.4, "inch": 25.4, "inches": 25.4}
GRID = ("p", "row", "col")


def _open(path: Path) -> xr.Dataset:
    try:
        return xr.open_dataset(path, engine="netcdf4")
    except (OSError, ValueError) as exc:
        raise SciMLError(f"{path}: not a readable netCDF file ({str(exc).splitlines()[0]})") from None


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


@dataclass(kw_only=True)
class PatchReader(HailTargets, Reader):
    """Args (`data.` keys):
        variables: input fields, in channel order.
        target: hail-size variable, (p) or (p, row, col) (patch maximum); `target_units` overrides its `units`.
        target_mode, threshold_mm, max_size_mm: see sciml_plugins.hail.data.
    """

    variables: list[str] = field(default_factory=lambda: ["REFL_COM_curr", "T2_curr", "U10_curr", "V10_curr"])
    target: str = "HAIL_MAXK1_future"
    target_units: str | None = None
    patterns = ("*.nc",)

    def __post_init__(self):
        super().__post_init__()
        self.variables = [str(v) for v in self.variables]
        if not self.variables:
            raise SciMLError("data.variables is empty; name the input fields, e.g. [REFL_COM_curr, T2_curr]")

    def default_path(self):
        return DEFAULT_DIR  # 11 daily files of simulated patches

    def open(self, path):
        ds = self.handle(path, _open)
        missing = [v for v in self.variables if v not in ds.variables]
        if missing:
            raise SciMLError(f"{path}: missing variable(s) {', '.join(missing)}; the file has "
                             f"{', '.join(sorted(str(v) for v in ds.data_vars))}")
        for name in self.variables:
            if ds[name].dims != GRID:
                raise SciMLError(f"{path}: variable '{name}' has dimensions {ds[name].dims}, expected {GRID}")
        labels, to_mm = self.target in ds.variables, None
        if labels:
            if ds[self.target].dims not in (("p",), GRID):
                raise SciMLError(f"{path}: target '{self.target}' has dimensions {ds[self.target].dims}, expected "
                                 f"('p',) or {GRID}")
            to_mm = _to_mm(ds[self.target], path, self.target, self.target_units)
        # Whole days are the unit of the split; a file without run dates is its own day.
        if "run_date" in ds.variables:
            day = np.datetime_as_string(ds["run_date"].to_numpy().astype("datetime64[D]"), unit="D")
            day = np.where(day == "NaT", f"file:{path.name}", day)
        else:
            day = np.full(ds.sizes["p"], f"file:{path.name}")
        shape = (len(self.variables), ds.sizes["row"], ds.sizes["col"])
        return FileInfo(path, ds.sizes["p"], shape, labels, {"day": day}, {"to_mm": to_mm})

    def _span(self, info: FileInfo, rows: np.ndarray) -> tuple[xr.Dataset, np.ndarray]:
        """The file's patches covering `rows` (sorted) and the positions of `rows` in them: one contiguous read per
        variable (the files are chunked along `p`) unless the rows are scattered far apart."""
        ds = self.handle(info.path, _open)
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        if hi - lo <= 2 * len(rows) + 64:
            return ds.isel(p=slice(lo, hi)), rows - lo
        return ds.isel(p=rows), np.arange(len(rows))

    def _sizes(self, part: xr.Dataset, take: np.ndarray, info: FileInfo) -> np.ndarray:
        values = part[self.target].to_numpy().astype(np.float64)[take]
        if not np.isfinite(values).all():
            raise SciMLError(f"{info.path}: {int((~np.isfinite(values)).sum())} NaN, missing or infinite value(s) "
                             f"in target '{self.target}'")
        # in float32: a packed 0.025 m decodes to 24.99999... mm in float64, which is not severe
        size = ((values.max(axis=(1, 2)) if values.ndim == 3 else values) * info.meta["to_mm"]).astype(np.float32)
        if (size < 0).any():
            raise SciMLError(f"{info.path}: negative hail sizes in target '{self.target}'")
        return size

    def read(self, info, rows):
        part, take = self._span(info, rows)
        x = np.empty((len(rows), *info.shape), np.float32)
        for i, name in enumerate(self.variables):
            x[:, i] = part[name].to_numpy()[take]
            bad = int((~np.isfinite(x[:, i])).sum())
            if bad:
                raise SciMLError(f"{info.path}: {bad} NaN, missing or infinite value(s) in variable '{name}'")
        if not info.labels:
            return {"x": x}
        return {"x": x, "y": self.targets(self._sizes(part, take, info))}

    def write(self, info, rows, outputs, directory):
        """`<input stem>_predictions.nc`: per predicted patch its forecast, the observed target when the input has
        one, its row in the input, and the input's own per-patch variables (run date, track id, position)."""
        part, take = self._span(info, rows)
        part = part.isel(p=take)
        # the input's chunking and packing need not fit the output
        out = part[[n for n, v in part.variables.items() if v.dims == ("p",)]].drop_encoding()
        out["row_in_file"] = ("p", rows.astype(np.int64), {"long_name": "patch index in the input file"})
        event = f"hail >= {self.threshold_mm:g} mm"
        for name, value in self.forecast_columns(outputs).items():
            attrs = {"long_name": f"forecast probability of {event}"} if name == "probability_severe" else \
                {"units": "mm"}
            out[name] = ("p", value.astype(np.float32), attrs)
        if info.labels:
            y = self.targets(self._sizes(part, take, info))
            out["observed"] = ("p", y, {"long_name": f"observed {event} (1) or not (0)"} if
                               self.target_mode == "classification" else
                               {"long_name": "observed hail size", "units": "mm"})
        out.attrs = {"source_file": str(info.path), "target_mode": self.target_mode, "threshold_mm": self.threshold_mm,
                     "Conventions": "CF-1.8"}
        target = directory / f"{info.path.stem}_predictions.nc"
        tmp = directory / f".{target.name}.tmp"
        out.to_netcdf(tmp)
        return [tmp.replace(target)]
