"""Jets as particle clouds (hep/input=particles): the reader's formats (HDF5 groups and (N, P, F) arrays, .npy pairs,
.npz, ROOT through uproot) give the same rows; masking is exact in the networks and in the standardisation; the CLI
trains on each format."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from conftest import sciml

from sciml.errors import SciMLError
from sciml_plugins.hep.particle_nets import ParticleFlowNetwork, ParticleNet
from sciml_plugins.hep.particles import JetParticles, ParticleStandardize

pytestmark = pytest.mark.timeout(300)
QG_FIELDS = "data.fields={pt:0,eta:1,phi:2,pid:3}"  # the quark/gluon .npy columns (pT, y, phi, PDG id)
TINY = ["model.k=4", "model.edge_convs=[[8,8],[8,8]]", "model.fc=[8]", "data.batch_size=32",
        "optimizer.lr=0.01", "callbacks.progress_bar=null", "trainer.enable_model_summary=false"]


def make_jets(n: int, width: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    """Jets of 3..width particles, leading first, zero-padded: signal (label 1) has three prongs, background one.
    Absolute eta and phi (phi near the +-pi seam for some jets), as in files that are not centred."""
    rng = np.random.default_rng(seed)
    label = (np.arange(n) % 2).astype(np.int32)
    count = rng.integers(3, width + 1, n)
    out = {k: np.zeros((n, width)) for k in ("pt", "eta", "phi", "energy", "charge", "pid")}
    kinds = np.array([22, 211, -211, 130, 2112, 11, -13, 321])
    for i in range(n):  # test data only
        m = count[i]
        prong = rng.integers(0, 3 if label[i] else 1, m)
        offsets = np.array([[0, 0], [0.3, 0.1], [-0.1, -0.3]])[prong]
        eta0, phi0 = rng.uniform(-1.5, 1.5), rng.uniform(-np.pi, np.pi)
        pt = np.sort(rng.exponential(30, m) + 1)[::-1]
        eta = eta0 + offsets[:, 0] + rng.normal(0, 0.03, m)
        phi = (phi0 + offsets[:, 1] + rng.normal(0, 0.03, m) + np.pi) % (2 * np.pi) - np.pi
        pid = rng.choice(kinds, m)
        out["pt"][i, :m], out["eta"][i, :m], out["phi"][i, :m] = pt, eta, phi
        out["energy"][i, :m] = pt * np.cosh(eta)
        out["pid"][i, :m] = pid
        out["charge"][i, :m] = np.where(np.isin(np.abs(pid), (211, 321)), np.sign(pid),
                                        np.where(np.isin(np.abs(pid), (11, 13)), -np.sign(pid), 0))
    return out | {"count": count.astype(np.int16), "label": label}


def write_group_h5(path, jets, **extra):
    with h5py.File(path, "w") as h5:
        for key in ("pt", "eta", "phi", "energy", "charge", "pid", "count"):
            h5[f"constituents/{key}"] = jets[key].astype(np.float32 if jets[key].dtype.kind == "f" else jets[key].dtype)
        h5["label"] = jets["label"]
        for key, value in extra.items():
            h5[key] = value
    return path


def write_npy_pair(folder, jets, name="jets"):
    """The EnergyFlow layout of the quark/gluon sample: (N, P, 4) pT, rapidity, phi, PDG id + labels (N,)."""
    x = np.stack([jets["pt"], jets["eta"], jets["phi"], jets["pid"]], axis=-1)
    np.save(folder / f"{name}_x10.npy", x)
    np.save(folder / f"{name}_y10.npy", jets["label"].astype(np.float64))
    return folder / f"{name}_x10.npy"


def write_root(path, jets, shuffle_seed=None):
    """Jagged per-particle branches (weaver-core's part_* ntuples), not sorted by pT when shuffle_seed is given."""
    uproot = pytest.importorskip("uproot")
    ak = pytest.importorskip("awkward")
    rng = np.random.default_rng(shuffle_seed)
    orders = [rng.permutation(m) if shuffle_seed is not None else np.arange(m) for m in jets["count"]]
    branches = {f"part_{key}": ak.Array([jets[key][i, :m][order].astype(np.float32)
                                         for i, (m, order) in enumerate(zip(jets["count"], orders))])
                for key in ("pt", "eta", "phi", "energy", "charge", "pid")}
    columns = {**branches, "label": jets["label"].astype(np.int32), "weight": np.full(len(jets["label"]), 2.0)}
    with uproot.recreate(path) as f:  # a TTree, as analysis frameworks write them (uproot's default is RNTuple)
        f.mktree("tree", {k: "var * float32" if k.startswith("part_") else v.dtype for k, v in columns.items()})
        f["tree"].extend(columns)
    return path


def reader_rows(reader, path, rows=None):
    info = reader.open(path)
    rows = np.arange(info.rows) if rows is None else rows
    return info, reader.read(info, rows)


# -- the reader ---------------------------------------------------------------------------------------------------
def test_every_format_gives_the_same_rows(tmp_path):
    """HDF5 group, HDF5 (N, P, F) dataset, .npy pair, .npz and a ROOT file of the same jets read to the same
    network inputs (centred, leading by pT, padded and masked); the ROOT file's particles are not sorted by pT."""
    jets = make_jets(40, width=12)
    fields = {"pt": 0, "eta": 1, "phi": 2, "pid": 3}
    x4 = np.stack([jets["pt"], jets["eta"], jets["phi"], jets["pid"]], axis=-1).astype(np.float32)
    write_group_h5(tmp_path / "group.h5", jets)
    with h5py.File(tmp_path / "array.h5", "w") as h5:
        h5["particle_features"], h5["label"] = x4, jets["label"]
    npy = write_npy_pair(tmp_path, {**jets, **{k: jets[k].astype(np.float32) for k in ("pt", "eta", "phi")}})
    np.savez(tmp_path / "jets.npz", X=x4, y=jets["label"])
    write_root(tmp_path / "jets.root", jets, shuffle_seed=1)

    common = dict(max_particles=12)
    readers = {
        "group": (JetParticles(fields={"pt": "pt", "eta": "eta", "phi": "phi", "pid": "pid", "count": "count"},
                               **common), tmp_path / "group.h5"),
        "array": (JetParticles(fields=fields, particles="particle_features", **common), tmp_path / "array.h5"),
        "npy": (JetParticles(fields=fields, **common), npy),
        "npz": (JetParticles(fields=fields, **common), tmp_path / "jets.npz"),
        "root": (JetParticles(fields={r: f"part_{r}" for r in ("pt", "eta", "phi", "pid")}, **common),
                 tmp_path / "jets.root"),
    }
    rows = np.array([0, 3, 4, 17, 39])
    results = {name: reader_rows(r, p, rows) for name, (r, p) in readers.items()}
    ref_info, ref = results["group"]
    assert ref_info.shape == (len(readers["group"][0].channel_names), 12) and ref_info.rows == 40
    for name, (info, out) in results.items():
        assert info.shape == ref_info.shape and info.labels, name
        np.testing.assert_allclose(out["x"], ref["x"], atol=2e-5, err_msg=name)
        np.testing.assert_array_equal(out["y"], jets["label"][rows], err_msg=name)
    x, mask = ref["x"], ref["x"][:, -1]
    np.testing.assert_array_equal(mask.sum(1), jets["count"][rows])
    assert (x[:, :, :][np.broadcast_to(mask[:, None] == 0, x.shape)] == 0).all(), "padding is 0 in every channel"
    channel = readers["group"][0].channel_names.index
    pt = np.exp(x[:, channel("log_pt")])
    assert (np.diff(np.where(mask > 0, pt, 0), axis=1) <= 1e-3).all(), "leading particles first"
    # centred: the pT-weighted mean position sits near the axis, also for jets across the phi = +-pi seam
    for c in ("deta", "dphi"):
        assert np.abs((x[:, channel(c)] * pt).sum(1) / pt.sum(1)).max() < 0.05


def test_cut_pad_and_one_line_errors(tmp_path):
    jets = make_jets(10, width=12)
    path = write_group_h5(tmp_path / "jets.h5", jets)
    fields = {"pt": "pt", "eta": "eta", "phi": "phi", "count": "count"}
    _, cut = reader_rows(JetParticles(fields=fields, max_particles=5), path)
    _, full = reader_rows(JetParticles(fields=fields, max_particles=20), path)
    assert cut["x"].shape[2] == 5 and full["x"].shape[2] == 20 and (full["x"][:, :, 12:] == 0).all()
    # the leading 5, centred on all particles read
    np.testing.assert_allclose(cut["x"], full["x"][:, :, :5], atol=1e-6)
    with pytest.raises(SciMLError, match="data.fields.energy"):
        JetParticles(fields={**fields, "energy": "nope"}).open(path)
    with pytest.raises(SciMLError, match="no 'phi' field"):
        JetParticles(fields={"pt": "pt", "eta": "eta"})
    with pytest.raises(SciMLError, match="'log_e' needs the 'energy' field"):
        JetParticles(fields=fields, features=["log_e"])
    with pytest.raises(SciMLError, match="missing dataset 'normweight'"):
        JetParticles(fields=fields, weight_key="normweight").open(path)
    with pytest.raises(SciMLError, match="column number"):
        JetParticles(fields={"pt": 0, "eta": 1, "phi": 9}).open(write_npy_pair(tmp_path, jets))
    bad = write_group_h5(tmp_path / "bad.h5", {**jets, "label": jets["label"] + 2})
    reader = JetParticles(fields=fields)
    with pytest.raises(SciMLError, match="must be 0 .* or 1"):
        reader.read(reader.open(bad), np.arange(3))


def test_standardisation_ignores_padding_and_survives_a_checkpoint():
    """The statistics of real particles only: the same with 4 or 40 padded slots; padding stays 0."""
    reader = JetParticles(fields={"pt": "pt", "eta": "eta", "phi": "phi", "energy": "energy", "charge": "charge",
                                  "pid": "pid", "count": "count"})
    jets = make_jets(64, width=10)
    raw = {k: jets[k] for k in ("pt", "eta", "phi", "energy", "charge", "pid", "count")}
    narrow, wide = reader.to_inputs(raw, 14), reader.to_inputs(raw, 50)
    fitted = []
    for x in (narrow, wide):
        norm = ParticleStandardize(x.shape[1])
        norm.fit([x[:30], x[30:]])
        fitted.append(norm)
    for key in ("mean", "std"):
        np.testing.assert_allclose(fitted[0].state_dict()[key], fitted[1].state_dict()[key], rtol=1e-5)
    real = narrow[:, :-1].transpose(0, 2, 1)[narrow[:, -1] > 0]
    np.testing.assert_allclose(fitted[0].mean[:-1].numpy(), real.mean(0), rtol=1e-4, atol=1e-5)
    assert fitted[0].mean[-1] == 0 and fitted[0].std[-1] == 1
    out = fitted[0](torch.from_numpy(wide))
    assert (out[:, :, 14:] == 0).all() and torch.equal(out[:, -1], torch.from_numpy(wide[:, -1]))
    restored = ParticleStandardize(narrow.shape[1])
    restored.load_state_dict(fitted[0].state_dict())
    assert torch.equal(restored(torch.from_numpy(narrow)), fitted[0](torch.from_numpy(narrow)))


# -- masking in the networks --------------------------------------------------------------------------------------
def _padded_variants(seed=0):
    """One batch of jets twice: (a) leading first, zero-padded to 12; (b) particles permuted, padded to 20 with
    the padding interleaved and holding garbage (large values, NaN)."""
    rng = np.random.default_rng(seed)
    batch, features, width = 6, 5, 12
    counts = np.array([1, 2, 3, 7, 12, 9])
    a = np.zeros((batch, features + 1, width), np.float32)
    b = rng.normal(0, 1e3, (batch, features + 1, 20)).astype(np.float32)
    b[:, :, ::7] = np.nan
    b[:, -1] = 0
    for i, n in enumerate(counts):
        real = rng.normal(0, 1, (features, n)).astype(np.float32)
        a[i, :-1, :n], a[i, -1, :n] = real, 1
        slots = np.sort(rng.choice(20, n, replace=False))
        b[i, :-1, slots] = real[:, rng.permutation(n)].T
        b[i, -1, slots] = 1
    return torch.from_numpy(a), torch.from_numpy(b)


@pytest.mark.parametrize("network", [
    lambda shape: ParticleFlowNetwork(shape, phi_sizes=[16, 16], f_sizes=[16]),
    lambda shape: ParticleFlowNetwork(shape, phi_sizes=[16], f_sizes=[], pool="mean"),
    lambda shape: ParticleNet(shape, k=3, edge_convs=[[8, 8], [16]], fusion=8, fc=[8], dropout=0.0),
], ids=["pfn", "pfn-mean", "particlenet"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_padding_and_order_never_change_the_output(network, training):
    """Exact masking: permuting a jet's particles and padding it differently (garbage, NaN, interleaved) gives the
    same output, in training mode too (batch-norm statistics see only real particles)."""
    torch.manual_seed(0)
    a, b = _padded_variants()
    model = network(tuple(a.shape[1:]))
    model.train(training)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        out_a = model(a)
        after_a = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(initial)
        out_b = model(b)
    assert torch.isfinite(out_a).all()
    torch.testing.assert_close(out_b, out_a, rtol=1e-4, atol=1e-5)
    for key, value in model.state_dict().items():  # training: the running statistics agree as well
        torch.testing.assert_close(value, after_a[key], rtol=1e-4, atol=1e-5)
    # and a jet's score does not depend on the other jets in eval mode
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(b[3:4]), model(b)[3:4], rtol=1e-4, atol=1e-5)


def test_networks_backpropagate_and_validate_their_arguments():
    x = _padded_variants()[1]
    for model in (ParticleFlowNetwork(tuple(x.shape[1:])), ParticleNet(tuple(x.shape[1:]))):
        model(x).sum().backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
    with pytest.raises(ValueError, match="input_shape"):
        ParticleNet((3, 4, 5))
    with pytest.raises(ValueError, match="model.pool"):
        ParticleFlowNetwork((4, 10), pool="max")


# -- the CLI --------------------------------------------------------------------------------------------------------
def _ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_cli_trains_on_particles_and_predicts_from_the_checkpoint(tmp_path):
    """hep/input=particles on an HDF5 file of constituents (the simulation's layout): trains, tests, writes
    scores; `predict` rescores a file with the checkpoint's standardisation."""
    jets = make_jets(400, width=16)
    jets |= {"eta": jets["eta"] - jets["eta"][:, :1], "phi": jets["phi"] - jets["phi"][:, :1]}  # relative
    path = write_group_h5(tmp_path / "jets.h5", {**jets, "deta": jets["eta"], "dphi": jets["phi"]})
    with h5py.File(path, "a") as h5:  # the simulation's names
        h5.move("constituents/eta", "constituents/deta")
        h5.move("constituents/phi", "constituents/dphi")
    run = tmp_path / "run"
    _ok(sciml("+plugin=hep", "hep/input=particles", f"data.path={path}", f"hydra.run.dir={run}", *TINY,
              "trainer.max_epochs=3"))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test/auc"] > 0.85, "one prong against three"
    config = (run / "config.yaml").read_text()
    assert "input_shape:\n  - 14\n  - 16" in config and "ParticleNet" in config
    with h5py.File(run / "predictions" / "jets_scores.h5") as h5:
        assert len(h5["score"]) == 60
    ckpt = next((run / "checkpoints").glob("best-*.ckpt"))
    out = tmp_path / "scored"
    _ok(sciml("predict", str(ckpt), str(path), "-o", str(out)))
    scored = json.loads((out / "metrics.json").read_text())
    assert scored["test/auc"] > 0.85


def test_cli_quark_gluon_npy_with_the_pfn(tmp_path):
    """The real quark/gluon sample's layout (.npy pair, (N, 10, 4): pT, rapidity, phi, PDG id) trains with
    data.path and data.fields alone; hep/network=pfn."""
    jets = make_jets(300, width=10, seed=3)
    npy = write_npy_pair(tmp_path, jets, name="qg_jets")
    run = tmp_path / "run"
    _ok(sciml("+plugin=hep", "hep/input=particles", "hep/network=pfn", f"data.path={tmp_path}/qg_jets_*10.npy",
              QG_FIELDS, f"hydra.run.dir={run}", "model.phi_sizes=[16,16]", "model.f_sizes=[16]",
              "data.batch_size=32", "optimizer.lr=0.01", "callbacks.progress_bar=null", "trainer.max_epochs=4"))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test/auc"] > 0.8
    config = (run / "config.yaml").read_text()
    assert "ParticleFlowNetwork" in config and "input_shape:\n  - 12\n  - 10" in config  # no energy: 11 + mask
    assert (run / "predictions" / f"{npy.stem}_scores.h5").exists()


def test_cli_root_ntuple(tmp_path):
    """A ROOT file of jagged constituent branches trains with the branch names as fields, weights from a branch."""
    jets = make_jets(300, width=14, seed=4)
    path = write_root(tmp_path / "ntuple.root", jets, shuffle_seed=2)
    fields = "data.fields={pt:part_pt,eta:part_eta,phi:part_phi,energy:part_energy,charge:part_charge,pid:part_pid}"
    run = tmp_path / "run"
    _ok(sciml("+plugin=hep", "hep/input=particles", f"data.path={path}", fields, "data.weight_key=weight",
              f"hydra.run.dir={run}", *TINY, "trainer.max_epochs=3"))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test/auc"] > 0.85
    assert "input_shape:\n  - 14\n  - 14" in (run / "config.yaml").read_text()  # the file's longest jet
    with h5py.File(run / "predictions" / "ntuple_scores.h5") as h5:
        np.testing.assert_array_equal(h5["weight"][...], 2.0)


def test_cli_bad_field_is_one_line(tmp_path):
    path = write_group_h5(tmp_path / "jets.h5", make_jets(50))
    result = sciml("+plugin=hep", "hep/input=particles", f"data.path={path}", "data.fields={pt:pt,eta:eta,phi:nope}",
                   f"hydra.run.dir={tmp_path / 'run'}")
    text = result.stdout + result.stderr
    assert result.returncode != 0 and "Traceback" not in text, text[-2000:]
    assert any("constituents/nope" in line and "data.fields.phi" in line for line in text.splitlines()), text[-2000:]
