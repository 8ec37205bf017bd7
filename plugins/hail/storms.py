"""The hagelslag storm-object table: one CSV per model run day (`track_step_SSEF_<member>_<YYYYMMDD>.csv`), one
row per storm object and hour, with `{variable}_{statistic}` columns and the matched radar hail size `Hail_Size`
(mm, 0 when no observed hail track matched). A table without `Hail_Size` is predicted, not scored.

Days are run days (00 UTC initialisation), read from the `Track_ID` (`..._20150520-0000_...`): a run's forecast
hours 12-36 reach into the next calendar day, so the `Date` column is not the run day.

The inputs need more than a per-channel scaling: hagelslag codes missing values as -9999 (and means over it, such as
a -9209 C 700 hPa temperature over high terrain; 11 % of the 850 hPa humidities), which the reader turns into NaN
and `StormNormalizer` fills with the training median, then clips to training quantiles and standardises.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from sciml.data import FileInfo, Normalizer, Reader, find_files
from sciml.errors import SciMLError
from sciml_plugins.hail.data import HailTargets

DEFAULT_DIR = Path(__file__).parent / "data" / "storms"
FILE_PATTERN = "track_step_SSEF_*.csv"
# The 18 variables of the table: storm attributes, then the storm's environment.
VARIABLES = ["uh_max", "r10cmx", "wupmax", "wdnmax", "cqgmax", "mlcape", "mlcins", "sblcl", "srh03", "shr06",
             "tmp500", "tmp700", "dewp2m", "temp2m", "sph850", "sph500", "lllr", "lr75"]
STATISTICS = ["mean", "max", "min", "std"]
# Positive, right-skewed (or, for CIN and downdrafts, left-skewed) variables: used as sign(x) log(1 + |x|).
LOG_VARIABLES = ("uh_max", "wupmax", "wdnmax", "cqgmax", "mlcape", "mlcins", "sblcl", "srh03")
TARGET = "Hail_Size"
META = ("Step_ID", "Track_ID", "run_day", "Forecast_Hour", "Centroid_Lon", "Centroid_Lat")  # copied to predictions
_RUN_DAY = re.compile(r"_(\d{8})-\d{4}_")


def resolve_csvs(path: str | Path | None, key: str = "data.path") -> list[Path]:
    """A CSV file, a folder of `track_step_SSEF_*.csv`, or a glob; None means the embedded real table."""
    return find_files(DEFAULT_DIR if path is None else path, (FILE_PATTERN,), key)


def feature_columns(variables: list[str], statistics: list[str]) -> list[str]:
    return [f"{v}_{s}" for v in variables for s in statistics]


def read_table(path: Path, columns: list[str], target: bool | None = True) -> pd.DataFrame:
    """One file's rows with `run_day` (datetime64) added; every requested column, and `Hail_Size` (when `target`;
    None: when present), checked to be present, numeric and finite."""
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise SciMLError(f"{path}: not a readable CSV storm table ({str(exc).splitlines()[0]})") from None
    with_target = TARGET in frame.columns if target is None else target
    missing = [c for c in ["Track_ID", *columns, *([TARGET] if with_target else [])] if c not in frame.columns]
    if missing:
        raise SciMLError(f"{path}: missing column(s) {', '.join(missing)} (expected the hagelslag track_step layout)")
    if frame.empty:
        raise SciMLError(f"{path}: no storm rows")
    checked = [*columns, *([TARGET] if with_target else [])]
    numeric = frame[checked].apply(pd.to_numeric, errors="coerce").astype(np.float64)
    bad = ~np.isfinite(numeric.to_numpy())
    if bad.any():
        column = numeric.columns[bad.any(axis=0)][0]
        raise SciMLError(f"{path}: {int(bad[:, numeric.columns.get_loc(column)].sum())} missing, non-numeric or "
                         f"infinite value(s) in column '{column}'")
    if with_target and (numeric[TARGET] < 0).any():
        raise SciMLError(f"{path}: negative {TARGET} values (expected mm >= 0)")
    frame = pd.concat([frame.drop(columns=numeric.columns), numeric], axis=1).copy()  # one block per dtype
    days = frame["Track_ID"].astype(str).str.extract(_RUN_DAY, expand=False)
    if days.isna().any():
        raise SciMLError(f"{path}: Track_ID '{frame['Track_ID'][days.isna()].iloc[0]}' names no run day "
                         "(expected '..._YYYYMMDD-HHMM_...')")
    return frame.assign(run_day=pd.to_datetime(days, format="%Y%m%d"), source_file=str(path))


def read_storms(files: list[Path], columns: list[str], max_size_mm: float | None = None) -> pd.DataFrame:
    """The rows of all files (the generator's input); hail sizes clipped at `max_size_mm`."""
    table = pd.concat([read_table(f, columns) for f in files], ignore_index=True)
    if max_size_mm is not None:
        table[TARGET] = table[TARGET].clip(upper=max_size_mm)
    return table


class _Table:
    """One parsed CSV and its features, kept as the reader's handle of the file."""

    def __init__(self, frame: pd.DataFrame, x: np.ndarray):
        self.frame, self.x = frame, x

    def close(self) -> None:
        pass


@dataclass(kw_only=True)
class StormReader(HailTargets, Reader):
    """Args (`data.` keys):
        variables, statistics: features are the `{variable}_{statistic}` columns (variables null: all 18).
        log_variables: variables whose (skewed) statistics enter as sign(x) log(1 + |x|): updraft helicity,
            updraft and downdraft speed, graupel, CAPE, CIN, LCL height, helicity.
        missing_below: values below it are hagelslag's missing-value code; they become NaN here and the training
            median of their feature in `StormNormalizer`.
        target_mode, threshold_mm, max_size_mm: see sciml_plugins.hail.data.
    """

    variables: list[str] | None = None
    statistics: list[str] = field(default_factory=lambda: ["mean", "max"])
    log_variables: list[str] = field(default_factory=lambda: list(LOG_VARIABLES))
    missing_below: float = -9000.0
    patterns = (FILE_PATTERN,)

    def __post_init__(self):
        super().__post_init__()
        self.variables = [str(v) for v in (self.variables or VARIABLES)]
        self.statistics, self.log_variables = [str(s) for s in self.statistics], [str(v) for v in self.log_variables]
        unknown = sorted(set(self.log_variables) - set(VARIABLES))
        if unknown:
            raise SciMLError(f"data.log_variables: unknown variable(s) {', '.join(unknown)} (known: "
                             f"{', '.join(VARIABLES)})")
        self.columns = feature_columns(self.variables, self.statistics)

    def default_path(self):
        return DEFAULT_DIR  # 11 real run days, 2015-05-20 .. 2015-06-03

    def _load(self, path: Path) -> _Table:
        frame = read_table(path, self.columns, target=None)
        x = frame[self.columns].to_numpy(np.float64, copy=True)
        x[x < self.missing_below] = np.nan  # filled with the training median by StormNormalizer
        logged = np.array([c.rsplit("_", 1)[0] in set(self.log_variables) for c in self.columns])
        x[:, logged] = np.sign(x[:, logged]) * np.log1p(np.abs(x[:, logged]))
        return _Table(frame, x.astype(np.float32))

    def open(self, path):
        table = self.handle(path, self._load)
        day = table.frame["run_day"].dt.strftime("%Y-%m-%d").to_numpy().astype(str)
        return FileInfo(path, len(table.frame), (len(self.columns),), TARGET in table.frame.columns, {"day": day})

    def read(self, info, rows):
        table = self.handle(info.path, self._load)
        out = {"x": table.x[rows]}
        if info.labels:
            out["y"] = self.targets(table.frame[TARGET].to_numpy()[rows])
        return out

    def write(self, info, rows, outputs, directory):
        """`<input stem>_predictions.csv`: per predicted storm object its identifiers, row in the input, forecast
        and, when the input has `Hail_Size`, the observed target."""
        frame = self.handle(info.path, self._load).frame
        out = frame.iloc[rows][[c for c in META if c in frame.columns]].reset_index(drop=True)
        out["run_day"] = out["run_day"].dt.strftime("%Y-%m-%d")
        out.insert(0, "row_in_file", rows)
        if info.labels:
            out[self.observed_name()] = self.targets(frame[TARGET].to_numpy()[rows])
        for name, value in self.forecast_columns(outputs).items():
            out[name] = value
        target = directory / f"{info.path.stem}_predictions.csv"
        tmp = directory / f".{target.name}.tmp"
        out.to_csv(tmp, index=False, float_format="%.5g")
        return [tmp.replace(target)]


class StormNormalizer(Normalizer):
    """Missing values (NaN) filled with the training median of their feature, features clipped to the training
    [clip_quantile, 1 - clip_quantile] quantiles, then standardised with the training mean and standard deviation.
    Quantiles and medians do not add up over blocks or ranks: `fit` takes the (small) table whole, gathered from
    every rank, so that every rank and a single process get the same statistics."""

    clip_quantile = 0.005
    STATISTICS = ("median", "lo", "hi", "mean", "std")

    def __init__(self, channels: int):
        super().__init__(channels)
        for name in self.STATISTICS:
            self.register_buffer(name, torch.full((channels,), float("nan")))

    def fit(self, blocks, reduce=None) -> None:
        x = _gather(np.concatenate([np.asarray(b, dtype=np.float64) for b in blocks]))
        median = np.nanmedian(x, axis=0) if len(x) else np.full(self.channels, np.nan)
        if np.isnan(median).any():
            raise SciMLError(f"data.path: feature {int(np.flatnonzero(np.isnan(median))[0])} is missing in every "
                             "training row")
        x = np.where(np.isnan(x), median, x)
        lo, hi = np.quantile(x, self.clip_quantile, axis=0), np.quantile(x, 1 - self.clip_quantile, axis=0)
        x = np.clip(x, lo, hi)
        std = x.std(axis=0)
        for name, value in zip(self.STATISTICS, (median, lo, hi, x.mean(axis=0), np.where(std > 1e-6, std, 1.0))):
            getattr(self, name).copy_(torch.as_tensor(value, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.where(torch.isnan(x), self._view(x, self.median), x)
        x = torch.clamp(x, self._view(x, self.lo), self._view(x, self.hi))
        return (x - self._view(x, self.mean)) / self._view(x, self.std)


def _gather(x: np.ndarray) -> np.ndarray:
    """The training rows of every rank (DDP: each rank holds its own shard)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, x)
    return np.concatenate(parts)
