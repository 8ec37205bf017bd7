"""The hail plugin from the command line: classification and regression on patches, predicting an unlabelled file
with the checkpoint alone, the tabular mode on the real storm table with an unseen day as data.test_path (scored by
`predict`), two DDP ranks against one process, and errors."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
from conftest import sciml

from sciml_plugins.hail import simulate
from sciml_plugins.hail.data import data_module
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


@pytest.fixture(scope="module")
def patch_run(patch_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "cls"
    result = sciml("+plugin=hail", f"data.path={patch_dir}", f"hydra.run.dir={run_dir}", *CNN)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir


def best(run_dir):
    return next((run_dir / "checkpoints").glob("best-*.ckpt"))


def test_patch_classification_run(patch_run, patch_dir):
    metrics = _metrics(patch_run)
    for key in ("test/auc", "test/bss", "test/brier", "test/csi", "test/csi_threshold", "val/auc", "val/loss",
                "val/loss_best"):
        assert isinstance(metrics[key], float), key
    assert 0 <= metrics["test/brier"] <= 1 and metrics["test/bss"] <= 1
    for plot in ("reliability.png", "performance.png", "roc.png", "training_curves.png"):
        assert (patch_run / "plots" / plot).read_bytes()[:4] == b"\x89PNG", plot
    written = sorted(p.name for p in (patch_run / "predictions").iterdir())
    assert written == ["hail_patches_20150602_predictions.nc", "hail_patches_20150603_predictions.nc"], \
        "one file per input file of the test days (the last two)"
    for name in written:
        source = patch_dir / name.replace("_predictions", "")
        with xr.open_dataset(patch_run / "predictions" / name) as ds, xr.open_dataset(source) as src:
            prob = ds["probability_severe"].values
            assert ((prob >= 0) & (prob <= 1)).all()
            assert ds.attrs["source_file"] == str(source)
            assert (ds["row_in_file"].values == np.arange(src.sizes["p"])).all(), "every test patch once, in order"
            for var in ("run_date", "track_id", "centroid_lon", "centroid_lat", "forecast_hour"):
                assert (ds[var].values == src[var].values).all(), var
            size = src["HAIL_MAXK1_future"].max(dim=("row", "col")).values.astype(np.float32) * 1000
            assert (ds["observed"].values == (size >= 25)).all(), "predictions trace back to their patch"


def test_predict_an_unlabelled_file_with_the_checkpoint_alone(patch_run, patch_dir, tmp_path):
    """From another working directory, into a fresh directory: nothing but the checkpoint and the new file."""
    source = sorted(patch_dir.glob("*.nc"))[4]
    unlabelled = tmp_path / "new_day.nc"
    with xr.open_dataset(source) as ds:
        ds.drop_vars("HAIL_MAXK1_future").to_netcdf(unlabelled)
    elsewhere, out = tmp_path / "elsewhere", tmp_path / "fresh" / "out"
    elsewhere.mkdir()
    result = sciml("predict", str(best(patch_run)), str(unlabelled), "-o", str(out), "callbacks.progress_bar=null",
                   cwd=elsewhere)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert not any(elsewhere.iterdir()), "nothing written outside the output directory"
    assert not any(k.startswith("test/") for k in _metrics(out)), "unlabelled: predicted, not scored"
    with xr.open_dataset(out / "predictions" / "new_day_predictions.nc") as ds, xr.open_dataset(unlabelled) as src:
        assert ds.sizes["p"] == src.sizes["p"] and "observed" not in ds
        for var in ("run_date", "track_id", "centroid_lon", "centroid_lat"):
            assert (ds[var].values == src[var].values).all(), var
        assert ((ds["probability_severe"] >= 0) & (ds["probability_severe"] <= 1)).all()


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
    parts = [xr.load_dataset(f) for f in sorted((run_dir / "predictions").glob("*_predictions.nc"))]
    with xr.concat(parts, dim="p") as ds:
        observed, predicted = ds["observed"].values, ds["predicted_size_mm"].values
        assert ds["observed"].attrs["units"] == "mm" and (ds["predicted_size_std_mm"] > 0).all()
        assert np.mean(np.abs(predicted - observed)) == pytest.approx(metrics["test/mae"], rel=1e-3)
    assert (run_dir / "plots" / "regression.png").is_file() and (run_dir / "plots" / "reliability.png").is_file()


def _write_day_csv(path, day="20150604", seed=0, rows=61):
    """A forecast day in hagelslag's track_step layout: a real day's storms, jittered, renamed to `day`, with a
    missing-value code (-9999) where the real table has them. An odd number of rows: 2 ranks cannot split it evenly."""
    rng = np.random.default_rng(seed)
    table = pd.read_csv(sorted(DEFAULT_DIR.glob("track_step_SSEF_*.csv"))[3]).head(rows)
    for column in ("Step_ID", "Track_ID", "Date"):
        table[column] = table[column].str.replace("20150525", day).str.replace("2015-05-25", "2015-06-04")
    numeric = [c for c in table.columns if c.endswith(("_mean", "_max", "_min", "_std"))]
    table[numeric] = table[numeric] * rng.uniform(0.9, 1.1, (len(table), len(numeric)))
    table.loc[:4, "sph850_mean"] = -9999.0
    table["Hail_Size"] = np.where(rng.random(len(table)) < 0.7, rng.uniform(25, 60, len(table)), 0.0)
    table.to_csv(path, index=False)
    return table


UNSEEN = "track_step_SSEF_wrf-s3cn_arw_20150604.csv"
PREDICTED = UNSEEN.replace(".csv", "_predictions.csv")


def test_tabular_mode_evaluates_an_unseen_day(tmp_path):
    """Train on the embedded real days, evaluate an unseen day's CSV given as data.test_path, then score it again
    with `python -m sciml predict` and the checkpoint alone; the skill score's reference is the training days'
    climatology, which the checkpoint carries."""
    unseen = tmp_path / UNSEEN
    written = _write_day_csv(unseen)
    run_dir = tmp_path / "tab"
    result = sciml("+plugin=hail", "hail/data=storms", f"data.test_path={unseen}", f"hydra.run.dir={run_dir}",
                   *QUICK)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = _metrics(run_dir)
    assert {"test/auc", "test/bss", "test/bss_sample", "test/brier", "val/loss_best"} <= set(metrics)
    table = pd.read_csv(run_dir / "predictions" / PREDICTED)
    assert len(table) == len(written) and set(table["run_day"]) == {"2015-06-04"}
    assert (table["Step_ID"] == written["Step_ID"]).all() and (table["row_in_file"] == np.arange(len(written))).all()
    assert table["probability_severe"].between(0, 1).all(), "missing-value codes are filled, not propagated"
    assert (table["observed_severe"] == (written["Hail_Size"] >= 25)).all()
    out, elsewhere = tmp_path / "eval", tmp_path / "elsewhere"
    elsewhere.mkdir()
    evaluated = sciml("predict", str(best(run_dir)), str(unseen), "-o", str(out), *QUICK[:1], cwd=elsewhere)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    again = _metrics(out)
    assert not any(k.startswith("train/") for k in again) and "test/auc" in again, "a labelled file is scored"
    assert again["test/auc"] == pytest.approx(metrics["test/auc"], abs=1e-6), "the best checkpoint, both times"
    # with test_path all shipped days but the two validation days (06-02, 06-03) train
    files = sorted(DEFAULT_DIR.glob("track_step_SSEF_*.csv"))
    climatology = float(np.mean(pd.concat([pd.read_csv(f) for f in files[:-2]])["Hail_Size"] >= 25))
    observed = written["Hail_Size"] >= 25
    assert again["test/bss"] == pytest.approx(1 - again["test/brier"] / np.mean((climatology - observed) ** 2),
                                              abs=1e-4), "BSS against the training climatology from the checkpoint"
    assert again["test/bss_sample"] == pytest.approx(1 - again["test/brier"] / np.var(observed), abs=1e-4)


def test_two_ranks_fit_the_statistics_of_one_and_score_every_row_once(tmp_path):
    """DDP on 2 CPU processes: the normaliser (medians, quantiles, moments of the whole training split, each rank
    holding half) and the climatology equal one process's; test metrics from the same checkpoint equal one
    process's; the predictions hold each of the unseen day's 61 rows exactly once."""
    unseen = tmp_path / UNSEEN
    _write_day_csv(unseen)
    ddp_dir, one_dir = tmp_path / "ddp", tmp_path / "one"
    ddp = sciml("+plugin=hail", "hail/data=storms", f"data.test_path={unseen}", f"hydra.run.dir={ddp_dir}",
                "strategy=ddp", "trainer.accelerator=cpu", "trainer.devices=2", *QUICK[:2], "trainer.max_epochs=1")
    assert ddp.returncode == 0, ddp.stdout[-3000:] + ddp.stderr[-3000:]
    single = data_module("hail/data=storms", f"data.test_path={unseen}")
    single.setup("fit")
    saved = torch.load(best(ddp_dir), weights_only=False)["HailDataModule"]
    assert saved["climatology"] == pytest.approx(single.climatology, abs=1e-12)
    for name, value in single.normalizer.state_dict().items():
        np.testing.assert_allclose(saved["normalizer"][name].numpy(), value.numpy(), rtol=1e-5, atol=1e-6)
    one = sciml("+plugin=hail", "hail/data=storms", "train=false", f"ckpt_path={best(ddp_dir)}",
                f"data.test_path={unseen}", f"hydra.run.dir={one_dir}", *QUICK[:2])
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    by_two, by_one = _metrics(ddp_dir), _metrics(one_dir)
    tested = [k for k in by_one if k.startswith("test/") and "_ci_" not in k and "ks_pvalue" not in k]  # intervals resample in gathered order; KS uses rank 0's training shard
    assert len(tested) >= 8
    for key in tested:
        assert by_two[key] == pytest.approx(by_one[key], abs=1e-5), key
    two_rows, one_rows = (pd.read_csv(d / "predictions" / PREDICTED) for d in (ddp_dir, one_dir))
    assert (two_rows["row_in_file"] == np.arange(61)).all(), "every row once, none padded"
    np.testing.assert_allclose(two_rows["probability_severe"], one_rows["probability_severe"], atol=1e-4)


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


def test_test_groups_with_test_path_is_one_line_error(tmp_path):
    """Both choose the test data: the named day would leave training without being tested."""
    result = sciml("+plugin=hail", "hail/data=storms", "data.test_groups=[2015-05-20]",
                   f"data.test_path={tmp_path / UNSEEN}", f"hydra.run.dir={tmp_path / 'run'}", *QUICK)
    assert result.returncode != 0
    lines = [line for line in (result.stdout + result.stderr).splitlines() if "ERROR" in line]
    assert len(lines) == 1 and lines[0].endswith(
        "data.test_groups and data.test_path both choose the test data: give one of them"), lines
