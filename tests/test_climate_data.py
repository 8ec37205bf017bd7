"""The climate reader and datamodule: file values in batches, normalisation statistics, lazy reads, crop and
down-sampling, ClimateNet's one-time-step files with 2-D LABELS, labelled fractions (also dealt to two ranks), group
keys, and the errors a user meets, each naming the file and variable."""
from __future__ import annotations

import types

import netCDF4
import numpy as np
import pytest
import torch
import xarray as xr

from sciml.errors import SciMLError
from sciml_plugins.climate.data import ClimateDataModule
from sciml_plugins.climate.generate import GeneratorConfig, generate_file
from sciml_plugins.climate.reader import DEFAULT_DIR, ClimateNetReader, block_majority

VARS = ["TMQ", "U850", "V850", "PSL"]
READER = "sciml_plugins.climate.reader.ClimateNetReader"


def write_files(folder, files=2, steps=6, nlat=24, nlon=36, seed=0):
    """Small ClimateNet-like files from the plugin's generator."""
    config = GeneratorConfig(nlat=nlat, nlon=nlon)
    return [generate_file(folder / f"part_{i}.nc", i, steps, seed, config) and folder / f"part_{i}.nc"
            for i in range(files)]


def climatenet_file(path, src, t, time=True, labels=True):
    """ClimateNet's own layout, written with netCDF4 as another tool would: one time step (a time dimension of
    length 1, or none: `time=False`), inputs (time, lat, lon) or (lat, lon), and `LABELS` as (lat, lon)."""
    ds = xr.open_dataset(src, decode_times=False)
    with netCDF4.Dataset(path, "w") as nc:
        nc.createDimension("lat", ds.sizes["lat"])
        nc.createDimension("lon", ds.sizes["lon"])
        if time:
            nc.createDimension("time", 1)
            v = nc.createVariable("time", "f8", ("time",))
            v.units, v.calendar = ds["time"].attrs["units"], ds["time"].attrs["calendar"]
            v[:] = ds["time"].values[t:t + 1]
        for name in ("lat", "lon"):
            nc.createVariable(name, "f4", (name,))[:] = ds[name].values
        for name in VARS:
            dims = ("time", "lat", "lon") if time else ("lat", "lon")
            nc.createVariable(name, "f4", dims)[:] = ds[name].values[t:t + 1] if time else ds[name].values[t]
        if labels:
            nc.createVariable("LABELS", "i8", ("lat", "lon"))[:] = ds["LABELS"].values[t]
    return path


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


def module(path, stage="fit", trainer=None, **kwargs):
    dm = ClimateDataModule(reader=READER, path=str(path), batch_size=4, normalize="standard", **kwargs)
    dm.trainer = trainer
    dm.setup(stage)
    return dm


def test_batches_hold_the_file_values(folder):
    dm = module(folder)
    x, y = reference(folder)
    assert dm.input_shape == (4, 24, 36) and len(dm.store) == 12 and dm.store.in_memory
    parts = [set(dm.split_rows[s].tolist()) for s in ("train", "val", "test")]
    assert sum(map(len, parts)) == 12 and len(set.union(*parts)) == 12
    for batch in dm.train_dataloader():
        rows = batch["index"].numpy()
        np.testing.assert_allclose(batch["x"].numpy(), x[rows], rtol=1e-6)
        np.testing.assert_array_equal(batch["y"].numpy(), y[rows])
        assert "labeled" not in batch


