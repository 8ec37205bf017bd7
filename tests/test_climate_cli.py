"""The climate plugin from the command line: a training run's directory, a trained run predicting another tool's
regional file on its own grid, semi-supervised training, and bad data."""
import json

import netCDF4
import numpy as np
import pytest
import torch
import xarray as xr
from conftest import sciml
from test_climate_data import write_files

from sciml_plugins.climate.generate import Generator, GeneratorConfig
from sciml_plugins.climate.model import ClimateUNet

FAST = ["model.widths=[8,16]", "data.batch_size=4", "callbacks.progress_bar=null",
        "trainer.enable_model_summary=false", "data.num_maps=2"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("climate_cli")
    write_files(folder, files=2, steps=10, nlat=32, nlon=48)
    return folder


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, data_dir):
    run_dir = tmp_path_factory.mktemp("runs") / "climate"
    result = sciml("+plugin=climate", f"data.path={data_dir}", f"hydra.run.dir={run_dir}", *FAST,
                   "trainer.max_epochs=3")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir


def test_run_directory(trained_run, data_dir):
    metrics = json.loads((trained_run / "metrics.json").read_text())
    for key in ("test/iou_tc", "test/iou_ar", "test/miou", "test/precision_tc", "test/recall_ar", "val/miou"):
        assert 0 <= metrics[key] <= 1, key
    state = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=False)["ClimateDataModule"]
    assert state["variables"] == ["TMQ", "U850", "V850", "PSL"] and 50000 < state["mean"][3] < 110000
    preds = sorted((trained_run / "predictions").glob("*_pred.nc"))
    assert [p.name for p in preds] == ["part_0_pred.nc", "part_1_pred.nc"]
    n = 0
    for pred in preds:
        out = xr.open_dataset(pred)
        src = xr.open_dataset(data_dir / pred.name.replace("_pred", ""))
        np.testing.assert_array_equal(out["lat"], src["lat"])
        np.testing.assert_array_equal(out["lon"], src["lon"])
        assert set(out["time"].values) <= set(src["time"].values)
        np.testing.assert_array_equal(out["LABELS"], src["LABELS"].sel(time=out["time"]))
        p = out["PROB_TC"] + out["PROB_AR"]
        assert float(p.min()) >= 0 and float(p.max()) <= 1 + 1e-5
        assert out["LABELS_PRED"].attrs["flag_meanings"] == "background tropical_cyclone atmospheric_river"
        n += out.sizes["time"]
    assert n == round(0.15 * 20)
    assert (trained_run / "plots" / "map_0.png").read_bytes()[:4] == b"\x89PNG"


def regional_file(path, labels=True):
    """Another tool's file: written with netCDF4 directly, a regional 0-60 N, 160-20 W box on a 1 x 1.5 degree grid
    (not a multiple of the network stride), latitudes north to south, longitudes -180..180, int64 labels, and an
    extra variable."""
    gen = Generator(GeneratorConfig(nlat=181, nlon=240))
    lat_sel = np.flatnonzero((gen.lat >= 0) & (gen.lat <= 60))[::-1]
    lon_sel = np.flatnonzero((gen.lon >= 200) & (gen.lon <= 340))
    snaps = [gen.snapshot(np.random.default_rng(s)) for s in (11, 12)]
    with netCDF4.Dataset(path, "w") as nc:
        nc.createDimension("time", None)
        nc.createDimension("lat", len(lat_sel))
        nc.createDimension("lon", len(lon_sel))
        t = nc.createVariable("time", "f8", ("time",))
        t.units, t.calendar = "days since 1996-06-09", "standard"
        t[:] = [0.0, 0.25]
        nc.createVariable("lat", "f4", ("lat",))[:] = gen.lat[lat_sel]
        nc.createVariable("lon", "f4", ("lon",))[:] = gen.lon[lon_sel] - 360.0
        for name in ("T200", "PSL", "TMQ", "V850", "U850"):
            values = np.stack([s[0].get(name, s[0]["TMQ"])[np.ix_(lat_sel, lon_sel)] for s in snaps])
            nc.createVariable(name, "f4", ("time", "lat", "lon"))[:] = values
        if labels:
            nc.createVariable("LABELS", "i8", ("time", "lat", "lon"))[:] = np.stack(
                [s[1][np.ix_(lat_sel, lon_sel)] for s in snaps])
    return path


