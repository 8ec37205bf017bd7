"""Hail plugin: the patch generator, the patch and storm-table readers, the day split, the storm normaliser, the
verification scores."""
import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
from scipy.stats import norm
from sklearn.metrics import brier_score_loss, roc_auc_score

from sciml.data import RowStore
from sciml.errors import SciMLError
from sciml_plugins.hail import simulate
from sciml_plugins.hail.data import data_module
from sciml_plugins.hail.patches import PatchReader
from sciml_plugins.hail.storms import TARGET, StormReader, read_storms, resolve_csvs
from sciml_plugins.hail.verification import ForecastVerification

VARIABLES = list(simulate.FIELDS)


@pytest.fixture(scope="module")
def sim_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("patches")
    simulate.simulate(out, patches_per_storm=0.5, seed=3)
    return out


def read_all(path, **options):
    """Every row of the patch files at `path` through the plugin's reader (as the core's row store reads them)."""
    reader = PatchReader(**{"variables": VARIABLES, **options})
    store = RowStore(reader, reader.find(path, "data.path"))
    return store.read(np.arange(len(store)))


def test_generator_writes_the_patch_layout(sim_dir):
    files = sorted(sim_dir.glob("*.nc"))
    assert [f.name for f in files][:2] == ["hail_patches_20150520.nc", "hail_patches_20150521.nc"]
    assert len(files) == 11, "one file per real run day"
    with xr.open_dataset(files[3]) as ds:
        assert ds["REFL_COM_curr"].dims == ("p", "row", "col") and ds.sizes["row"] == ds.sizes["col"] == 32
        assert ds["HAIL_MAXK1_future"].attrs["units"] == "m"
        assert ds["U10_curr"].attrs["units"] == "m s-1"
        assert 0 <= float(ds["REFL_COM_curr"].min()) and float(ds["REFL_COM_curr"].max()) <= 80
        assert (ds["TD2_curr"] <= ds["T2_curr"] + 0.1).all(), "dew point above temperature"
        assert str(ds["run_date"].values[0])[:10] == "2015-05-25"
        t2 = ds["T2_curr"].values
        assert 270 < t2.mean() < 310, "2 m temperature in kelvin"


def test_generated_sizes_follow_the_real_distribution(sim_dir):
    size_mm = read_all(sim_dir, target_mode="regression", max_size_mm=None)["y"]
    real = read_storms(resolve_csvs(None), [], simulate.MAX_SIZE_MM)[TARGET].to_numpy()
    for q in (0.25, 0.5, 0.75, 0.9):  # quantile mapping onto the real table (0.1 mm packing)
        assert abs(np.quantile(size_mm, q) - np.quantile(real, q)) < 2.0, q
    assert abs(np.mean(size_mm >= 25) - np.mean(real >= 25)) < 0.03


def test_hail_proxy_is_physical():
    """More CAPE and more updraft helicity make larger hail, a higher freezing level smaller hail."""
    base = pd.DataFrame({c: np.full(400, v) for c, v in
                         {"mlcape_mean": 1500.0, "uh_max_max": 100.0, "tmp500_mean": -11.0, "tmp700_mean": 7.0,
                          "r10cmx_max": 60.0, "meso_strength": 1.0}.items()})
    rng = np.random.default_rng(0)
    for column in base.columns:  # a little spread everywhere, for the standardisation
        base[column] += rng.normal(0, 1e-3 * abs(base[column].iloc[0]), 400)
    for column, delta, sign in (("mlcape_mean", 1000.0, 1), ("uh_max_max", 100.0, 1), ("tmp700_mean", 3.0, -1),
                                ("meso_strength", 1.0, 1)):
        changed = base.copy()
        changed.loc[200:, column] += delta * np.linspace(0.5, 1, 200)
        index = simulate.hail_proxy(changed, np.random.default_rng(1), noise=0.0)
        assert sign * (index[200:].mean() - index[:200].mean()) > 0, column


