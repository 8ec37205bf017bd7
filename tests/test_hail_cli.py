"""The hail plugin from the command line: classification and regression on patches, the tabular mode on the real
storm table with an unseen day as data.test_path, test-only runs from a checkpoint, and errors."""
import json

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from conftest import sciml

from sciml_plugins.hail import simulate
from sciml_plugins.hail.storms import DEFAULT_DIR

QUICK = ["callbacks.progress_bar=null", "trainer.enable_model_summary=false", "trainer.max_epochs=2"]
CNN = ["model.widths=[8,16]", *QUICK]


@pytest.fixture(scope="module")
def patch_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("patches")
    simulate.simulate(out, patches_per_storm=0.3, seed=5)
    return out


def _metrics(run_dir):
    return json.loads((run_dir / "metrics.json").read_text())


def test_patch_classification_run(patch_dir, tmp_path):
    run_dir = tmp_path / "cls"
    result = sciml("+plugin=hail", f"data.path={patch_dir}", f"hydra.run.dir={run_dir}", *CNN)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = _metrics(run_dir)
    for key in ("test/auc", "test/bss", "test/brier", "test/csi", "test/csi_threshold", "val/auc", "val/loss"):
        assert isinstance(metrics[key], float), key
    assert 0 <= metrics["test/brier"] <= 1 and metrics["test/bss"] <= 1
    for plot in ("reliability.png", "performance.png", "roc.png", "training_curves.png"):
        assert (run_dir / "plots" / plot).read_bytes()[:4] == b"\x89PNG", plot
    with xr.open_dataset(run_dir / "predictions" / "test_predictions.nc") as ds:
        prob = ds["probability_severe"].values
        assert ((prob >= 0) & (prob <= 1)).all()
        assert set(np.unique(ds["run_date"].values)) == {"2015-06-02", "2015-06-03"}, "the last two days test"
        assert set(np.unique(ds["observed"].values)) <= {0, 1}
        first = ds.isel(p=0)
        with xr.open_dataset(str(first["file"].values)) as source:
            size = float(source["HAIL_MAXK1_future"].isel(p=int(first["row_in_file"])).max()) * 1000
        assert int(first["observed"]) == int(size >= 25), "predictions trace back to their patch"


@pytest.mark.slow
def test_patch_regression_run(patch_dir, tmp_path):
    run_dir = tmp_path / "reg"
    result = sciml("+plugin=hail", "hail/target=regression", f"data.path={patch_dir}", f"hydra.run.dir={run_dir}",
                   *CNN)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = _metrics(run_dir)
    for key in ("test/mae", "test/rmse", "test/r2", "test/auc", "test/bss", "test/csi"):
        assert isinstance(metrics[key], float), key
    assert metrics["test/rmse"] >= metrics["test/mae"] > 0
    with xr.open_dataset(run_dir / "predictions" / "test_predictions.nc") as ds:
        observed, predicted = ds["observed"].values, ds["predicted_size_mm"].values
        assert ds["observed"].attrs["units"] == "mm" and (ds["predicted_size_std_mm"] > 0).all()
        assert np.mean(np.abs(predicted - observed)) == pytest.approx(metrics["test/mae"], rel=1e-3)
    assert (run_dir / "plots" / "regression.png").is_file() and (run_dir / "plots" / "reliability.png").is_file()


def _write_day_csv(path, day="20150604", seed=0):
    """A forecast day in hagelslag's track_step layout: a real day's storms, jittered, renamed to `day`, with a
    missing-value code (-9999) where the real table has them."""
    rng = np.random.default_rng(seed)
    table = pd.read_csv(sorted(DEFAULT_DIR.glob("track_step_SSEF_*.csv"))[3]).head(60)
    for column in ("Step_ID", "Track_ID", "Date"):
        table[column] = table[column].str.replace("20150525", day).str.replace("2015-05-25", "2015-06-04")
    numeric = [c for c in table.columns if c.endswith(("_mean", "_max", "_min", "_std"))]
    table[numeric] = table[numeric] * rng.uniform(0.9, 1.1, (len(table), len(numeric)))
    table.loc[:4, "sph850_mean"] = -9999.0
    table["Hail_Size"] = np.where(rng.random(len(table)) < 0.7, rng.uniform(25, 60, len(table)), 0.0)
    table.to_csv(path, index=False)
    return table


def test_tabular_mode_evaluates_an_unseen_day(tmp_path):
    """Train on the embedded real days, evaluate an unseen day's CSV given as data.test_path, then again from the
    checkpoint with train=false; the skill score's reference is the training days' climatology."""
    unseen = tmp_path / "track_step_SSEF_wrf-s3cn_arw_20150604.csv"
    written = _write_day_csv(unseen)
    run_dir = tmp_path / "tab"
    result = sciml("+plugin=hail", "hail/data=storms", f"data.test_path={unseen}", f"hydra.run.dir={run_dir}",
                   *QUICK)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = _metrics(run_dir)
    assert {"test/auc", "test/bss", "test/bss_sample", "test/brier"} <= set(metrics)
    table = pd.read_csv(run_dir / "predictions" / "test_predictions.csv")
    assert len(table) == len(written) and set(table["run_day"]) == {"2015-06-04"}
    assert table["probability_severe"].between(0, 1).all(), "missing-value codes are filled, not propagated"
    assert (table["observed_severe"] == (written["Hail_Size"] >= 25)).all()
    out = tmp_path / "eval"
    evaluated = sciml("+plugin=hail", "hail/data=storms", "train=false",
                      f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", f"data.test_path={unseen}",
                      f"hydra.run.dir={out}", *QUICK)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    again = _metrics(out)
    assert not any(k.startswith("train/") for k in again)
    # with test_path all shipped days but the two validation days (06-02, 06-03) train
    files = sorted(DEFAULT_DIR.glob("track_step_SSEF_*.csv"))
    climatology = float(np.mean(pd.concat([pd.read_csv(f) for f in files[:-2]])["Hail_Size"] >= 25))
    observed = written["Hail_Size"] >= 25
    assert again["test/bss"] == pytest.approx(1 - again["test/brier"] / np.mean((climatology - observed) ** 2),
                                              abs=1e-4), "BSS against the training climatology from the checkpoint"
    assert again["test/bss_sample"] == pytest.approx(1 - again["test/brier"] / np.var(observed), abs=1e-4)


def test_bad_patch_file_is_one_line_error(patch_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    with xr.open_dataset(sorted(patch_dir.glob("*.nc"))[0]) as ds:
        ds.drop_vars("T500_curr").to_netcdf(broken / "hail_patches_20150520.nc")
    result = sciml("+plugin=hail", f"data.path={broken}", f"hydra.run.dir={tmp_path / 'run'}", *CNN)
    assert result.returncode != 0
    text = result.stdout + result.stderr
    assert "Traceback" not in text
    assert any("hail_patches_20150520.nc: missing variable(s) T500_curr" in line for line in text.splitlines())
