"""The HEP reader on the core's data contract: layout checks with clear messages, optional labels and weights,
block-wise reads, per-channel maximum scaling, the scores file."""
import h5py
import numpy as np
import pytest
import torch
from conftest import write_h5

from sciml.data import DataModule
from sciml.errors import SciMLError
from sciml_plugins.hep import reader as hep_reader
from sciml_plugins.hep.reader import DEFAULT_FILE, CaloImages, read_rows


def _module(path, **kwargs):
    path = path if path is None or isinstance(path, list) else str(path)
    return DataModule(reader=CaloImages, path=path, batch_size=32, normalize="max",
                      **kwargs)


def _fit_module(path, **kwargs):
    dm = _module(path, **kwargs)
    dm.setup("fit")
    return dm


def test_splits_are_disjoint_and_complete(h5_file):
    dm = _fit_module(h5_file, val_size=0.2, test_size=0.1)
    parts = [set(dm.rows[s].tolist()) for s in ("train", "val", "test")]
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


def test_weights_optional(tmp_path):
    path = write_h5(tmp_path / "plain.h5", n=64, weight=None, normweight=None)
    with pytest.raises(SciMLError, match=r"missing dataset 'normweight'.*data.weight_key=null") as err:
        _fit_module(path)
    assert str(path) in str(err.value)
    batch = next(iter(_fit_module(path, weight_key=None).train_dataloader()))
    assert "w" not in batch and "y" in batch
    batch = next(iter(_fit_module(write_h5(tmp_path / "w.h5", n=64), weight_key="weight").train_dataloader()))
    assert torch.all(batch["w"] == 2.5e-3)


def test_channels_scaled_by_training_maximum(h5_file):
    dm = _fit_module(h5_file)
    with h5py.File(h5_file) as h5:
        train_max = h5["data"][np.sort(dm.rows["train"])].max(axis=(0, 2, 3))
    np.testing.assert_allclose(dm.normalizer.maximum.numpy(), train_max, rtol=1e-6)
    batch = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert float(batch["x"].max()) <= 1.0 + 1e-6
    # the maxima travel in checkpoints: a test-only module gets them from the state dict
    fresh = _module(h5_file)
    fresh.load_state_dict(dm.state_dict())
    fresh.setup("test")
    batch = next(iter(fresh.test_dataloader()))
    with h5py.File(h5_file) as h5:
        expected = h5["data"][np.sort(batch["index"].numpy())] / train_max.reshape(1, -1, 1, 1)
    order = np.argsort(batch["index"].numpy())
    np.testing.assert_allclose(fresh.on_after_batch_transfer(batch, 0)["x"].numpy()[order], expected, rtol=1e-6)


def test_lazy_reads_equal_in_memory(h5_file, tmp_path):
    write_h5(tmp_path / "b.h5", n=64, seed=3)
    in_memory = _fit_module(f"{tmp_path}/*.h5")
    lazy = _fit_module(f"{tmp_path}/*.h5", max_memory_gb=0)
    assert in_memory.store.in_memory and not lazy.store.in_memory
    assert len(in_memory.store) == 256 + 64
    index = np.array([300, 5, 260, 17, 2])  # unsorted, across both files
    index = index[np.isin(index, np.concatenate(list(in_memory.rows.values())))]
    a, b = in_memory.store.read(index), lazy.store.read(index)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    np.testing.assert_array_equal(in_memory.normalizer.maximum.numpy(), lazy.normalizer.maximum.numpy())


@pytest.mark.parametrize("chunks, compression", [(None, None), ((7, 2, 4, 4), "gzip"), ((1, 2, 4, 4), None)])
def test_read_rows_equals_fancy_indexing(tmp_path, monkeypatch, chunks, compression):
    """Dense runs (contiguous slices), gaps, window boundaries and isolated rows give the rows asked for."""
    monkeypatch.setattr(hep_reader, "WINDOW_BYTES", 40 * 2 * 4 * 4 * 4)  # 40-row windows: boundaries are crossed
    values = np.random.default_rng(0).normal(size=(500, 2, 4, 4)).astype(np.float32)
    with h5py.File(tmp_path / "a.h5", "w") as h5:
        h5.create_dataset("data", data=values, chunks=chunks, compression=compression)
    rng = np.random.default_rng(1)
    selections = [np.arange(500), np.arange(35, 85), np.sort(rng.choice(500, 350, replace=False)),
                  np.sort(rng.choice(500, 9, replace=False)), np.array([0, 1, 2, 250, 499]), np.array([7]),
                  np.zeros(0, np.int64)]
    with h5py.File(tmp_path / "a.h5") as h5:
        for rows in selections:
            np.testing.assert_array_equal(read_rows(h5["data"], rows), values[rows])


def test_test_path_replaces_test_split(h5_file, tmp_path):
    other = write_h5(tmp_path / "other.h5", n=40, seed=7)
    dm = _fit_module(h5_file, test_path=str(other))
    assert len(dm.rows["test"]) == 40 and len(dm.rows["train"]) + len(dm.rows["val"]) == 256


