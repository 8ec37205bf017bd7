"""The hail plugin from the command line: classification and regression on patches, the tabular mode on the real
storm table with an unseen day as data.test_path, test-only runs from a checkpoint, and errors."""
import json
import shutil

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


def test_tabular_mode_evaluates_an_unseen_day(tmp_path):
    """Train on ten real days, evaluate a held-out day given as data.test_path, then again from the checkpoint."""
    days = tmp_path / "days"
    days.mkdir()
    files = sorted(DEFAULT_DIR.glob("track_step_SSEF_*.csv"))
    for f in files[:-1]:
        shutil.copy(f, days)
    unseen = files[-1]
    run_dir = tmp_path / "tab"
    result = sciml("+plugin=hail", "hail/data=storms", f"data.path={days}", f"data.test_path={unseen}",
                   f"hydra.run.dir={run_dir}", *QUICK)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = _metrics(run_dir)
    assert {"test/auc", "test/bss", "test/brier"} <= set(metrics)
    table = pd.read_csv(run_dir / "predictions" / "test_predictions.csv")
    assert len(table) == len(pd.read_csv(unseen)) and set(table["run_day"]) == {"2015-06-03"}
    out = tmp_path / "eval"
    evaluated = sciml("+plugin=hail", "hail/data=storms", "train=false", f"data.path={days}",
                      f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", f"data.test_path={unseen}",
                      f"hydra.run.dir={out}", *QUICK)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    again = _metrics(out)
    assert not any(k.startswith("train/") for k in again)
    climatology = float(np.mean(pd.concat([pd.read_csv(f) for f in files[:-3]])["Hail_Size"] >= 25))
    brier_clim = np.mean((climatology - table["observed_severe"]) ** 2)
    assert again["test/bss"] == pytest.approx(1 - again["test/brier"] / brier_clim, abs=1e-4), \
        "BSS against the training days' climatology, restored from the checkpoint"


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