def test_mesocyclone_strength_shows_only_in_the_spatial_structure():
    """The storm's mesocyclone strength (which drives hail size) changes the rotation couplet, not the patch means:
    the signal a CNN can use and storm-mean predictors cannot."""
    table = read_storms(resolve_csvs(None), simulate.DRAWN + ["Forecast_Hour"], simulate.MAX_SIZE_MM)
    storms = simulate.draw_storms(table[table["tmp700_mean"] > -60].head(40), 1.0, np.random.default_rng(0))
    storms["uh_max_max"] = 150.0
    weak, strong = storms.assign(meso_strength=0.5), storms.assign(meso_strength=2.0)
    sizes = np.full(len(storms), 30.0)
    a = simulate.render(weak, sizes, np.random.default_rng(1))  # same draws: only the rotation differs
    b = simulate.render(strong, sizes, np.random.default_rng(1))
    for name in ("U500_curr", "V500_curr"):
        diff = b[name] - a[name]
        peak = np.abs(diff).max(axis=(1, 2))
        assert (peak > 10).all(), name
        assert (np.abs(diff.mean(axis=(1, 2))) < 0.1 * peak).all(), name


def test_correlated_noise_has_the_requested_spectrum():
    field = simulate.correlated_noise(np.random.default_rng(0), (64, 64, 64))
    assert np.allclose(field.std(axis=(1, 2)), 1, atol=1e-4)
    power = (np.abs(np.fft.fft2(field)) ** 2).mean(axis=0)
    k = np.hypot(*np.meshgrid(np.fft.fftfreq(64), np.fft.fftfreq(64), indexing="ij"))
    ring = (k > 0.03) & (k < 0.3)
    slope = np.polyfit(np.log(k[ring]), np.log(power[ring]), 1)[0]
    assert abs(slope - (-(5 / 3 + 1))) < 0.25  # 2-D power spectrum of a k^-5/3 energy spectrum


def _write(path, n=5, units="m", **change):
    rng = np.random.default_rng(0)
    fields = {v: (("p", "row", "col"), rng.normal(size=(n, 8, 8)).astype(np.float32)) for v in VARIABLES[:4]}
    size = np.linspace(0.0, 0.05, n)  # metres
    fields["HAIL_MAXK1_future"] = (("p",), size, {"units": units} if units else {})
    fields["run_date"] = (("p",), np.full(n, np.datetime64("2015-06-04", "ns")))
    fields.update({k: v for k, v in change.items() if v is not None})
    ds = xr.Dataset(fields).drop_vars([k for k, v in change.items() if v is None])
    ds.to_netcdf(path)
    return path


def four(path, **options):
    return read_all(path, **{"variables": VARIABLES[:4], "target_mode": "regression", "max_size_mm": None,
                             **options})


def test_reader_converts_target_units(tmp_path):
    in_m = four(_write(tmp_path / "m.nc"))
    assert np.allclose(in_m["y"], np.linspace(0, 50, 5), atol=1e-4)
    assert in_m["x"].shape == (5, 4, 8, 8)
    assert list(PatchReader(variables=VARIABLES[:4]).open(tmp_path / "m.nc").groups["day"]) == ["2015-06-04"] * 5
    in_inches = four(_write(tmp_path / "in.nc", units="in"))
    assert np.allclose(in_inches["y"], np.linspace(0, 0.05, 5) * 25.4, atol=1e-5)
    no_units = _write(tmp_path / "none.nc", units=None)
    with pytest.raises(SciMLError, match="none.nc: variable 'HAIL_MAXK1_future' has no 'units'"):
        four(no_units)
    assert np.allclose(four(no_units, target_units="cm")["y"], np.linspace(0, 0.5, 5), atol=1e-5)
    with pytest.raises(SciMLError, match="units 'K', expected a length"):
        four(_write(tmp_path / "k.nc", units="K"))
    severe = read_all(tmp_path / "m.nc", variables=VARIABLES[:4])["y"]  # classification: >= 25 mm
    assert severe.tolist() == [0, 0, 1, 1, 1]
    clipped = four(tmp_path / "m.nc", max_size_mm=30.0)["y"]
    assert clipped.max() == 30.0


def test_file_without_target_is_unlabelled_and_without_run_date_is_its_own_day(tmp_path):
    path = _write(tmp_path / "new.nc", HAIL_MAXK1_future=None, run_date=None)
    info = PatchReader(variables=VARIABLES[:4]).open(path)
    assert not info.labels and info.shape == (4, 8, 8) and set(info.groups["day"]) == {"file:new.nc"}
    assert set(four(path)) == {"x", "index"}