def test_unlabelled_files_are_predicted_not_trained_on(tmp_path, h5_file):
    unlabelled = write_h5(tmp_path / "new.h5", n=40, label=None, normweight=None)
    dm = _module(h5_file, test_path=str(unlabelled))
    dm.setup("test")
    assert not dm.has_labels("test") and dm.store is None, "a test-only run opens the test files only"
    batch = next(iter(dm.test_dataloader()))
    assert set(batch) == {"x", "index"}
    with pytest.raises(SciMLError, match="has no labels; training needs them") as err:
        _fit_module(unlabelled)
    assert str(unlabelled) in str(err.value)


def test_scores_file(tmp_path, h5_file):
    dm = _module(h5_file)
    dm.prepare("test")
    info = dm.store.infos[0]
    rows = np.array([3, 8, 9])
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]], np.float32)
    outputs = {"score": probabilities, "label": np.array([0, 1, 1]), "weight": np.ones(3, np.float32)}
    written = dm.reader.write(info, rows, outputs, tmp_path)
    assert written == [tmp_path / "images_scores.h5"] and not list(tmp_path.glob(".*tmp"))
    with h5py.File(written[0]) as h5:
        np.testing.assert_array_equal(h5["score"][...], probabilities[:, 1])
        np.testing.assert_array_equal(h5["probabilities"][...], probabilities)
        np.testing.assert_array_equal(h5["row"][...], rows)
        np.testing.assert_array_equal(h5["label"][...], [0, 1, 1])
        assert h5.attrs["source"] == str(h5_file.resolve())
    # another input of the same name, in another folder, does not overwrite it
    (tmp_path / "b").mkdir()
    twin = write_h5(tmp_path / "b" / "images.h5", n=16)
    dm = _module([str(h5_file), str(twin)])
    dm.prepare("test")
    names = [dm.reader.write(info, rows, outputs, tmp_path)[0].name for info in dm.store.infos]
    assert names == ["images_scores.h5", "b_images_scores.h5"]


def test_embedded_default_file_is_valid():
    if not DEFAULT_FILE.exists():
        pytest.fail(f"embedded default sample missing: {DEFAULT_FILE}")
    dm = _module(None)
    dm.prepare("fit")
    assert dm.input_shape == (3, 40, 40)
    assert dm.store.infos[0].labels and dm.store.infos[0].meta["weights"]
    labels = dm.store.read(np.arange(0, len(dm.store), 7))["y"]
    assert 0.4 < labels.mean() < 0.6


@pytest.mark.parametrize("replace, options, message", [
    ({"data": None}, {}, "missing dataset 'data'"),
    ({"normweight": None}, {}, "missing dataset 'normweight'"),
    ({"data": np.zeros((8, 16, 16), np.float32)}, {}, "'data' has shape \\(8, 16, 16\\)"),
    ({"data": np.zeros((8, 2, 16, 16), np.float32)}, {"channels": 3}, "2 channels, expected 3 \\(data.channels\\)"),
    ({"label": np.zeros(5, np.int32)}, {}, "'label' has shape \\(5,\\)"),
    ({"normweight": np.ones(9, np.float32)}, {}, "'normweight' has shape \\(9,\\)"),
])
def test_bad_layout_is_named(tmp_path, replace, options, message):
    n = 8
    arrays = {"label": np.zeros(n, np.int32), "normweight": np.ones(n, np.float32)}
    arrays.update(replace)
    path = write_h5(tmp_path / "bad.h5", n=n, **arrays)
    with pytest.raises(SciMLError, match=message) as err:
        _fit_module(path, **options)
    assert str(path) in str(err.value)


def test_nan_and_bad_labels_are_named(tmp_path):
    data = np.ones((8, 3, 16, 16), np.float32)
    data[3, 1, 2, 2] = np.nan
    path = write_h5(tmp_path / "nan.h5", n=8, data=data)
    with pytest.raises(SciMLError, match="1 NaN or infinite values in 'data'") as err:
        _fit_module(path)
    assert str(path) in str(err.value)
    path = write_h5(tmp_path / "w.h5", n=8, normweight=np.array([1, 1, np.inf, 1, 1, 1, 1, 1], np.float32))
    with pytest.raises(SciMLError, match="1 NaN or infinite values in 'normweight'"):
        _fit_module(path)
    path = write_h5(tmp_path / "labels.h5", n=8, label=np.full(8, 0.5, np.float32))
    with pytest.raises(SciMLError, match=r"'label' must be 0 \(background\) or 1 \(signal\), found \[0.5\]") as err:
        _fit_module(path)
    assert str(path) in str(err.value)


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


def test_files_of_different_image_shapes_are_refused(tmp_path):
    write_h5(tmp_path / "a.h5", n=16)
    other = write_h5(tmp_path / "b.h5", n=16, size=20)
    with pytest.raises(SciMLError, match=r"rows of shape \(3, 20, 20\)") as err:
        _fit_module(f"{tmp_path}/*.h5")
    assert str(other) in str(err.value)


def test_bad_arguments():
    with pytest.raises(SciMLError, match="data.batch_size"):
        DataModule(reader=CaloImages, batch_size=0)
    with pytest.raises(SciMLError, match="data.val_fraction: unknown key for CaloImages"):
        DataModule(reader=CaloImages, val_fraction=0.2)
