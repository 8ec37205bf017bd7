"""Data modules of the hail plugin: storm-centred patches (netCDF) and the storm-object table (CSV).

Both split by whole run days, in time order: the last `test_days` days are the test set (unless `test_path` gives
the test data), the `val_days` days before them validate, the rest train. Storms of one day share their weather, so
a random split of storms would leak it. Everything is read once in `setup` and served from memory a batch at a
time. Inputs are standardised with training-set statistics on the device after transfer; those statistics and the
training climatology (event frequency) travel in checkpoints so that a test-only run prepares data identically.

Targets: `target_mode: classification` gives `y` = 1 for hail >= `threshold_mm` (else 0); `regression` gives the
hail size in mm. Sizes are clipped at `max_size_mm` (radar MESH artefacts reach 680 mm).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import xarray as xr

from sciml.data import SplitDataModule, TensorDictDataset
from sciml.errors import SciMLError
from sciml_plugins.hail.patches import read_patches, resolve_patch_files
from sciml_plugins.hail.storms import LOG_VARIABLES, TARGET, VARIABLES, feature_columns, read_storms, resolve_csvs

log = logging.getLogger(__name__)
MODES = ("classification", "regression")


def split_days(days: np.ndarray, val_days: int, test_days: int, where: str,
               test_day: str | None = None) -> dict[str, np.ndarray]:
    """Boolean masks of the train, val and test rows: whole days in time order (test last). `test_day` (YYYY-MM-DD)
    tests that one day instead (leave-one-day-out); validation is then the latest `val_days` of the others."""
    unique = np.unique(days)  # sorted: ISO dates sort in time order
    if test_day is not None:
        if str(test_day) not in unique:
            raise SciMLError(f"data.test_day: '{test_day}' is not a run day of {where} (days: {', '.join(unique)})")
        test, rest = np.array([str(test_day)]), unique[unique != str(test_day)]
        if len(rest) < val_days + 1:
            raise SciMLError(f"data.path: {where} holds {len(unique)} day(s); data.val_days={val_days} and "
                             "data.test_day leave no day to train on")
        val = rest[len(rest) - val_days:]
        return {"train": ~np.isin(days, np.concatenate([val, test])), "val": np.isin(days, val),
                "test": np.isin(days, test)}
    if len(unique) < val_days + test_days + 1:
        raise SciMLError(f"data.path: {where} holds {len(unique)} day(s); data.val_days={val_days} and "
                         f"data.test_days={test_days} leave no day to train on")
    test = unique[len(unique) - test_days:] if test_days else unique[:0]
    val = unique[len(unique) - test_days - val_days:len(unique) - test_days]
    return {"train": ~np.isin(days, np.concatenate([val, test])), "val": np.isin(days, val),
            "test": np.isin(days, test)}


class _HailData(SplitDataModule):
    """What both layouts share: day split, targets, normalisation, climatology, loaders."""

    def __init__(self, path, test_path, batch_size, val_days, test_days, target_mode, threshold_mm, max_size_mm,
                 num_workers, test_day=None):
        super().__init__()
        if target_mode not in MODES:
            raise SciMLError(f"data.target_mode: '{target_mode}' is not one of {', '.join(MODES)}")
        if batch_size < 1:
            raise SciMLError(f"data.batch_size must be >= 1, got {batch_size}")
        if val_days < 1 or test_days < 0:
            raise SciMLError(f"data.val_days must be >= 1 and data.test_days >= 0, got {val_days}, {test_days}")
        if test_day is not None and test_path:
            raise SciMLError("data.test_day and data.test_path both choose the test data: give one of them")
        self.path, self.test_path, self.test_day = path, test_path, test_day
        self.batch_size, self.num_workers = batch_size, num_workers
        self.val_days, self.test_days = val_days, 0 if test_path else test_days
        if not test_path and test_days < 1:
            raise SciMLError("data.test_days must be >= 1 when no data.test_path is given")
        self.target_mode, self.threshold_mm, self.max_size_mm = target_mode, threshold_mm, max_size_mm
        self.splits: dict[str, TensorDictDataset] = {}
        self.climatology: float | None = None
        self.mean: torch.Tensor | None = None
        self.std: torch.Tensor | None = None

    # --- subclasses: read(path, key) -> (x float32 array, size_mm, days, table of per-row metadata)
    def read(self, path, key):
        raise NotImplementedError

    def _targets(self, size_mm: np.ndarray) -> torch.Tensor:
        size = np.minimum(size_mm, self.max_size_mm) if self.max_size_mm else size_mm
        if self.target_mode == "classification":
            return torch.from_numpy((size >= self.threshold_mm).astype(np.int64))
        return torch.from_numpy(size.astype(np.float32))

    def setup(self, stage: str) -> None:
        if self.splits:
            return
        x, size, days, self.meta = self.read(self.path, "data.path")
        masks = split_days(days, self.val_days, self.test_days, str(self.path or "the embedded data"),
                           self.test_day)
        if self.test_path:
            tx, tsize, tdays, self.test_meta = self.read(self.test_path, "data.test_path")
            if tx.shape[1:] != x.shape[1:]:
                raise SciMLError(f"data.test_path: inputs of shape {tx.shape[1:]}, training data {x.shape[1:]}")
        else:
            tx, tsize, tdays = x[masks["test"]], size[masks["test"]], days[masks["test"]]
            self.test_meta = self.meta[masks["test"]].reset_index(drop=True)
        train = masks["train"]
        event = np.minimum(size[train], self.max_size_mm or np.inf) >= self.threshold_mm
        if self.climatology is None:
            self.climatology = float(event.mean())
        if self.mean is None:
            self.fit_normalisation(x[train])
        for name, xs, ss, rows in (("train", x[train], size[train], np.flatnonzero(train)),
                                   ("val", x[masks["val"]], size[masks["val"]], np.flatnonzero(masks["val"])),
                                   ("test", tx, tsize, np.arange(len(tx)))):
            self.splits[name] = TensorDictDataset(x=torch.from_numpy(np.ascontiguousarray(xs)), y=self._targets(ss),
                                                  index=torch.from_numpy(rows))
        self.test_days_seen = np.unique(tdays)
        log.info("hail data (%s): %s; training days %s; severe-hail climatology %.3f", self.target_mode,
                 ", ".join(f"{k} {len(v)}" for k, v in self.splits.items()),
                 ", ".join(np.unique(days[train]).tolist()), self.climatology)

    def fit_normalisation(self, x: np.ndarray) -> None:
        axes = (0, 2, 3) if x.ndim == 4 else (0,)
        self.mean = torch.from_numpy(x.mean(axis=axes, dtype=np.float64)).float()
        self.std = torch.from_numpy(x.std(axis=axes, dtype=np.float64)).float().clamp(min=1e-6)

    @property
    def input_shape(self) -> tuple[int, ...] | None:
        return tuple(self.splits["train"].tensors["x"].shape[1:]) if self.splits else None

    def on_after_batch_transfer(self, batch, dataloader_idx):
        if self.mean is None:
            raise SciMLError("no input normalisation: train first, or test from a checkpoint of a trained run")
        shape = (1, -1) + (1,) * (batch["x"].ndim - 2)
        batch["x"] = (batch["x"] - self.mean.to(batch["x"].device).view(shape)) / self.std.to(
            batch["x"].device).view(shape)
        return batch

    def state_dict(self):
        return {"climatology": self.climatology, "mean": None if self.mean is None else self.mean.tolist(),
                "std": None if self.std is None else self.std.tolist()}

    def load_state_dict(self, state_dict):
        self.climatology = state_dict.get("climatology")
        for key in ("mean", "std"):
            value = state_dict.get(key)
            setattr(self, key, None if value is None else torch.tensor(value, dtype=torch.float32))

    def _prediction_columns(self, predictions: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Per test row: the forecast probability of severe hail, and the predicted size in regression."""
        order = np.argsort(predictions["index"], kind="stable")
        p = {k: v[order] for k, v in predictions.items()}
        if "score" in p:  # classification: softmax over (no event, event)
            return {"index": p["index"], "probability_severe": p["score"][:, 1]}
        return {"index": p["index"], "probability_severe": p["probability"][:, 0],
                "predicted_size_mm": p["prediction"][:, 0], "predicted_size_std_mm": p["std"][:, 0]}


