"""The climate reader: file values in batches, normalisation statistics, lazy reads, crop and down-sampling,
labelled fractions, and the errors a user meets, each naming the file and variable."""
from __future__ import annotations

import netCDF4
import numpy as np
import pytest
import torch
import xarray as xr

from sciml.errors import SciMLError
from sciml_plugins.climate.data import DEFAULT_DIR, ClimateDataModule, block_majority
from sciml_plugins.climate.generate import GeneratorConfig, generate_file

VARS = ["TMQ", "U850", "V850", "PSL"]


def write_files(folder, files=2, steps=6, nlat=24, nlon=36, seed=0):
    """Small ClimateNet-like files from the plugin's generator."""
    config = GeneratorConfig(nlat=nlat, nlon=nlon)
    return [generate_file(folder / f"part_{i}.nc", i, steps, seed, config) and folder / f"part_{i}.nc"
            for i in range(files)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("climate")
    write_files(folder)
    return folder


def reference(folder):
    """All files concatenated along time, read independently with xarray."""
    parts = [xr.open_dataset(p) for p in sorted(folder.glob("*.nc"))]
    x = np.concatenate([np.stack([ds[v].values for v in VARS], 1) for ds in parts]).astype(np.float32)
    y = np.concatenate([ds["LABELS"].values for ds in parts]).astype(np.int64)
    return x, y


def fit_module(path, **kwargs):
    dm = ClimateDataModule(path=str(path), batch_size=4, **kwargs)
    dm.setup("fit")
    return dm


def test_batches_hold_the_file_values(folder):
    dm = fit_module(folder)
    x, y = reference(folder)
    assert dm.input_shape == (4, 24, 36) and len(dm._source) == 12
    parts = [set(dm.splits[s].index.tolist()) for s in ("train", "val", "test")]
    assert sum(map(len, parts)) == 12 and len(set.union(*parts)) == 12
    for batch in dm.train_dataloader():
        rows = batch["index"].numpy()
        np.testing.assert_allclose(batch["x"].numpy(), x[rows], rtol=1e-6)
        np.testing.assert_array_equal(batch["y"].numpy(), y[rows])
        assert "labeled" not in batch


def test_normalisation_from_training_rows_and_kept_in_state(folder):
    dm = fit_module(folder)
    x, _ = reference(folder)
    train = x[np.sort(dm.splits["train"].index)].astype(np.float64)
    np.testing.assert_allclose(dm.mean.numpy(), train.mean(axis=(0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(dm.std.numpy(), train.std(axis=(0, 2, 3)), rtol=1e-4)
    batch = dm.on_after_batch_transfer(dm.splits["train"].__getitems__(list(range(len(dm.splits["train"])))), 0)
    np.testing.assert_allclose(batch["x"].mean(dim=(0, 2, 3)).numpy(), 0, atol=1e-4)
    fresh = ClimateDataModule(path=str(folder))
    fresh.load_state_dict(dm.state_dict())
    np.testing.assert_array_equal(fresh.std.numpy(), dm.std.numpy())
    with pytest.raises(SciMLError, match=r"trained on variables \['TMQ', 'U850', 'V850', 'PSL'\]"):
        ClimateDataModule(path=str(folder), variables=["TMQ", "PSL"]).load_state_dict(dm.state_dict())
    with pytest.raises(SciMLError, match="no normalisation statistics"):
        ClimateDataModule(path=str(folder)).on_after_batch_transfer({"x": torch.zeros(1, 4, 2, 2)}, 0)


def test_lazy_reads_equal_in_memory(folder):
    in_memory, lazy = fit_module(folder), fit_module(f"{folder}/*.nc", max_memory_gb=0)
    assert in_memory._source.in_memory and not lazy._source.in_memory
    index = np.array([11, 0, 7, 5, 6])  # unsorted, across both files
    a, b = in_memory._source.read(index), lazy._source.read(index)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    np.testing.assert_allclose(in_memory.mean.numpy(), lazy.mean.numpy(), rtol=1e-6)


def test_crop_across_the_date_line_and_downsampling(folder):
    x, y = reference(folder)
    ds = xr.open_dataset(sorted(folder.glob("*.nc"))[0])
    lat, lon = ds["lat"].values, ds["lon"].values
    lat_i = np.flatnonzero((lat >= 0) & (lat <= 60))
    lon_i = np.concatenate([np.flatnonzero(lon >= 300), np.flatnonzero(lon <= 30)])
    dm = fit_module(folder, crop={"lat": [0, 60], "lon": [300, 30]})
    source = dm._source
    np.testing.assert_array_equal(source.lon, lon[lon_i])
    got = source.read(np.arange(12))
    np.testing.assert_allclose(got["x"], x[:, :, lat_i][:, :, :, lon_i], rtol=1e-6)
    coarse = fit_module(folder, downsample=2)._source.read(np.arange(12))
    expected = x.reshape(12, 4, 12, 2, 18, 2).mean(axis=(3, 5))
    np.testing.assert_allclose(coarse["x"], expected, rtol=1e-5)
    assert coarse["y"].shape == (12, 12, 18)
    with pytest.raises(SciMLError, match="data.crop: unknown keys"):
        fit_module(folder, crop={"latitude": [0, 10]})


def test_block_majority_keeps_events():
    labels = np.array([[0, 0, 1, 0], [0, 2, 0, 0]])
    np.testing.assert_array_equal(block_majority(labels, 2, 3), [[0, 0]])
    labels = np.array([[2, 2, 1, 1], [0, 2, 1, 0]])
    np.testing.assert_array_equal(block_majority(labels, 2, 3), [[2, 1]])


@pytest.mark.parametrize("unlabeled", ["drop", "reconstruct"])
def test_labeled_fraction(folder, unlabeled):
    dm = fit_module(folder, labeled_fraction=0.25, unlabeled=unlabeled, val_fraction=0.0, test_fraction=0.2)
    n_train, n_labeled = 10, round(0.25 * 10)
    assert len(dm._label_rows) == n_labeled
    train = dm.splits["train"]
    if unlabeled == "drop":
        assert len(train) == n_labeled and train.labeled is None
    else:  # every unlabelled row once, the labelled ones repeated to balance them
        assert set(train.index[~train.labeled]) | set(dm._label_rows) == set(np.unique(train.index))
        assert (~train.labeled).sum() == n_train - n_labeled and train.labeled.sum() == n_labeled * 4
        assert set(train.index[train.labeled]) == set(dm._label_rows)
        batch = next(iter(dm.train_dataloader()))
        assert batch["labeled"].dtype == torch.bool
    _, y = reference(folder)
    expected = np.bincount(y[dm._label_rows].ravel(), minlength=3)
    np.testing.assert_array_equal(dm.class_frequencies(), expected)


def test_embedded_default_sample():
    files = sorted(DEFAULT_DIR.glob("*.nc"))
    assert len(files) == 4 and sum(f.stat().st_size for f in files) < 11e6
    assert (DEFAULT_DIR / "PROVENANCE.md").is_file()
    dm = ClimateDataModule()
    dm.setup("fit")
    assert dm.input_shape == (4, 96, 144) and len(dm._source) == 160
    assert [len(dm.splits[s]) for s in ("train", "val", "test")] == [112, 24, 24]
    f = dm._source.class_counts(np.arange(160))
    f = f / f.sum()
    assert 0.002 < f[1] < 0.01 and 0.01 < f[2] < 0.05, f


def _rewrite(path, src, drop=(), replace=None, dims=None):
    """A copy of `src` written with netCDF4 directly, as another tool would, with changes."""
    ds = xr.open_dataset(src)
    with netCDF4.Dataset(path, "w") as nc:
        for name, size in ds.sizes.items():
            nc.createDimension(name, size)
        for name in ["time", "lat", "lon", *VARS, "LABELS"]:
            if name in drop:
                continue
            values = (replace or {}).get(name, ds[name].values)
            if name == "time":
                values = np.arange(ds.sizes["time"], dtype=float)
            var_dims = (dims or {}).get(name, ds[name].dims)
            v = nc.createVariable(name, values.dtype if values.dtype != bool else "u1", var_dims)
            v[:] = values
    return path


def test_bad_files_are_named(folder, tmp_path):
    src = sorted(folder.glob("*.nc"))[0]
    cases = []
    cases.append((_rewrite(tmp_path / "novar.nc", src, drop=("U850",)), r"missing variable 'U850'"))
    psl = xr.open_dataset(src)["PSL"].values[:, :, 0]
    cases.append((_rewrite(tmp_path / "dims.nc", src, replace={"PSL": psl}, dims={"PSL": ("time", "lat")}),
                  r"variable 'PSL' has dimensions \('time', 'lat'\), expected \(time, lat, lon\)"))
    nan = xr.open_dataset(src)["TMQ"].values.copy()
    nan[2, 3, 4] = np.nan
    cases.append((_rewrite(tmp_path / "nan.nc", src, replace={"TMQ": nan}),
                  r"NaN, infinite or missing \(_FillValue\) values in 'TMQ' \(1\), first at time index 2"))
    labels = xr.open_dataset(src)["LABELS"].values.astype(np.int64) + 3
    cases.append((_rewrite(tmp_path / "labels.nc", src, replace={"LABELS": labels}), r"'LABELS' must hold classes"))
    broken = tmp_path / "broken.nc"
    broken.write_bytes(b"CDF\x01" + b"\x00garbage" * 50)
    cases.append((broken, "not a readable netCDF file"))
    for path, message in cases:
        with pytest.raises(SciMLError, match=message) as err:
            fit_module(path, val_fraction=0.0, test_fraction=0.0)
        assert str(path) in str(err.value)
    other = tmp_path / "grid"
    other.mkdir()
    write_files(other, files=1, nlat=20, nlon=36)
    (other / "z.nc").write_bytes(src.read_bytes())
    with pytest.raises(SciMLError, match="lat/lon grid .* differs from that of"):
        fit_module(other)
    with pytest.raises(SciMLError, match="data.path: no such file or folder"):
        fit_module(tmp_path / "nope.nc")
    with pytest.raises(SciMLError, match="data.path: no files match .*empty"):
        fit_module(tmp_path / "empty*.nc")


def test_bad_arguments():
    with pytest.raises(SciMLError, match="data.labeled_fraction"):
        ClimateDataModule(labeled_fraction=0)
    with pytest.raises(SciMLError, match="data.unlabeled"):
        ClimateDataModule(unlabeled="ignore")
    with pytest.raises(SciMLError, match="val_fraction"):
        ClimateDataModule(val_fraction=0.6, test_fraction=0.5)
    with pytest.raises(SciMLError, match="data.downsample"):
        fit_module(DEFAULT_DIR, downsample=0)
