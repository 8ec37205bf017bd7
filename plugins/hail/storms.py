"""The hagelslag storm-object table: one CSV per model run day (`track_step_SSEF_<member>_<YYYYMMDD>.csv`), one
row per storm object and hour, with `{variable}_{statistic}` columns and the matched radar hail size `Hail_Size`
(mm, 0 when no observed hail track matched).

Days are run days (00 UTC initialisation), read from the `Track_ID` (`..._20150520-0000_...`): a run's forecast
hours 12-36 reach into the next calendar day, so the `Date` column is not the run day.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from sciml.data import find_files
from sciml.errors import SciMLError

DEFAULT_DIR = Path(__file__).parent / "data" / "storms"
FILE_PATTERN = "track_step_SSEF_*.csv"
# The 18 variables of the table: storm attributes, then the storm's environment.
VARIABLES = ["uh_max", "r10cmx", "wupmax", "wdnmax", "cqgmax", "mlcape", "mlcins", "sblcl", "srh03", "shr06",
             "tmp500", "tmp700", "dewp2m", "temp2m", "sph850", "sph500", "lllr", "lr75"]
STATISTICS = ["mean", "max", "min", "std"]
# Positive, right-skewed (or, for CIN and downdrafts, left-skewed) variables: used as sign(x) log(1 + |x|).
LOG_VARIABLES = ("uh_max", "wupmax", "wdnmax", "cqgmax", "mlcape", "mlcins", "sblcl", "srh03")
TARGET = "Hail_Size"
_RUN_DAY = re.compile(r"_(\d{8})-\d{4}_")


def resolve_csvs(path: str | Path | None, key: str = "data.path") -> list[Path]:
    """A CSV file, a folder of `track_step_SSEF_*.csv`, or a glob; None means the embedded real table."""
    return find_files(DEFAULT_DIR if path is None else path, (FILE_PATTERN,), key)


def feature_columns(variables: list[str], statistics: list[str]) -> list[str]:
    return [f"{v}_{s}" for v in variables for s in statistics]


def read_storms(files: list[Path], columns: list[str], max_size_mm: float | None = None) -> pd.DataFrame:
    """The rows of all files with `run_day` (datetime64) added; every requested column and `Hail_Size` checked to be
    present, numeric and finite. Hail sizes are clipped at `max_size_mm` (MESH artefacts reach 680 mm)."""
    frames = []
    for f in files:
        try:
            frame = pd.read_csv(f)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
            raise SciMLError(f"{f}: not a readable CSV storm table ({str(exc).splitlines()[0]})") from None
        missing = [c for c in ["Track_ID", *columns, TARGET] if c not in frame.columns]
        if missing:
            raise SciMLError(f"{f}: missing column(s) {', '.join(missing)} (expected the hagelslag track_step layout)")
        if frame.empty:
            raise SciMLError(f"{f}: no storm rows")
        numeric = frame[[*columns, TARGET]].apply(pd.to_numeric, errors="coerce").astype(np.float64)
        bad = ~np.isfinite(numeric.to_numpy())
        if bad.any():
            column = numeric.columns[bad.any(axis=0)][0]
            raise SciMLError(f"{f}: {int(bad[:, numeric.columns.get_loc(column)].sum())} missing, non-numeric or "
                             f"infinite value(s) in column '{column}'")
        frame = pd.concat([frame.drop(columns=numeric.columns), numeric], axis=1).copy()  # one block per dtype
        days = frame["Track_ID"].astype(str).str.extract(_RUN_DAY, expand=False)
        if days.isna().any():
            raise SciMLError(f"{f}: Track_ID '{frame['Track_ID'][days.isna()].iloc[0]}' names no run day "
                             "(expected '..._YYYYMMDD-HHMM_...')")
        frames.append(frame.assign(run_day=pd.to_datetime(days, format="%Y%m%d"), source_file=str(f)))
    table = pd.concat(frames, ignore_index=True)
    if (table[TARGET] < 0).any():
        raise SciMLError(f"{files[0].parent}: negative {TARGET} values (expected mm >= 0)")
    if max_size_mm is not None:
        table[TARGET] = table[TARGET].clip(upper=max_size_mm)
    return table
