"""The climate plugin from the command line: a training run's directory; `python -m sciml predict` with the
checkpoint alone, from another directory, on an unlabelled regional file of another tool (predicted on its own
grid, not scored) and on ClimateNet's own one-time-step files with 2-D LABELS (predicted and scored); the
`train=false ckpt_path=` form; on 2 DDP ranks the same test metrics and every test row predicted once;
semi-supervised training; bad data."""
import json

import netCDF4
import numpy as np
import pytest
import torch
import xarray as xr
from conftest import sciml
from test_climate_data import climatenet_file, write_files

from sciml_plugins.climate.data import ClimateDataModule
from sciml_plugins.climate.generate import Generator, GeneratorConfig
from sciml_plugins.climate.model import ClimateUNet

FAST = ["model.widths=[8,16]", "data.batch_size=4", "callbacks.progress_bar=null",
        "trainer.enable_model_summary=false", "data.num_maps=2"]


def _ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("climate_cli")
    write_files(folder, files=2, steps=10, nlat=32, nlon=48)
    return folder


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, data_dir):
    run_dir = tmp_path_factory.mktemp("runs") / "climate"
    _ok(sciml("+plugin=climate", f"data.path={data_dir}", f"hydra.run.dir={run_dir}", *FAST, "trainer.max_epochs=3"))
    return run_dir


def best_checkpoint(run_dir):
    (best,) = (run_dir / "checkpoints").glob("best-*.ckpt")
    return best


def test_run_directory(trained_run, data_dir):
    metrics = json.loads((trained_run / "metrics.json").read_text())
    for key in ("test/iou_tc", "test/iou_ar", "test/miou", "test/precision_tc", "test/recall_ar", "val/miou",
                "val/miou_best"):
        assert 0 <= metrics[key] <= 1, key
    state = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=False)["ClimateDataModule"]
    assert state["normalize"] == "standard" and 50000 < float(state["normalizer"]["mean"][3]) < 110000  # PSL, Pa
    preds = sorted((trained_run / "predictions").glob("*_pred.nc"))
    assert {p.name for p in preds} <= {"part_0_pred.nc", "part_1_pred.nc"}
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
    maps = sorted((trained_run / "plots").glob("map_*.png"))
    assert len(maps) == 2 and maps[0].read_bytes()[:4] == b"\x89PNG"


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


def test_predict_command_on_an_unlabelled_regional_file(trained_run, tmp_path):
    """The checkpoint alone, from another working directory, into a fresh directory: predicted, not scored."""
    user_file = regional_file(tmp_path / "new_model_output.nc", labels=False)
    elsewhere, out = tmp_path / "elsewhere", tmp_path / "fresh"
    elsewhere.mkdir()
    ckpt = best_checkpoint(trained_run)
    _ok(sciml("predict", str(ckpt), str(user_file), "-o", str(out), cwd=elsewhere))
    assert not any(elsewhere.iterdir())
    assert not any(k.startswith("test/") for k in json.loads((out / "metrics.json").read_text()))
    pred = xr.open_dataset(out / "predictions" / "new_model_output_pred.nc")
    src = xr.open_dataset(user_file)
    assert "LABELS" not in pred and pred["LABELS_PRED"].dims == ("time", "lat", "lon") and pred.sizes == src.sizes
    np.testing.assert_array_equal(pred["lat"], src["lat"])  # north to south, as in the input
    np.testing.assert_array_equal(pred["lon"], src["lon"])  # -160 .. -20, as in the input
    np.testing.assert_array_equal(pred["time"], src["time"])
    assert len(list((out / "plots").glob("map_new_model_output_*.png"))) == 2
    # the same network, applied here to the file as read by xarray and normalised with the checkpoint's statistics
    state = torch.load(ckpt, weights_only=False)
    net = ClimateUNet(input_shape=(4, 32, 48), widths=[8, 16])
    net.load_state_dict({k.removeprefix("model."): v for k, v in state["state_dict"].items()
                         if k.startswith("model.")})
    stats = state["ClimateDataModule"]["normalizer"]
    x = torch.tensor(np.stack([src[v].values for v in ("TMQ", "U850", "V850", "PSL")], 1))
    x = (x - stats["mean"].view(1, -1, 1, 1)) / stats["std"].view(1, -1, 1, 1)
    with torch.no_grad():
        expected = net.eval()(x).argmax(1).numpy()
    assert (pred["LABELS_PRED"].values == expected).mean() > 0.999


