"""The hep plugin through the data contract, as a user meets it: predicting new files from a checkpoint alone, the
same test metrics from one process and from two DDP ranks, and images of another shape with no weights."""
import json
import re

import h5py
import numpy as np
import pytest
from conftest import FAST, sciml, write_h5

pytestmark = pytest.mark.timeout(300)
ROWS = 326  # 49 test rows: an odd count, split unevenly over 2 ranks


def _ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_h5(tmp_path_factory.mktemp("data") / "images.h5", n=ROWS)


@pytest.fixture(scope="module")
def best_ckpt(tmp_path_factory, data_file):
    run_dir = tmp_path_factory.mktemp("runs") / "hep"
    _ok(sciml("+plugin=hep", f"data.path={data_file}", f"hydra.run.dir={run_dir}", *FAST, "trainer.max_epochs=2"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "val/auc_best" in metrics, "the objective, val/auc_best, is measured"
    (best,) = (run_dir / "checkpoints").glob("best-*.ckpt")
    return best


def test_predict_new_files_from_the_checkpoint_alone(tmp_path, best_ckpt):
    """From another working directory, with nothing but the checkpoint: an unlabelled file is predicted (not
    scored), a labelled one predicted and scored; each gets <stem>_scores.h5 pointing back to its rows."""
    unlabelled = write_h5(tmp_path / "new_events.h5", n=37, seed=5, label=None, normweight=None, weight=None)
    labelled = write_h5(tmp_path / "more.h5", n=40, seed=6)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "fresh"
    _ok(sciml("predict", str(best_ckpt), str(unlabelled), str(labelled), "-o", str(out), cwd=elsewhere))
    assert not any(elsewhere.iterdir()), "nothing may be written outside the output directory"
    with h5py.File(out / "predictions" / "new_events_scores.h5") as h5:
        assert "label" not in h5 and "weight" not in h5
        np.testing.assert_array_equal(h5["row"][...], np.arange(37))
        probabilities = h5["probabilities"][...]
        np.testing.assert_allclose(probabilities.sum(axis=1), 1, rtol=1e-5)
        np.testing.assert_array_equal(h5["score"][...], probabilities[:, 1])
        assert h5.attrs["source"] == str(unlabelled)
    with h5py.File(out / "predictions" / "more_scores.h5") as h5:
        np.testing.assert_array_equal(h5["row"][...], np.arange(40))
    # one unlabelled input: the files are predicted, not scored
    metrics = json.loads((out / "metrics.json").read_text())
    assert not any(k.startswith("test/") for k in metrics)
    scored = tmp_path / "scored"
    _ok(sciml("predict", str(best_ckpt), str(labelled), "-o", str(scored), cwd=elsewhere))
    metrics = json.loads((scored / "metrics.json").read_text())
    assert 0.5 < metrics["test/auc"] <= 1 and not any(k.startswith(("train/", "val/")) for k in metrics)
    with h5py.File(scored / "predictions" / "more_scores.h5") as h5, h5py.File(labelled) as source:
        np.testing.assert_array_equal(h5["label"][...], source["label"][...])
        np.testing.assert_array_equal(h5["weight"][...], source["normweight"][...])


def test_two_ranks_score_the_test_split_like_one_process(tmp_path, best_ckpt, data_file):
    """`train=false ckpt_path=...` on the training file's test split: 2 DDP ranks on CPU give the test metrics of one
    process, and the predictions hold every test row exactly once."""
    runs = {}
    for name, extra in (("one", []), ("ddp", ["strategy=ddp", "trainer.accelerator=cpu", "trainer.devices=2"])):
        runs[name] = tmp_path / name
        _ok(sciml("+plugin=hep", "train=false", f"ckpt_path={best_ckpt}", f"hydra.run.dir={runs[name]}",
                  "callbacks.progress_bar=null", *extra))
    one, ddp = (json.loads((runs[k] / "metrics.json").read_text()) for k in ("one", "ddp"))
    tests = sorted(k for k in one if k.startswith("test/"))
    assert "test/auc" in tests and tests == sorted(k for k in ddp if k.startswith("test/"))
    for key in (k for k in tests if "_ci_" not in k and "ks_pvalue" not in k):  # intervals resample in gathered order; KS uses rank 0's training shard
        assert ddp[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), key
    assert re.search(r"data \(rank 1 of 2\): .*test 24\n", (runs["ddp"] / "hep_rank1.log").read_text())
    scores = {}
    for name, run in runs.items():
        with h5py.File(run / "predictions" / "images_scores.h5") as h5:
            scores[name] = h5["row"][...], h5["score"][...]
    rows = scores["one"][0]
    assert len(rows) == 49 and len(np.unique(rows)) == 49
    np.testing.assert_array_equal(scores["ddp"][0], rows)
    np.testing.assert_allclose(scores["ddp"][1], scores["one"][1], rtol=1e-5)


def _jet_images(n: int, seed: int = 0):
    """Sparse 2-channel 33x33 images like the quark/gluon set (≤ 10 lit pixels per jet, charged and neutral pT
    fractions): quark jets (label 1) are narrower than gluon jets."""
    rng = np.random.default_rng(seed)
    label = (np.arange(n) % 2).astype(np.int8)
    images = np.zeros((n, 2, 33, 33), np.float32)
    for i in range(n):  # test data only
        spread = 2.0 if label[i] else 5.0
        y, x = np.clip(np.round(rng.normal(16, spread, (2, 10))), 0, 32).astype(int)
        pt = rng.exponential(1.0, 10)
        np.add.at(images[i], (rng.integers(0, 2, 10), y, x), pt / pt.sum())
    return images, label


def test_images_of_any_shape_without_weights(tmp_path):
    """Issue 13: quark/gluon images (N, 2, 33, 33) with labels and no weights train with data.path and
    data.weight_key=null alone: channels and image size come from the file."""
    images, label = _jet_images(400)
    path = tmp_path / "qg_jets.h5"
    with h5py.File(path, "w") as h5:
        h5["data"], h5["label"] = images, label
    run_dir = tmp_path / "run"
    _ok(sciml("+plugin=hep", f"data.path={path}", "data.weight_key=null", f"hydra.run.dir={run_dir}"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test/auc"] > 0.75, "narrow and wide jets are easy to tell apart"
    config = (run_dir / "config.yaml").read_text()
    assert "input_shape:\n  - 2\n  - 33\n  - 33" in config
    with h5py.File(run_dir / "predictions" / "qg_jets_scores.h5") as h5:
        assert len(h5["score"]) == 60 and "weight" not in h5