def test_reader_errors_name_file_and_variable(tmp_path):
    path = _write(tmp_path / "a.nc")
    with pytest.raises(SciMLError, match=r"a.nc: missing variable\(s\) MLCAPE_curr"):
        four(path, variables=VARIABLES[:4] + ["MLCAPE_curr"])
    bad = np.zeros((5, 8, 8), np.float32)
    bad[2, 3, 3] = np.nan
    nan_file = _write(tmp_path / "nan.nc", T2_curr=(("p", "row", "col"), bad))
    with pytest.raises(SciMLError, match="nan.nc: 1 NaN, missing or infinite value.* in variable 'T2_curr'"):
        four(nan_file)
    flat = _write(tmp_path / "flat.nc", T2_curr=(("p", "x"), np.zeros((5, 64), np.float32)))
    with pytest.raises(SciMLError, match=r"flat.nc: variable 'T2_curr' has dimensions \('p', 'x'\)"):
        four(flat)
    other_grid = tmp_path / "grid.nc"
    xr.Dataset({v: (("p", "row", "col"), np.zeros((2, 16, 16), np.float32)) for v in VARIABLES[:4]} |
               {"HAIL_MAXK1_future": (("p",), np.zeros(2), {"units": "m"})}).to_netcdf(other_grid)
    with pytest.raises(SciMLError, match="grid.nc: rows of shape"):
        four([path, other_grid])
    corrupt = tmp_path / "corrupt.nc"
    corrupt.write_bytes(b"not netCDF")
    with pytest.raises(SciMLError, match="corrupt.nc: not a readable netCDF file"):
        four(corrupt)
    with pytest.raises(SciMLError, match="data.path: no such file or folder"):
        four(tmp_path / "missing")
    with pytest.raises(SciMLError, match="data.target_mode: 'ordinal' is not one of"):
        PatchReader(target_mode="ordinal")


def days_of(dm):
    groups = dm.store.groups("day")
    return {split: sorted(set(groups[rows])) for split, rows in dm.rows.items()}


def test_split_keeps_whole_days_in_time_order():
    """The plugin's config splits by run day in time order (the core's group split); data.test_groups leaves one
    day out, and validation is then the latest two of the others."""
    dm = data_module("hail/data=storms")
    dm.setup("fit")
    days = days_of(dm)
    assert days["test"] == ["2015-06-03"] and days["val"] == ["2015-06-01", "2015-06-02"]
    assert days["train"] == ["2015-05-20", "2015-05-21", "2015-05-22", "2015-05-25", "2015-05-26", "2015-05-27",
                             "2015-05-28", "2015-05-29"]
    dm = data_module("hail/data=storms", "data.test_groups=[2015-05-21]")
    dm.setup("fit")
    days = days_of(dm)
    assert days["test"] == ["2015-05-21"] and days["val"] == ["2015-06-02", "2015-06-03"]
    assert "2015-05-21" not in days["train"] and len(days["train"]) == 8
    with pytest.raises(SciMLError, match="data.test_groups: 2015-06-04 not in"):
        data_module("hail/data=storms", "data.test_groups=[2015-06-04]").setup("fit")


def test_storm_table_features_normaliser_and_climatology(tmp_path):
    module = data_module("hail/data=storms")
    module.setup("fit")
    train = module.rows["train"]
    assert 0.6 < module.climatology < 0.75
    assert module.state_dict()["climatology"] == module.climatology, "the climatology travels in checkpoints"
    reader = module.reader
    assert reader.columns[:2] == ["uh_max_mean", "uh_max_max"] and len(reader.columns) == 36
    raw = read_storms(resolve_csvs(None), reader.columns)
    assert len(raw) == len(module.store)
    raw_train = raw.iloc[train]
    assert set(raw_train["run_day"].dt.strftime("%Y-%m-%d")) == set(days_of(module)["train"])
    # skewed variables enter logged; hagelslag's -9999 codes become the training median (after the log)
    batch = {k: torch.as_tensor(v) for k, v in module.store.read(train).items()}
    x = module.on_after_batch_transfer(batch, 0)["x"].numpy()
    norm_ = module.normalizer
    assert np.isfinite(x).all() and np.allclose(x.mean(axis=0), 0, atol=1e-4)
    uh = np.log1p(raw_train["uh_max_mean"].to_numpy())
    assert np.allclose(x[:, 0] * norm_.std[0].item() + norm_.mean[0].item(),
                       np.clip(uh, np.quantile(uh, 0.005), np.quantile(uh, 0.995)), atol=1e-4)
    j = reader.columns.index("sph850_mean")
    coded = (raw_train["sph850_mean"] < -9000).to_numpy()
    assert coded.sum() > 10, "the real table has missing 850 hPa humidities"
    filled = x[coded, j] * norm_.std[j].item() + norm_.mean[j].item()
    assert np.allclose(filled, np.median(raw_train["sph850_mean"][~coded]), atol=1e-3)
    # the statistics travel in checkpoints: a fresh module applies them unchanged
    fresh = data_module("hail/data=storms")
    fresh.prepare("test")  # files opened, rows not read: as a test-only run before the checkpoint is restored
    fresh.load_state_dict(module.state_dict())
    again = fresh.on_after_batch_transfer({k: torch.as_tensor(v) for k, v in module.store.read(train).items()}, 0)
    assert np.array_equal(again["x"].numpy(), x) and fresh.climatology == module.climatology


