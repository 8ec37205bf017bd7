"""The HEP event simulation (Pythia 8 + FastJet -> calorimeter images in HDF5): layout, physics sanity, determinism."""
from __future__ import annotations

import importlib.util
import json

import h5py
import numpy as np
import pytest

from sciml_plugins.hep import simulate as sim

N, CHUNK, SIZE = 8, 4, 40
HAVE_GENERATOR = (importlib.util.find_spec("pythia8mc") or importlib.util.find_spec("pythia8")) is not None
needs_generator = pytest.mark.skipif(not HAVE_GENERATOR, reason="Pythia 8 (pythia8mc) not installed")


def read(path) -> tuple[dict, dict]:
    with h5py.File(path, "r") as h5:
        arrays = {k: h5[k][...] for k in ("data", "label", "weight", "normweight")}
        arrays.update({f"features/{k}": v[...] for k, v in h5["features"].items()})
        arrays.update({f"constituents/{k}": v[...] for k, v in h5["constituents"].items()})
        return arrays, dict(h5.attrs)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    pytest.importorskip("fastjet")
    if not HAVE_GENERATOR:
        pytest.skip("Pythia 8 (pythia8mc) not installed")
    tmp = tmp_path_factory.mktemp("sim")
    out = {}
    for name, n, seed, workers in (("w1", N, 1, 1), ("w2", N, 1, 2), ("seed2", CHUNK, 2, 1)):
        out[name] = tmp / f"{name}.h5"
        out[f"{name}_summary"] = sim.simulate(n, out[name], seed=seed, workers=workers, chunk_size=CHUNK)
    return out


@needs_generator
def test_layout_dtypes_and_attributes(runs):
    arrays, attrs = read(runs["w1"])
    assert arrays["data"].shape == (2 * N, 3, SIZE, SIZE) and arrays["data"].dtype == np.float32
    assert arrays["label"].shape == (2 * N,) and np.issubdtype(arrays["label"].dtype, np.integer)
    for key in ("weight", "normweight"):
        assert arrays[key].shape == (2 * N,) and arrays[key].dtype == np.float32
    for key in sim.FEATURES:
        assert arrays[f"features/{key}"].shape == (2 * N,)
    with h5py.File(runs["w1"], "r") as h5:
        assert h5["data"].compression == "gzip" and h5["data"].shuffle and h5["data"].chunks is not None
    for key in ("pythia_version", "sqrt_s_gev", "process_signal", "process_background", "pthat_min_gev",
                "pthat_max_gev", "seed", "chunk_size", "jet_definition", "selection", "image_size", "image_extent",
                "channels", "em_resolution", "had_resolution", "selection_efficiency_top",
                "selection_efficiency_qcd", "created_by"):
        assert key in attrs, key
    assert attrs["sqrt_s_gev"] == 14000 and attrs["seed"] == 1 and attrs["chunk_size"] == CHUNK
    assert len(json.loads(attrs["channels"])) == 3
    assert 0 < attrs["selection_efficiency_top"] <= 1 and 0 < attrs["selection_efficiency_qcd"] <= 1
    assert not runs["w1"].with_name(runs["w1"].name + ".tmp").exists()


@needs_generator
def test_labels_weights_and_selection(runs):
    arrays, _ = read(runs["w1"])
    label = arrays["label"]
    assert set(np.unique(label)) == {0, 1} and (label == 1).sum() == N
    assert 0 < label[:N].sum() < N, "signal and background are shuffled together"
    for c in (0, 1):
        w = arrays["weight"][label == c]
        assert np.all(w > 0) and np.allclose(w, w[0])
        np.testing.assert_allclose(arrays["normweight"][label == c].sum(), N, rtol=1e-5)
    pt, eta = arrays["features/pt"], arrays["features/eta"]
    assert np.all((pt >= 550) & (pt <= 650)) and np.all(np.abs(eta) < 2)