def test_normalisation_from_training_rows_and_kept_in_state(folder):
    dm = module(folder)
    x, _ = reference(folder)
    train = x[dm.split_rows["train"]].astype(np.float64)
    np.testing.assert_allclose(dm.normalizer.mean.numpy(), train.mean(axis=(0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(dm.normalizer.std.numpy(), train.std(axis=(0, 2, 3)), rtol=1e-4)
    batch = dm.on_after_batch_transfer({"x": torch.from_numpy(x[dm.split_rows["train"]])}, 0)
    np.testing.assert_allclose(batch["x"].mean(dim=(0, 2, 3)).numpy(), 0, atol=1e-4)
    fresh = ClimateDataModule(reader=READER, path=str(folder), normalize="standard")
    fresh.load_state_dict(dm.state_dict())
    fresh.prepare("test")
    out = fresh.on_after_batch_transfer({"x": torch.from_numpy(x[:2])}, 0)
    np.testing.assert_array_equal(out["x"].numpy(), dm.on_after_batch_transfer({"x": torch.from_numpy(x[:2])}, 0)["x"])
    unfitted = ClimateDataModule(reader=READER, path=str(folder), normalize="standard")
    unfitted.prepare("test")
    with pytest.raises(SciMLError, match="no input normalisation statistics"):
        unfitted.on_after_batch_transfer({"x": torch.zeros(1, 4, 2, 2)}, 0)


def test_lazy_reads_equal_in_memory(folder):
    in_memory, lazy = module(folder), module(f"{folder}/*.nc", max_memory_gb=0)
    assert in_memory.store.in_memory and not lazy.store.in_memory
    index = np.array([11, 0, 7, 5, 6])  # unsorted, across both files
    a, b = in_memory.store.read(index), lazy.store.read(index)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    np.testing.assert_allclose(in_memory.normalizer.mean.numpy(), lazy.normalizer.mean.numpy(), rtol=1e-6)


def test_crop_across_the_date_line_and_downsampling(folder):
    x, y = reference(folder)
    first = sorted(folder.glob("*.nc"))[0]
    ds = xr.open_dataset(first)
    lat, lon = ds["lat"].values, ds["lon"].values
    lat_i = np.flatnonzero((lat >= 0) & (lat <= 60))
    lon_i = np.concatenate([np.flatnonzero(lon >= 300), np.flatnonzero(lon <= 30)])
    reader = ClimateNetReader(crop={"lat": [0, 60], "lon": [300, 30]})
    info = reader.open(first)
    np.testing.assert_array_equal(info.meta["lon"], lon[lon_i])
    assert info.shape == (4, len(lat_i), len(lon_i))
    got = reader.read(info, np.arange(6))
    np.testing.assert_allclose(got["x"], x[:6, :, lat_i][:, :, :, lon_i], rtol=1e-6)
    coarse = module(folder, downsample=2).store.read(np.arange(12))
    expected = x.reshape(12, 4, 12, 2, 18, 2).mean(axis=(3, 5))
    np.testing.assert_allclose(coarse["x"], expected, rtol=1e-5)
    assert coarse["y"].shape == (12, 12, 18)
    with pytest.raises(SciMLError, match="data.crop: unknown keys"):
        ClimateNetReader(crop={"latitude": [0, 10]})


def test_block_majority_keeps_events():
    labels = np.array([[0, 0, 1, 0], [0, 2, 0, 0]])
    np.testing.assert_array_equal(block_majority(labels, 2, 3), [[0, 0]])
    labels = np.array([[2, 2, 1, 1], [0, 2, 1, 0]])
    np.testing.assert_array_equal(block_majority(labels, 2, 3), [[2, 1]])


def test_climatenet_layout_with_2d_labels(folder, tmp_path):
    """One time step per file, LABELS (lat, lon); inputs with a time dimension of length 1 or without time."""
    src = sorted(folder.glob("*.nc"))[0]
    x, y = reference(folder)
    files = [climatenet_file(tmp_path / "data-2000-01-01-00-1_0.nc", src, 0),
             climatenet_file(tmp_path / "data-2000-01-01-06-1_0.nc", src, 1, time=False)]
    reader = ClimateNetReader()
    for t, path in enumerate(files):
        info = reader.open(path)
        assert info.rows == 1 and info.labels and info.shape == (4, 24, 36)
        got = reader.read(info, np.array([0]))
        np.testing.assert_allclose(got["x"], x[t:t + 1], rtol=1e-6)
        np.testing.assert_array_equal(got["y"], y[t:t + 1])
    assert "day" in reader.open(files[0]).groups and "day" not in reader.open(files[1]).groups
    (tmp_path / "part_0.nc").write_bytes(src.read_bytes())  # read together with a file of (time, lat, lon) rows
    dm = ClimateDataModule(reader=READER, test_path=str(tmp_path), normalize="standard")
    dm.setup("test")
    assert len(dm.rows["test"]) == 8 and dm.has_labels("test")
    np.testing.assert_array_equal(dm.test_store.read(np.array([7, 1, 0]))["y"], y[[5, 1, 0]])
    bad = tmp_path / "bad" / "two_steps.nc"
    bad.parent.mkdir()
    with netCDF4.Dataset(bad, "w") as nc:
        for name, size in (("time", 2), ("lat", 24), ("lon", 36)):
            nc.createDimension(name, size)
        for name in ("lat", "lon"):
            nc.createVariable(name, "f4", (name,))[:] = xr.open_dataset(src)[name].values
        for name in VARS:
            nc.createVariable(name, "f4", ("time", "lat", "lon"))[:] = 1.0
        nc.createVariable("LABELS", "i8", ("lat", "lon"))[:] = 0
    with pytest.raises(SciMLError, match=r"'LABELS' has dimensions \('lat', 'lon'\) but the file has 2 time steps"):
        reader.open(bad)


def test_files_without_labels_are_predicted_not_scored(folder, tmp_path):
    src = sorted(folder.glob("*.nc"))[0]
    path = climatenet_file(tmp_path / "new.nc", src, 2, labels=False)
    dm = ClimateDataModule(reader=READER, test_path=str(path), normalize="standard")
    dm.prepare("test")
    assert not dm.has_labels("test") and dm.input_shape == (4, 24, 36)
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    assert set(batch) == {"x", "index"}


@pytest.mark.parametrize("unlabeled", ["drop", "reconstruct"])
def test_labeled_fraction(folder, unlabeled):
    dm = module(folder, labeled_fraction=0.25, unlabeled=unlabeled, val_size=0.1, test_size=0.1)
    train = dm.split_rows["train"]
    n_train, n_labeled = len(train), round(0.25 * len(train))
    assert n_train == 10 and len(dm.labeled_rows) == n_labeled and set(dm.labeled_rows) <= set(train)
    dataset = dm.train_dataset(dm.rows["train"])
    if unlabeled == "drop":
        assert sorted(dataset.index) == sorted(dm.labeled_rows) and "labeled" not in dataset.extra
    else:  # every unlabelled row once, the labelled ones repeated to balance them
        flags = dataset.extra["labeled"]
        assert sorted(dataset.index[~flags]) == sorted(set(train) - set(dm.labeled_rows))
        assert flags.sum() == n_labeled * 4 and set(dataset.index[flags]) == set(dm.labeled_rows)
        batch = next(iter(dm.train_dataloader()))
        assert batch["labeled"].dtype == torch.bool
    _, y = reference(folder)
    expected = np.bincount(y[dm.labeled_rows].ravel(), minlength=3)
    np.testing.assert_array_equal(dm.class_frequencies(), expected)


class _Strategy:
    """Stands in for a DDP strategy in a single process: records the values each rank reduces."""

    root_device = torch.device("cpu")

    def __init__(self):
        self.reduced = []

    def reduce(self, tensor, reduce_op):
        self.reduced.append((tensor.clone(), reduce_op))
        return tensor


def _rank(rank, world=2):
    return types.SimpleNamespace(world_size=world, global_rank=rank, strategy=_Strategy(),
                                 _accelerator_connector=types.SimpleNamespace(use_distributed_sampler=False))


@pytest.mark.parametrize("unlabeled", ["drop", "reconstruct"])
def test_two_ranks_share_the_labelled_rows(tmp_path_factory, unlabeled):
    folder = tmp_path_factory.mktemp("ranks")
    write_files(folder, files=2, steps=15, nlat=8, nlon=12)
    whole = module(folder, labeled_fraction=0.2, unlabeled=unlabeled)
    ranks = [module(folder, labeled_fraction=0.2, unlabeled=unlabeled, trainer=_rank(r)) for r in (0, 1)]
    datasets = [dm.train_dataset(dm.rows["train"]) for dm in ranks]
    assert len(datasets[0]) == len(datasets[1]) > 0  # the same number of batches on both ranks
    labelled = [set(d.index if unlabeled == "drop" else d.index[d.extra["labeled"]]) for d in datasets]
    np.testing.assert_array_equal(ranks[0].labeled_rows, whole.labeled_rows)  # the choice is not the ranks'
    assert not labelled[0] & labelled[1] and len(labelled[0]) >= len(whole.labeled_rows) // 2
    for dm, dataset in zip(ranks, datasets):
        assert set(dataset.index) <= set(dm.store._rows)  # only rows this rank holds
    counts = [dm.class_frequencies() for dm in ranks]  # 3 classes, although no TC pixel is labelled here
    np.testing.assert_array_equal(counts[0] + counts[1], whole.class_frequencies())  # each rank counts its own


def test_group_by_file_and_day(folder):
    dm = module(folder, stage="test", group_by="file", val_size=0, test_size=1)
    files = dm.store.groups("file")
    assert len(set(files[dm.split_rows["test"]])) == 1 and len(dm.split_rows["test"]) == 6
    days = module(folder, group_by="day", val_size=1, test_size=1)
    day = days.store.groups("day")
    assert not set(day[days.split_rows["test"]]) & set(day[days.split_rows["train"]])


def test_embedded_default_sample():
    files = sorted(DEFAULT_DIR.glob("*.nc"))
    assert len(files) == 4 and sum(f.stat().st_size for f in files) < 11e6
    assert (DEFAULT_DIR / "PROVENANCE.md").is_file()
    dm = ClimateDataModule(reader=READER, normalize="standard")
    dm.setup("fit")
    assert dm.input_shape == (4, 96, 144) and len(dm.store) == 160
    assert [len(dm.rows[s]) for s in ("train", "val", "test")] == [112, 24, 24]
    f = dm.class_frequencies()
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


@pytest.mark.parametrize("form", ["NETCDF4", "NETCDF3_64BIT_OFFSET"])
def test_packed_fields_decode_as_xarray_decodes_them(folder, tmp_path, form):
    """The reader CF-decodes rows itself (read with h5py from netCDF-4 files, with netCDF4 from classic ones):
    packed int16 with scale and offset, signed bytes marked `_Unsigned`, `missing_value` instead of `_FillValue`,
    dimensions in another order, file chunks of several time steps and a crop across the longitude seam give what
    xarray's decoding gives; a `missing_value` in the rows is an error."""
    src = xr.open_dataset(sorted(folder.glob("*.nc"))[0], decode_times=False)
    path = tmp_path / "packed.nc"
    chunked = {"chunksizes": (3, src.sizes["lat"], src.sizes["lon"])} if form == "NETCDF4" else {}
    with netCDF4.Dataset(path, "w", format=form) as nc:
        for name, size in src.sizes.items():
            nc.createDimension(name, size)
        for name in ("time", "lat", "lon"):
            nc.createVariable(name, "f8", (name,))[:] = src[name].values
        nc["time"].units = "hours since 2000-01-01"
        tmq = nc.createVariable("TMQ", "i2", ("time", "lat", "lon"), fill_value=-32768, **chunked)
        tmq.scale_factor, tmq.add_offset = 0.05, 800.0  # netCDF4 packs on write
        tmq[:] = src["TMQ"].values
        u = nc.createVariable("U850", "i2", ("time", "lon", "lat"))  # another dimension order
        u.scale_factor, u.missing_value = 0.01, -999
        u[:] = src["U850"].values.transpose(0, 2, 1)
        v = nc.createVariable("V850", "i1", ("time", "lat", "lon"), fill_value=-128)  # unsigned bytes stored signed
        v.setncattr("_Unsigned", "true")
        v.set_auto_maskandscale(False)
        v[:] = np.arange(src["V850"].size).reshape(src["V850"].shape) % 254 - 127  # all but the fill value
        nc.createVariable("PSL", "f4", ("time", "lat", "lon"))[:] = src["PSL"].values
        nc.createVariable("LABELS", "u1" if form == "NETCDF4" else "i2", ("time", "lat", "lon"), **chunked)[:] = \
            src["LABELS"].values
    expected = xr.load_dataset(path, decode_times=False)
    for crop in (None, {"lon": [300, 60]}):
        reader = ClimateNetReader(crop=crop)
        info = reader.open(path)
        rows = np.array([0, 2, 3, 5])  # TMQ and LABELS in chunks of 3 steps: one read of steps 0-5
        got = reader.read(info, rows)
        lon = info.meta["lon_index"]
        want = np.stack([expected[v].transpose("time", "lat", "lon").values[rows][..., lon] for v in VARS], 1)
        np.testing.assert_array_equal(got["x"], want.astype(np.float32))
        np.testing.assert_array_equal(got["y"], expected["LABELS"].values[rows][..., lon])
        assert got["x"][:, 2].max() > 200  # _Unsigned: 255, not -1
        reader.close()
    for name, fill in (("U850", -999), ("V850", -128)):  # missing_value; _FillValue of an `_Unsigned` variable
        broken = tmp_path / f"missing_{name}.nc"
        broken.write_bytes(path.read_bytes())
        with netCDF4.Dataset(broken, "a") as nc:
            nc[name].set_auto_maskandscale(False)
            nc[name][2, 5, 7] = fill
        reader = ClimateNetReader()
        with pytest.raises(SciMLError, match=rf"{broken}: NaN, infinite or missing \(_FillValue\) values in "
                                             rf"'{name}' \(1\), first at time index 2"):
            reader.read(reader.open(broken), np.arange(4))
        reader.close()


def test_bad_files_are_named(folder, tmp_path):
    src = sorted(folder.glob("*.nc"))[0]
    cases = []
    cases.append((_rewrite(tmp_path / "novar.nc", src, drop=("U850",)), r"missing variable 'U850'"))
    psl = xr.open_dataset(src)["PSL"].values[:, :, 0]
    cases.append((_rewrite(tmp_path / "dims.nc", src, replace={"PSL": psl}, dims={"PSL": ("time", "lat")}),
                  r"variable 'PSL' has dimensions \('time', 'lat'\), expected \(time, lat, lon\) or \(lat, lon\)"))
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
            ClimateDataModule(reader=READER, test_path=str(path)).setup("test")  # reads every row of the file
        assert str(path) in str(err.value)
    other = tmp_path / "grid"
    other.mkdir()
    write_files(other, files=1, nlat=20, nlon=36)
    (other / "z.nc").write_bytes(src.read_bytes())
    with pytest.raises(SciMLError, match=r"rows of shape \(4, 24, 36\), but .* has \(4, 20, 36\)"):
        module(other)
    with pytest.raises(SciMLError, match="data.path: no such file or folder"):
        module(tmp_path / "nope.nc")
    with pytest.raises(SciMLError, match="data.path: no files match .*empty"):
        module(tmp_path / "empty*.nc")


def test_bad_arguments():
    with pytest.raises(SciMLError, match="data.labeled_fraction"):
        ClimateDataModule(reader=READER, labeled_fraction=0)
    with pytest.raises(SciMLError, match="data.unlabeled"):
        ClimateDataModule(reader=READER, unlabeled="ignore")
    with pytest.raises(SciMLError, match="data.downsample"):
        ClimateDataModule(reader=READER, downsample=0)
    with pytest.raises(SciMLError, match="data.variabels: unknown key .* labeled_fraction"):
        ClimateDataModule(reader=READER, variabels=["TMQ"])