def test_storm_table_errors(tmp_path):
    one = sorted(resolve_csvs(None))[0]
    table = pd.read_csv(one).drop(columns=["uh_max_mean"])
    table.to_csv(tmp_path / "track_step_SSEF_x_20150520.csv", index=False)
    with pytest.raises(SciMLError, match=r"track_step_SSEF_x_20150520.csv: missing column\(s\) uh_max_mean"):
        StormReader().open(tmp_path / "track_step_SSEF_x_20150520.csv")
    table = pd.read_csv(one)
    table["mlcape_max"] = table["mlcape_max"].astype(object)
    table.loc[3, "mlcape_max"] = "oops"
    table.to_csv(tmp_path / "track_step_SSEF_x_20150520.csv", index=False)
    with pytest.raises(SciMLError, match="1 missing, non-numeric or infinite value.*'mlcape_max'"):
        StormReader().open(tmp_path / "track_step_SSEF_x_20150520.csv")
    with pytest.raises(SciMLError, match="data.log_variables: unknown variable.* cape"):
        StormReader(log_variables=["cape"])
    unlabelled = tmp_path / "track_step_SSEF_x_20150604.csv"
    pd.read_csv(one).drop(columns=[TARGET]).to_csv(unlabelled, index=False)
    info = StormReader().open(unlabelled)
    assert not info.labels and set(StormReader().read(info, np.arange(3))) == {"x"}


def test_verification_scores_match_sklearn():
    rng = np.random.default_rng(0)
    outcome = rng.random(2000) < 0.3
    prob = np.clip(0.3 + 0.4 * (outcome - 0.3) + rng.normal(0, 0.2, 2000), 0, 1)
    metric = ForecastVerification()
    metric.climatology = 0.25
    for part in np.array_split(np.arange(2000), 3):
        metric.update(torch.tensor(prob[part]), torch.tensor(outcome[part]))
    values = metric.compute()
    assert values["auc"] == pytest.approx(roc_auc_score(outcome, prob), abs=1e-5)
    brier = brier_score_loss(outcome, prob)
    assert values["brier"] == pytest.approx(brier, abs=1e-5)
    assert values["bss"] == pytest.approx(1 - brier / np.mean((0.25 - outcome) ** 2), abs=1e-5)
    assert values["bss_sample"] == pytest.approx(1 - brier / np.var(outcome), abs=1e-5)
    best = 0.0
    for t in np.linspace(0, 1, 101):  # CSI = hits / (hits + misses + false alarms), brute force
        yes = prob >= t
        hits, misses, false = (yes & outcome).sum(), (~yes & outcome).sum(), (yes & ~outcome).sum()
        best = max(best, hits / (hits + misses + false))
    assert values["csi"] == pytest.approx(best, abs=1e-5)
    curves = metric.curves()
    assert curves["bin_count"].sum() == 2000
    assert np.allclose(curves["bin_observed"][curves["bin_count"] > 0],
                       [outcome[(prob >= lo) & (prob < lo + 0.1 if lo < 0.85 else prob <= 1)].mean()
                        for lo in np.linspace(0, 0.9, 10) if ((prob >= lo) & (prob < lo + 0.1)).any()
                        or (lo > 0.85 and (prob >= lo).any())], atol=1e-6)


def test_regression_exceedance_probability_is_gaussian():
    from sciml_plugins.hail.model import GagneCNN
    from sciml_plugins.hail.tasks import HailRegressionTask

    task = HailRegressionTask(GagneCNN(input_shape=(4, 32, 32), widths=(4,)), threshold_mm=25.0)
    mean, std = torch.tensor([10.0, 25.0, 40.0]), torch.tensor([5.0, 8.0, 10.0])
    assert np.allclose(task.exceedance(mean, std).numpy(), norm.sf(25.0, mean.numpy(), std.numpy()), atol=1e-6)
    with pytest.raises(SciMLError, match="loss=gaussian_nll"):
        HailRegressionTask(GagneCNN(input_shape=(4, 32, 32)), loss="mse")