def test_climatenet_files_with_2d_labels_are_predicted_and_scored(trained_run, data_dir, tmp_path):
    """ClimateNet's own layout: one time step per file, LABELS (lat, lon); with a time dimension of length 1 and
    without one. Both are predicted on their own coordinates and scored."""
    src = data_dir / "part_1.nc"
    files = [climatenet_file(tmp_path / "data-2000-01-03-12-1_0.nc", src, 0),
             climatenet_file(tmp_path / "data-2000-01-03-18-1_0.nc", src, 1, time=False)]
    out = tmp_path / "scored"
    _ok(sciml("predict", str(best_checkpoint(trained_run)), *map(str, files), "-o", str(out), cwd=tmp_path))
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["test/miou"] <= 1 and "test/iou_tc" in metrics
    for path in files:
        pred = xr.open_dataset(out / "predictions" / f"{path.stem}_pred.nc")
        inp = xr.open_dataset(path)
        np.testing.assert_array_equal(pred["lat"], inp["lat"])
        np.testing.assert_array_equal(pred["lon"], inp["lon"])
        np.testing.assert_array_equal(pred["LABELS"].values.reshape(inp["LABELS"].shape), inp["LABELS"].values)
        if "time" in inp.dims:  # the input's own time, decoded by xarray from the units it carries
            assert pred["LABELS_PRED"].dims == ("time", "lat", "lon") and pred["time"].equals(inp["time"])
        else:
            assert pred["LABELS_PRED"].dims == ("lat", "lon") and "time" not in pred.dims


# Evaluation one row per batch: the class-weighted loss of a batch depends on which rows share it, the counts behind
# the IoUs do not. With single rows the loss of 2 ranks is that of one process too.
EVAL = ["train=false", "data.eval_batch_size=1", "callbacks.progress_bar=null"]


@pytest.fixture(scope="module")
def one_process_test(trained_run, tmp_path_factory):
    """The `train=false ckpt_path=` form: data, model and task config come from the checkpoint."""
    out = tmp_path_factory.mktemp("tested") / "one"
    _ok(sciml("+plugin=climate", *EVAL, f"ckpt_path={best_checkpoint(trained_run)}", f"hydra.run.dir={out}"))
    return out


def test_test_only_run(one_process_test, trained_run):
    metrics = json.loads((one_process_test / "metrics.json").read_text())
    assert not any(k.startswith("train/") for k in metrics)
    trained = json.loads((trained_run / "metrics.json").read_text())
    for key in ("test/miou", "test/iou_tc", "test/iou_ar"):  # the training run tested the same checkpoint
        assert metrics[key] == pytest.approx(trained[key], rel=1e-6), key


def test_two_ranks_score_and_predict_like_one(trained_run, one_process_test, data_dir, tmp_path):
    """The same checkpoint tested on 2 CPU ranks: the test metrics of one process, and every test time step
    predicted exactly once."""
    out = tmp_path / "ddp"
    _ok(sciml("+plugin=climate", *EVAL, f"ckpt_path={best_checkpoint(trained_run)}", "strategy=ddp",
              "trainer.devices=2", "trainer.accelerator=cpu", f"hydra.run.dir={out}", timeout=300))
    one = json.loads((one_process_test / "metrics.json").read_text())
    two = json.loads((out / "metrics.json").read_text())
    tested = sorted(k for k in one if k.startswith("test/"))
    assert tested and tested == sorted(k for k in two if k.startswith("test/"))
    for key in (k for k in tested if "_ci_" not in k and "ks_pvalue" not in k):  # intervals resample in gathered order; KS uses rank 0's training shard
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-7), key
    dm = ClimateDataModule(reader="sciml_plugins.climate.reader.ClimateNetReader", path=str(data_dir))
    dm.setup("test")
    times = {f.name: xr.open_dataset(f, decode_times=False)["time"].values for f in sorted(data_dir.glob("*.nc"))}
    predicted = []
    for pred in sorted((out / "predictions").glob("*_pred.nc")):
        name = pred.name.replace("_pred", "")
        offset = 0 if name == "part_0.nc" else len(times["part_0.nc"])
        t = xr.open_dataset(pred, decode_times=False)["time"].values
        predicted += [offset + int(np.flatnonzero(times[name] == v)[0]) for v in t]
    assert sorted(predicted) == dm.split_rows["test"].tolist() and len(predicted) == len(set(predicted))
    log = (out / "climate_rank1.log").read_text()
    assert "data (rank 1 of 2): train 7, val 1, test 1" in log and "1 rows of 2 file(s): held in memory" in log


def test_semi_supervised_run(data_dir, tmp_path):
    run_dir = tmp_path / "semi"
    _ok(sciml("+plugin=climate", f"data.path={data_dir}", "data.labeled_fraction=0.2", "trainer.max_epochs=1",
              f"hydra.run.dir={run_dir}", *FAST))
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