class HailPatchDataModule(_HailData):
    """Storm-centred patches (netCDF, `p` x `row` x `col`).

    Args:
        path: file, folder of .nc files or glob; None = the embedded simulated sample (11 days).
        test_path: files that replace the test days (e.g. another season).
        variables: input fields, in channel order.
        target: hail-size variable, (p) or (p, row, col) (patch maximum); `target_units` overrides its
            `units` attribute.
        val_days, test_days: whole days for validation and test (the latest ones).
        test_day: a run day (YYYY-MM-DD) to test instead of the latest ones (leave-one-day-out).
        target_mode, threshold_mm, max_size_mm: see the module doc.
    """

    def __init__(self, path: str | None = None, test_path: str | None = None,
                 variables: list[str] = ("REFL_COM_curr", "T2_curr", "U10_curr", "V10_curr"),
                 target: str = "HAIL_MAXK1_future", target_units: str | None = None, batch_size: int = 64,
                 val_days: int = 2, test_days: int = 2, target_mode: str = "classification",
                 threshold_mm: float = 25.0, max_size_mm: float | None = 150.0, num_workers: int = 0,
                 test_day: str | None = None):
        super().__init__(path, test_path, batch_size, val_days, test_days, target_mode, threshold_mm, max_size_mm,
                         num_workers, test_day)
        self.variables, self.target, self.target_units = list(variables), target, target_units

    def read(self, path, key):
        files = resolve_patch_files(path, key)
        patches = read_patches(files, self.variables, self.target, self.target_units, key)
        meta = pd.DataFrame({"file": [str(files[i]) for i in patches.file_id], "row_in_file": patches.row_in_file,
                             "run_date": patches.day, **patches.meta})
        return patches.x, patches.size_mm, patches.day, meta

    def save_predictions(self, predictions: dict[str, np.ndarray], directory: Path) -> None:
        """`test_predictions.nc`: per test patch the forecast, the observed size and where the patch came from."""
        cols = self._prediction_columns(predictions)
        meta = self.test_meta.iloc[cols.pop("index")].reset_index(drop=True)
        observed = self.splits["test"].tensors["y"].numpy()[np.sort(predictions["index"])]
        data = {k: ("p", v.astype(np.float32)) for k, v in cols.items()}
        data["observed"] = ("p", observed)
        for column in meta.columns:
            values = meta[column].to_numpy()
            data[column] = ("p", values.astype(str) if values.dtype == object else values)
        ds = xr.Dataset(data)
        ds["probability_severe"].attrs = {"long_name": f"forecast probability of hail >= {self.threshold_mm:g} mm"}
        ds["observed"].attrs = {"long_name": f"observed hail >= {self.threshold_mm:g} mm (1) or not (0)"
                                if self.target_mode == "classification" else "observed hail size",
                                **({"units": "mm"} if self.target_mode == "regression" else {})}
        for k in ("predicted_size_mm", "predicted_size_std_mm"):
            if k in ds:
                ds[k].attrs = {"units": "mm"}
        ds.attrs = {"target_mode": self.target_mode, "climatology": self.climatology or float("nan")}
        target = directory / "test_predictions.nc"
        tmp = target.with_suffix(".nc.tmp")
        ds.to_netcdf(tmp)
        tmp.replace(target)


