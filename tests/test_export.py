"""`python -m sciml export`: for every plugin (hep, climate, tumor, hail patches and storms) a tiny training run,
then both formats from the checkpoint alone; onnxruntime's and TorchScript's outputs on raw rows equal the PyTorch
pipeline's (the datamodule's normaliser, then the task's network), and bad input is one line with exit 2."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import FAST, sciml, write_h5
from hydra.utils import get_class, instantiate
from test_climate_data import write_files
from test_tumor_reader import write_cases

from sciml.data.normalize import NORMALIZERS
from sciml.export import export
from sciml.export import main as export_main
from sciml_plugins.hail import simulate

ONE_EPOCH = ["trainer.max_epochs=1", "callbacks.progress_bar=null", "trainer.enable_model_summary=false"]


def _hep(root):
    return ["+plugin=hep", f"data.path={write_h5(root / 'hep.h5', n=128)}", *FAST]


def _climate(root):
    write_files(root, files=2, steps=10, nlat=32, nlon=48)
    return ["+plugin=climate", f"data.path={root}", "model.widths=[8,16]", "data.batch_size=4", "data.num_maps=2"]


def _tumor(root):
    cases = write_cases(root, 4, shape=(36, 40, 12))
    return ["+plugin=tumor", f"data.path={cases}", "data.train_split=rest", "data.test_size=2", "data.patch_size=32",
            "data.batch_size=8", "data.samples_per_epoch=16", "model.channels=[8,16,32]", "model.strides=[2,2]",
            "model.downsample=1"]


def _hail(root):
    simulate.simulate(root, patches_per_storm=0.3, seed=5)
    return ["+plugin=hail", f"data.path={root}", "model.widths=[8,16]"]


def _storms(root):
    return ["+plugin=hail", "hail/data=storms"]


PLUGINS = {"hep": _hep, "climate": _climate, "tumor": _tumor, "hail": _hail, "storms": _storms}


_TRAINED: dict = {}


def trained(name, tmp_path_factory):
    """The last checkpoint of a one-epoch run of `name` (trained once per session)."""
    if name not in _TRAINED:
        root = tmp_path_factory.mktemp(f"{name}_data")
        run_dir = tmp_path_factory.mktemp("runs") / name
        result = sciml(*PLUGINS[name](root), f"hydra.run.dir={run_dir}", *ONE_EPOCH)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        _TRAINED[name] = run_dir / "checkpoints" / "last.ckpt"
    return _TRAINED[name]


@pytest.fixture(params=sorted(PLUGINS))
def checkpoint(request, tmp_path_factory):
    return request.param, trained(request.param, tmp_path_factory)


def reference(path):
    """The PyTorch pipeline rebuilt here from the checkpoint by hand: the datamodule's normaliser with its state,
    the network with the task's weights."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    config = ckpt["sciml"]["config"]
    network = instantiate(config["model"])
    network.load_state_dict({k[6:]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")})
    state = next(v for v in ckpt.values() if isinstance(v, dict) and "normalizer" in v)
    kind = state["normalize"]
    normalizer = (NORMALIZERS.get(kind) or get_class(kind))(config["model"]["input_shape"][0])
    normalizer.load_state_dict(state["normalizer"])
    return kind, normalizer.eval(), network.eval(), tuple(config["model"]["input_shape"])


def test_onnx_and_torchscript_match_pytorch(checkpoint, tmp_path):
    name, path = checkpoint
    kind, normalizer, network, shape = reference(path)
    # Raw rows on the scale of the data (energies, Kelvin, mm): the normaliser's work shows in the output.
    x = (torch.rand(5, *shape, generator=torch.Generator().manual_seed(0)) * 100).numpy()
    if name == "storms":
        x[0, 3] = np.nan  # a missing value: the storm normaliser fills it inside the graph
    with torch.no_grad():
        expected = network(normalizer(torch.from_numpy(x))).numpy()
        unnormalised = network(torch.from_numpy(x)).numpy()
    if kind != "none":
        assert np.nanmax(np.abs(expected - unnormalised)) > 1e-3, "the normaliser changes the output"

    onnx_file = export(path, "onnx", tmp_path / "net.onnx")
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": x})[0]
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < 1e-4, name
    assert np.abs(session.run(None, {"x": x[:1]})[0] - expected[:1]).max() < 1e-4, "dynamic batch axis"
    meta = {p.key: p.value for p in onnx.load(str(onnx_file)).metadata_props}
    assert json.loads(meta["sciml_input_shape"]) == list(shape)
    assert meta["sciml_plugin"] == ("hail" if name == "storms" else name)

    script = torch.jit.load(str(export(path, "torchscript", tmp_path / "net.pt")))
    assert np.abs(script(torch.from_numpy(x)).detach().numpy() - expected).max() < 1e-4, name
    assert script(torch.from_numpy(x[:3])).shape[0] == 3

    if name in ("hep", "tumor"):  # --probabilities: a softmax over the class axis
        probs = ort.InferenceSession(str(export(path, "onnx", tmp_path / "p.onnx", True))).run(None, {"x": x})[0]
        assert np.abs(probs - torch.from_numpy(expected).softmax(1).numpy()).max() < 1e-4


def test_cli_writes_next_to_the_checkpoint_and_names_bad_input(tmp_path, tmp_path_factory, capsys):
    ckpt = trained("storms", tmp_path_factory)
    done = sciml("export", str(ckpt), "--format", "onnx")
    assert done.returncode == 0, done.stderr[-3000:]
    assert ckpt.with_suffix(".onnx").is_file() and str(ckpt.with_suffix(".onnx")) in done.stdout
    bad = sciml("export", str(ckpt), "--format", "tflite")
    assert bad.returncode == 2 and bad.stderr.strip() == "sciml: error: export: --format 'tflite' is not one of " \
        "onnx, torchscript", bad.stderr

    other = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {}}, other)
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    for args, words in [((str(other), "--format", "onnx"), "carries no sciml config"),
                        ((str(tmp_path / "missing.ckpt"), "--format", "onnx"), "does not exist"),
                        ((str(tmp_path / "notes.txt"), "--format", "torchscript"), "not a readable checkpoint"),
                        ((str(ckpt), "--format", "onnx", "--input-shape", "a,b"), "not comma-separated integers")]:
        assert export_main(list(args)) == 2
        err = capsys.readouterr().err
        assert words in err and str(args[0]) in err or "input-shape" in err, err
        assert len(err.strip().splitlines()) == 1, err
