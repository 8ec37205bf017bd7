"""The HEP data module: layout checks with clear messages, splits, normalisation, batched and lazy reads."""
import h5py
import numpy as np
import pytest
import torch
from conftest import write_h5

from sciml.errors import SciMLError
from sciml_plugins.hep.data import DEFAULT_FILE, HEPDataModule


def _fit_module(path, **kwargs):
    dm = HEPDataModule(path=str(path), batch_size=32, **kwargs)
    dm.setup("fit")
    return dm


def test_splits_are_disjoint_and_complete(h5_file):
    dm = _fit_module(h5_file, val_fraction=0.2, test_fraction=0.1)
    parts = [set(dm.splits[s].index.tolist()) for s in ("train", "val", "test")]
    assert sum(map(len, parts)) == 256 and len(set.union(*parts)) == 256
    assert len(parts[1]) == round(0.2 * 256) and len(parts[2]) == round(0.1 * 256)
    assert dm.input_shape == (3, 16, 16)


def test_batches_hold_the_file_rows(h5_file):
    dm = _fit_module(h5_file)
    with h5py.File(h5_file) as h5:
        data, label, weight = h5["data"][...], h5["label"][...], h5["normweight"][...]
    batch = next(iter(dm.train_dataloader()))
    rows = batch["index"].numpy()
    np.testing.assert_array_equal(batch["x"].numpy(), data[rows])
    np.testing.assert_array_equal(batch["y"].numpy(), label[rows])
    np.testing.assert_array_equal(batch["w"].numpy(), weight[rows])
    assert batch["x"].shape == (32, 3, 16, 16) and batch["y"].dtype == torch.int64


def test_channels_scaled_by_training_maximum(h5_file):
    dm = _fit_module(h5_file)
    with h5py.File(h5_file) as h5:
        train_max = h5["data"][np.sort(dm.splits["train"].index)].max(axis=(0, 2, 3))
    np.testing.assert_allclose(dm.channel_max.numpy(), train_max, rtol=1e-6)
    batch = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert float(batch["x"].max()) <= 1.0 + 1e-6
    # the maxima travel in checkpoints: a test-only module gets them from the state dict
    fresh = HEPDataModule(path=str(h5_file))
    fresh.load_state_dict(dm.state_dict())
    np.testing.assert_allclose(fresh.channel_max.numpy(), train_max, rtol=1e-6)


def test_lazy_reads_equal_in_memory(h5_file, tmp_path):
    second = write_h5(tmp_path / "b.h5", n=64, seed=3)
    in_memory = _fit_module(f"{tmp_path}/*.h5")
    lazy = _fit_module(f"{tmp_path}/*.h5", max_memory_gb=0)
    assert in_memory._source.in_memory and not lazy._source.in_memory
    assert len(in_memory._source) == 256 + 64 and second.exists()
    index = np.array([300, 5, 260, 17, 2])  # unsorted, across both files
    a, b = in_memory._source.read(index), lazy._source.read(index)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    np.testing.assert_array_equal(in_memory.channel_max.numpy(), lazy.channel_max.numpy())


def test_test_path_replaces_test_split(h5_file, tmp_path):
    other = write_h5(tmp_path / "other.h5", n=40, seed=7)
    dm = _fit_module(h5_file, test_path=str(other))
    assert len(dm.splits["test"]) == 40 and len(dm.splits["train"]) + len(dm.splits["val"]) == 256


def test_embedded_default_file_is_valid():
    if not DEFAULT_FILE.exists():
        pytest.fail(f"embedded default sample missing: {DEFAULT_FILE}")
    dm = HEPDataModule(path=None)
    dm.setup("fit")
    assert dm.input_shape == (3, 40, 40)
    labels = dm._source.read(np.arange(len(dm._source)))["y"]
    assert 0.4 < labels.mean() < 0.6


@pytest.mark.parametrize("replace, message", [
    ({"label": None}, "missing dataset 'label'"),
    ({"normweight": None}, "missing dataset 'normweight'"),
    ({"data": np.zeros((8, 16, 16), np.float32)}, "expected 'data' \\(N, 3, H, W\\)"),
    ({"data": np.zeros((8, 2, 16, 16), np.float32)}, "2 channels, expected 3"),
    ({"label": np.zeros(5, np.int32)}, "'label' has shape \\(5,\\)"),
])
def test_bad_layout_is_named(tmp_path, replace, message):
    n = 8
    arrays = {"label": np.zeros(n, np.int32), "normweight": np.ones(n, np.float32)}
    arrays.update(replace)
    path = write_h5(tmp_path / "bad.h5", n=n, **arrays)
    with pytest.raises(SciMLError, match=message) as err:
        _fit_module(path)
    assert str(path) in str(err.value)


def test_nan_and_bad_labels_are_named(tmp_path):
    data = np.ones((8, 3, 16, 16), np.float32)
    data[3, 1, 2, 2] = np.nan
    path = write_h5(tmp_path / "nan.h5", n=8, data=data)
    with pytest.raises(SciMLError, match="1 NaN or infinite values in 'data'"):
        _fit_module(path)
    path = write_h5(tmp_path / "labels.h5", n=8, label=np.full(8, 3, np.int32))
    with pytest.raises(SciMLError, match="'label' must be 0"):
        _fit_module(path)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(SciMLError, match="data.path: no such file or folder"):
        _fit_module(tmp_path / "nope.h5")
    corrupt = tmp_path / "corrupt.h5"
    corrupt.write_bytes(b"\x89HDF\r\n\x1a\n" + b"garbage" * 100)
    with pytest.raises(SciMLError, match="not a readable HDF5 file"):
        _fit_module(corrupt)
    with pytest.raises(SciMLError, match="data.path: no files match .*empty"):
        _fit_module(tmp_path / "empty*.h5")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("not data")
    with pytest.raises(SciMLError, match=r"data.path: no \*.h5, \*.hdf5 files in the folder"):
        _fit_module(tmp_path / "folder")


def test_bad_arguments():
    with pytest.raises(SciMLError, match="data.batch_size"):
        HEPDataModule(batch_size=0)
    with pytest.raises(SciMLError, match="val_fraction"):
        HEPDataModule(val_fraction=0.6, test_fraction=0.5)