@needs_generator
def test_images_and_substructure(runs):
    arrays, _ = read(runs["w1"])
    data = arrays["data"]
    assert np.all(np.isfinite(data)) and np.all(data >= 0)
    tracks = data[:, 2]
    assert np.array_equal(tracks, np.round(tracks)) and tracks.sum(axis=(1, 2)).min() >= 1
    calo = data[:, :2].sum(axis=1)
    centre = calo[:, SIZE // 4: 3 * SIZE // 4, SIZE // 4: 3 * SIZE // 4].sum(axis=(1, 2)) / calo.sum(axis=(1, 2))
    assert centre.mean() > 0.75, "the jet's E_T sits at the image centre"
    for key in ("tau21", "tau32"):
        x = arrays[f"features/{key}"]
        assert np.all((x > 0) & (x <= 1)), key
    mass, label = arrays["features/mass"], arrays["label"]
    # Top jets carry the top mass (~175 GeV); QCD jets are lighter. Fixed seeds make this deterministic.
    assert np.median(mass[label == 1]) > np.median(mass[label == 0]) + 30


@needs_generator
def test_constituents(runs):
    """The leading constituents beside the images: padded arrays by pT, relative to the jet axis; with all of a
    jet's constituents stored, their summed momentum is the jet's."""
    with h5py.File(runs["w1"], "r") as h5:
        c = {k: h5["constituents"][k][...] for k in h5["constituents"]}
        attrs = dict(h5.attrs)
        n_constituents, jet_pt = h5["features/n_constituents"][...], h5["features/pt"][...]
    width = sim.SimConfig.n_constituents_max
    assert set(c) == {*sim.CONSTITUENTS, "count"} and attrs["constituents_max"] == width
    assert set(json.loads(attrs["constituents"])) == set(c)
    for key in sim.CONSTITUENTS:
        assert c[key].shape == (2 * N, width), key
    np.testing.assert_array_equal(c["count"], np.minimum(n_constituents, width))
    real = np.arange(width)[None, :] < c["count"][:, None]
    for key in sim.CONSTITUENTS:
        assert (c[key][~real] == 0).all(), key
    assert (np.diff(np.where(real, c["pt"], 0), axis=1) <= 0).all(), "leading constituents first"
    assert (c["pt"][real] > 0).all() and (c["energy"][real] >= c["pt"][real] * 0.999).all()
    assert set(np.unique(c["charge"][real])) <= {-1, 0, 1} and (c["pid"][real] != 0).all()
    assert (np.abs(c["dphi"]) <= np.pi).all()
    px = (c["pt"] * np.cos(c["dphi"])).sum(1)
    py = (c["pt"] * np.sin(c["dphi"])).sum(1)
    whole = c["count"] == n_constituents
    np.testing.assert_allclose(np.hypot(px, py)[whole], jet_pt[whole], rtol=1e-3)
    np.testing.assert_allclose(py[whole] / jet_pt[whole], 0, atol=1e-3)  # dphi is relative to the jet axis


@needs_generator
def test_bit_identical_across_workers_and_seed_dependent(runs):
    a, attrs_a = read(runs["w1"])
    b, attrs_b = read(runs["w2"])
    c, _ = read(runs["seed2"])
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key
    assert {k: str(v) for k, v in attrs_a.items()} == {k: str(v) for k, v in attrs_b.items()}
    assert runs["w1"].read_bytes() == runs["w2"].read_bytes()  # even the HDF5 bytes (no timestamps are stored)
    assert not np.array_equal(a["data"][: len(c["data"])], c["data"])
    summary = runs["w1_summary"]
    assert summary["n_jets"] == 2 * N and summary["events_per_s_per_process"] > 0 and summary["jets_per_s"] > 0


@pytest.mark.parametrize("kwargs, name", [({"n_jets_per_class": 0}, "n_jets_per_class"),
                                          ({"workers": 0}, "workers"), ({"chunk_size": -1}, "chunk_size"),
                                          ({"image_size": 1}, "image_size"), ({"seed": -3}, "seed")])
def test_bad_arguments_name_the_argument(tmp_path, kwargs, name):
    args = {"n_jets_per_class": 4, "out": tmp_path / "x.h5", **kwargs}
    with pytest.raises(ValueError, match=name):
        sim.simulate(**args)
    assert not (tmp_path / "x.h5").exists()


def test_cli_errors_are_one_line(tmp_path):
    with pytest.raises(SystemExit) as err:
        sim.main(["--n-jets", "0", "--out", str(tmp_path / "x.h5")])
    assert "--n-jets" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(SystemExit, match="--out"):
        sim.main(["--n-jets", "2", "--out", str(tmp_path / "missing" / "x.h5")])


def test_failed_write_leaves_no_file(tmp_path):
    out = tmp_path / "x.h5"
    arrays = {"data": np.zeros((2, 3, 4, 4), np.float32), "label": np.array([0, 1]),
              "weight": np.ones(2, np.float32), "normweight": np.ones(2, np.float32)}
    with pytest.raises(TypeError):
        sim._write(out, arrays, {"pt": np.ones(2)}, {"bad": {"a dict": "is not an HDF5 attribute"}})
    assert list(tmp_path.iterdir()) == []
