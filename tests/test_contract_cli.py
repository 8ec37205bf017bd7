"""The data contract end to end, with the third-party example plugin as a user installs it: a checkpoint that carries
its config, `python -m sciml predict` on labelled and unlabelled files from anywhere, and DDP metrics that count
every test row once."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import sciml

QUIET = ["callbacks.progress_bar=null", "trainer.enable_model_summary=false"]


def blobs(path, n: int, seed: int, labels: bool = True):
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 2).astype(np.int64)
    x = (rng.normal(size=(n, 4)) + 2.0 * y[:, None]).astype(np.float32) * np.float32([1, 10, 100, 0.1])
    np.savez(path, x=x, **({"y": y} if labels else {}))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, example_plugin):
    run_dir = tmp_path_factory.mktemp("runs") / "example"
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    result = sciml("+plugin=example", f"hydra.run.dir={run_dir}", *QUIET, env=example_plugin, cwd=elsewhere)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert not any(elsewhere.iterdir())
    return run_dir


def test_checkpoint_carries_plugin_config_and_statistics(trained):
    ckpt = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["sciml"]["plugin"] == "example"
    config = ckpt["sciml"]["config"]
    assert config["data"]["reader"] == "sciml_example.data.NpzReader"
    assert config["model"]["input_shape"] == [4], "the data's row shape reaches the model config"
    state = ckpt["DataModule"]["normalizer"]
    assert state["mean"].shape == (4,) and float(state["std"][2]) > 50  # the 100x feature's spread
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["val/auc_best"] > 0.9 and metrics["test/auc"] > 0.9


def test_predict_unlabelled_file_from_checkpoint_alone(trained, example_plugin, tmp_path):
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    blobs(elsewhere / "new.npz", 37, seed=9, labels=False)
    out = tmp_path / "fresh" / "predicted"
    result = sciml("predict", str(trained / "checkpoints" / "last.ckpt"), "new.npz", "-o", str(out), *QUIET,
                   env=example_plugin, cwd=elsewhere)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    scores = np.load(out / "predictions" / "new_scores.npz")
    assert scores["row"].tolist() == list(range(37)) and "label" not in scores.files
    assert np.allclose(scores["score"].sum(axis=1), 1.0, atol=1e-6)
    metrics = json.loads((out / "metrics.json").read_text())
    assert not any(k.startswith("test/") for k in metrics), "unlabelled files are predicted, not scored"
    assert sorted(p.name for p in (out / "predictions").iterdir()) == ["new_scores.npz"]


def test_predict_scores_labelled_files_and_ddp_counts_every_row_once(trained, example_plugin, tmp_path):
    data = blobs(tmp_path / "labelled.npz", 101, seed=4)  # odd: 2 ranks hold 51 and 50 rows
    ckpt = str(trained / "checkpoints" / "last.ckpt")
    one = sciml("predict", ckpt, str(data), "-o", str(tmp_path / "one"), *QUIET, env=example_plugin)
    assert one.returncode == 0, one.stderr[-2000:]
    two = sciml("predict", ckpt, str(data), "-o", str(tmp_path / "two"), "strategy=ddp", "trainer.devices=2",
                "trainer.accelerator=cpu", *QUIET, env=example_plugin, timeout=300)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-2000:]
    m1, m2 = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    tests = [k for k in m1 if k.startswith("test/") and "_ci_" not in k and "ks_pvalue" not in k]  # intervals resample in gathered order; KS uses rank 0's training shard
    assert "test/auc" in tests
    for key in tests:
        assert m2[key] == pytest.approx(m1[key], abs=1e-6), key
    s1, s2 = (np.load(tmp_path / d / "predictions" / "labelled_scores.npz") for d in ("one", "two"))
    assert s2["row"].tolist() == list(range(101)) and s2["label"].tolist() == (np.arange(101) % 2).tolist()
    assert np.allclose(s1["score"], s2["score"], atol=1e-6)


def test_old_test_only_form_needs_no_repeated_overrides(trained, example_plugin, tmp_path):
    data = blobs(tmp_path / "labelled.npz", 40, seed=2)
    out = tmp_path / "eval"
    result = sciml("+plugin=example", "train=false", f"ckpt_path={trained / 'checkpoints' / 'last.ckpt'}",
                   f"data.test_path={data}", f"hydra.run.dir={out}", *QUIET, env=example_plugin)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((out / "metrics.json").read_text())["test/auc"] > 0.9


def test_reader_keys_are_data_keys_and_unknown_ones_are_named(example_plugin, tmp_path):
    result = sciml("+plugin=example", "+data.featurs=4", f"hydra.run.dir={tmp_path / 'r'}", *QUIET,
                   env=example_plugin)
    assert result.returncode != 0
    assert "unknown key data.featurs, did you mean data.features?" in result.stderr
    wrong = blobs(tmp_path / "five.npz", 10, seed=0)
    np.savez(wrong, x=np.zeros((10, 5), np.float32), y=np.zeros(10, np.int64))
    result = sciml("+plugin=example", f"data.path={wrong}", f"hydra.run.dir={tmp_path / 's'}", *QUIET,
                   env=example_plugin)
    assert result.returncode != 0
    assert "five.npz: expected 'x' of shape (N, 4) (data.features)" in result.stdout + result.stderr


def test_predict_refuses_what_is_not_a_checkpoint(example_plugin, tmp_path):
    bogus = tmp_path / "model.ckpt"
    bogus.write_text("not a checkpoint")
    result = sciml("predict", str(bogus), "x.npz", env=example_plugin)
    assert result.returncode == 2 and "is not a readable Lightning checkpoint" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