def test_trained_run_predicts_a_regional_file_on_its_own_grid(trained_run, tmp_path):
    user_file = regional_file(tmp_path / "region.nc")
    out = tmp_path / "eval"
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    result = sciml("+plugin=climate", "train=false", f"ckpt_path={ckpt}", f"data.test_path={user_file}",
                   f"hydra.run.dir={out}", *FAST)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert "test/iou_ar" in metrics and not any(k.startswith("train/") for k in metrics)
    pred = xr.open_dataset(out / "predictions" / "region_pred.nc")
    src = xr.open_dataset(user_file)
    assert pred["LABELS_PRED"].dims == ("time", "lat", "lon") and pred.sizes == src.sizes
    np.testing.assert_array_equal(pred["lat"], src["lat"])  # north to south, as in the input
    np.testing.assert_array_equal(pred["lon"], src["lon"])  # -160 .. -20, as in the input
    np.testing.assert_array_equal(pred["time"], src["time"])
    # the same network, applied here to the file as read by xarray and normalised with the checkpoint's statistics
    state = torch.load(ckpt, weights_only=False)
    net = ClimateUNet(widths=[8, 16])
    net.load_state_dict({k.removeprefix("model."): v for k, v in state["state_dict"].items()
                         if k.startswith("model.")})
    stats = state["ClimateDataModule"]
    x = torch.tensor(np.stack([src[v].values for v in stats["variables"]], 1))
    x = (x - torch.tensor(stats["mean"]).view(1, -1, 1, 1)) / torch.tensor(stats["std"]).view(1, -1, 1, 1)
    with torch.no_grad():
        expected = net.eval()(x).argmax(1).numpy()
    assert (pred["LABELS_PRED"].values == expected).mean() > 0.999


def test_unlabelled_file_is_predicted_not_scored(trained_run, tmp_path):
    user_file = regional_file(tmp_path / "new_model_output.nc", labels=False)
    out = tmp_path / "eval"
    result = sciml("+plugin=climate", "train=false", f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}",
                   f"data.test_path={user_file}", f"hydra.run.dir={out}", *FAST)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "predictions only, no test metrics" in result.stdout + result.stderr
    assert not any(k.startswith("test/") for k in json.loads((out / "metrics.json").read_text()))
    pred = xr.open_dataset(out / "predictions" / "new_model_output_pred.nc")
    src = xr.open_dataset(user_file)
    assert "LABELS" not in pred and pred["LABELS_PRED"].shape == (2, src.sizes["lat"], src.sizes["lon"])
    assert (out / "plots" / "map_0.png").is_file()


def test_semi_supervised_run(data_dir, tmp_path):
    run_dir = tmp_path / "semi"
    result = sciml("+plugin=climate", f"data.path={data_dir}", "data.labeled_fraction=0.2", "trainer.max_epochs=1",
                   f"hydra.run.dir={run_dir}", *FAST)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train/reconstruction_loss"] > 0 and "test/miou" in metrics


def test_bad_file_is_one_line_and_nothing_written(tmp_path, data_dir):
    bad = tmp_path / "bad.nc"
    xr.open_dataset(data_dir / "part_0.nc").drop_vars("V850").to_netcdf(bad)
    result = sciml("+plugin=climate", f"data.path={bad}", f"hydra.run.dir={tmp_path / 'run'}", *FAST)
    assert result.returncode != 0
    assert f"{bad}: missing variable 'V850'" in result.stderr + result.stdout
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "metrics.json").exists()