class HailStormDataModule(_HailData):
    """The storm-object table (hagelslag `track_step_SSEF_*.csv`): per-storm statistics as features.

    Args:
        path: CSV file, folder or glob; None = the embedded real table (11 days, 2015-05-20 .. 2015-06-03).
        test_path: an unseen day's CSV (e.g. the 2015-06-04 forecast day).
        variables, statistics: features are the `{variable}_{statistic}` columns.
        val_days, test_days, test_day, target_mode, threshold_mm, max_size_mm: as for patches.
        log_variables: variables whose (skewed) statistics enter as sign(x) log(1 + |x|): updraft helicity,
            updraft and downdraft speed, graupel, CAPE, CIN, LCL height, helicity.
        missing_below: values below it are hagelslag's missing-value code (-9999, or means over it such as a
            -9209 C 700 hPa temperature over high terrain; 11 % of the 850 hPa humidities); they are replaced by
            the training median of their feature.
        clip_quantile: features are clipped to the training [q, 1 - q] quantiles before standardising.
    """

    def __init__(self, path: str | None = None, test_path: str | None = None,
                 variables: list[str] | None = None, statistics: list[str] = ("mean", "max"),
                 log_variables: list[str] = LOG_VARIABLES, missing_below: float = -9000.0,
                 batch_size: int = 64, val_days: int = 2, test_days: int = 1, target_mode: str = "classification",
                 threshold_mm: float = 25.0, max_size_mm: float | None = 150.0, clip_quantile: float = 0.005,
                 num_workers: int = 0, test_day: str | None = None):
        super().__init__(path, test_path, batch_size, val_days, test_days, target_mode, threshold_mm, max_size_mm,
                         num_workers, test_day)
        self.variables = list(variables or VARIABLES)
        unknown = sorted(set(log_variables) - set(VARIABLES))
        if unknown:
            raise SciMLError(f"data.log_variables: unknown variable(s) {', '.join(unknown)} (known: "
                             f"{', '.join(VARIABLES)})")
        self.columns = feature_columns(self.variables, list(statistics))
        self.logged = np.array([c.rsplit("_", 1)[0] in set(log_variables) for c in self.columns])
        self.missing_below, self.clip_quantile = missing_below, clip_quantile
        self.median: torch.Tensor | None = None
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def read(self, path, key):
        table = read_storms(resolve_csvs(path, key), self.columns)
        days = table["run_day"].dt.strftime("%Y-%m-%d").to_numpy().astype(str)
        meta_cols = [c for c in ("Step_ID", "Track_ID", "run_day", "Forecast_Hour", "Centroid_Lon", "Centroid_Lat",
                                 "source_file") if c in table.columns]
        x = table[self.columns].to_numpy(np.float64, copy=True)
        x[x < self.missing_below] = np.nan  # filled with training medians on the device
        x[:, self.logged] = np.sign(x[:, self.logged]) * np.log1p(np.abs(x[:, self.logged]))
        return x.astype(np.float32), table[TARGET].to_numpy(np.float32), days, table[meta_cols].reset_index(drop=True)

    def fit_normalisation(self, x: np.ndarray) -> None:
        median = np.nanmedian(x, axis=0)
        if np.isnan(median).any():
            raise SciMLError(f"data.path: feature '{self.columns[int(np.flatnonzero(np.isnan(median))[0])]}' is "
                             "missing in every training row")
        x = np.where(np.isnan(x), median, x)
        q = self.clip_quantile
        self.median = torch.from_numpy(median).float()
        self.lo = torch.from_numpy(np.quantile(x, q, axis=0)).float()
        self.hi = torch.from_numpy(np.quantile(x, 1 - q, axis=0)).float()
        super().fit_normalisation(np.clip(x, self.lo.numpy(), self.hi.numpy()))

    def on_after_batch_transfer(self, batch, dataloader_idx):
        if self.lo is not None:
            x, device = batch["x"], batch["x"].device
            x = torch.where(torch.isnan(x), self.median.to(device), x)
            batch["x"] = torch.maximum(torch.minimum(x, self.hi.to(device)), self.lo.to(device))
        return super().on_after_batch_transfer(batch, dataloader_idx)

    def state_dict(self):
        return {**super().state_dict(), **{k: None if getattr(self, k) is None else getattr(self, k).tolist()
                                           for k in ("median", "lo", "hi")}}

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        for key in ("median", "lo", "hi"):
            value = state_dict.get(key)
            setattr(self, key, None if value is None else torch.tensor(value, dtype=torch.float32))

    def save_predictions(self, predictions: dict[str, np.ndarray], directory: Path) -> None:
        """`test_predictions.csv`: per storm object its identifiers, observed size and forecast."""
        cols = self._prediction_columns(predictions)
        table = self.test_meta.iloc[cols.pop("index")].reset_index(drop=True)
        observed = self.splits["test"].tensors["y"].numpy()[np.sort(predictions["index"])]
        table["observed_severe" if self.target_mode == "classification" else "observed_size_mm"] = observed
        for k, v in cols.items():
            table[k] = v
        target = directory / "test_predictions.csv"
        tmp = target.with_suffix(".csv.tmp")
        table.to_csv(tmp, index=False, float_format="%.5g")
        tmp.replace(target)
