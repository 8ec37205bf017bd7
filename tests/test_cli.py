"""The command line as a user meets it: the run contract, resume, test-only runs, errors and multirun."""
import csv
import json

import h5py
import pytest
import torch
from conftest import FAST, sciml, write_h5


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_h5(tmp_path_factory.mktemp("data") / "images.h5", n=384)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, data_file):
    """One training run, started from an unrelated directory, into an explicit run directory."""
    run_dir = tmp_path_factory.mktemp("runs") / "first"
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    result = sciml("+plugin=hep", f"data.path={data_file}", f"hydra.run.dir={run_dir}", *FAST,
                   "trainer.max_epochs=4", cwd=elsewhere)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert not any(elsewhere.iterdir()), "nothing may be written outside the run directory"
    return run_dir


def test_run_directory_contract(trained_run):
    metrics = json.loads((trained_run / "metrics.json").read_text())
    for key in ("test/auc", "test/acc", "test/sig_eff_at_bkg_eff_1e-2", "test/sig_eff_at_bkg_eff_1e-3",
                "test/bkg_rej_at_sig_eff_0.5", "test/loss", "val/loss", "val/auc", "train/loss",
                "train/samples_per_s", "test/auc_ci_low", "test/auc_ci_high", "test/bkg_events_at_bkg_eff_1e-3"):
        assert isinstance(metrics[key], float), key
    assert metrics["test/auc_ci_low"] <= metrics["test/auc"] <= metrics["test/auc_ci_high"]
    # 58 test jets: the 1e-3 working point rests on a fraction of one background jet, and says so
    assert "background events" in metrics["warning/test/sig_eff_at_bkg_eff_1e-3"]
    assert metrics["test/auc"] > 0.9, "the synthetic two-prong images are easy to separate"
    assert metrics["train/samples_per_s"] > 0

    config = (trained_run / "config.yaml").read_text()
    assert "${" not in config and "KurthCNN" in config, "config.yaml is the resolved config"
    assert (trained_run / "checkpoints" / "last.ckpt").is_file()
    best = list((trained_run / "checkpoints").glob("best-*.ckpt"))
    assert len(best) == 1
    for plot in ("roc.png", "training_curves.png", "score_distributions.png"):
        assert (trained_run / "plots" / plot).read_bytes()[:4] == b"\x89PNG"
    with h5py.File(trained_run / "predictions" / "images_scores.h5") as h5:  # <input stem>_scores.h5
        scores, labels = h5["score"][...], h5["label"][...]
        assert len(scores) == len(labels) == round(0.15 * 384)
        assert ((0 <= scores) & (scores <= 1)).all()
        assert h5["row"][...].max() < 384


def test_checkpoint_keeps_channel_normalisation(trained_run):
    ckpt = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=False)
    state = ckpt["DataModule"]
    assert state["normalize"] == "max"
    maximum = state["normalizer"]["maximum"]
    assert len(maximum) == 3 and float(maximum.min()) > 0


def test_test_only_run_on_a_new_file(trained_run, tmp_path):
    unseen = write_h5(tmp_path / "unseen.h5", n=96, seed=11)
    out = tmp_path / "eval"
    result = sciml("+plugin=hep", "train=false", f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}",
                   f"data.path={unseen}", f"data.test_path={unseen}", f"hydra.run.dir={out}", *FAST)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test/auc"] > 0.9 and not any(k.startswith("train/") for k in metrics)
    with h5py.File(out / "predictions" / "unseen_scores.h5") as h5:
        assert len(h5["score"]) == 96


def test_interrupted_run_resumes_in_place(tmp_path, data_file):
    run_dir = tmp_path / "resumable"
    first = sciml("+plugin=hep", f"data.path={data_file}", f"hydra.run.dir={run_dir}", *FAST,
                  "trainer.max_epochs=1")
    assert first.returncode == 0, first.stderr[-3000:]
    second = sciml("+plugin=hep", f"data.path={data_file}", f"hydra.run.dir={run_dir}", *FAST,
                   "trainer.max_epochs=3")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from" in second.stdout + second.stderr
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["epoch"] == 2 and last["global_step"] == 3 * 9  # 3 epochs of ceil(268 / 32) batches
    with open(run_dir / "logs" / "metrics.csv") as f:
        epochs = {row["epoch"] for row in csv.DictReader(f) if row.get("val/loss")}
    assert epochs == {"0", "1", "2"}, "the resumed run's log continues the first run's"
    (run_dir / "metrics.json").unlink()
    again = sciml("+plugin=hep", f"data.path={data_file}", f"hydra.run.dir={run_dir}", *FAST,
                  "trainer.max_epochs=3")  # already complete: nothing to train, test and predict again
    assert again.returncode == 0, again.stderr[-3000:]
    assert "test/auc" in json.loads((run_dir / "metrics.json").read_text())
    # The same run directory with another network: refused by the resume policy in one line naming the key, and
    # with resume=force by the checkpoint check in one line naming the checkpoint; nothing overwritten.
    other = sciml("+plugin=hep", f"data.path={data_file}", f"hydra.run.dir={run_dir}", *FAST,
                  "trainer.max_epochs=3", "model.widths=[4,8]")
    _one_line_error(other, str(run_dir), "another config", "model.widths: [8, 8] -> [4, 8]")
    other = sciml("+plugin=hep", f"data.path={data_file}", f"hydra.run.dir={run_dir}", *FAST,
                  "trainer.max_epochs=3", "model.widths=[4,8]", "resume=force")
    _one_line_error(other, str(run_dir / "checkpoints" / "last.ckpt"), "different model",
                    "model.features.0.weight is (8, 3, 3, 3), expected (4, 3, 3, 3)")
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3 * 9


def _one_line_error(result, *fragments):
    assert result.returncode != 0
    text = result.stdout + result.stderr
    assert "Traceback" not in text, text[-2000:]
    error_lines = [line for line in text.splitlines() if "error" in line.lower()]
    assert error_lines, text[-2000:]
    assert any(all(f in line for f in fragments) for line in error_lines), error_lines


def test_unknown_plugin_lists_installed():
    result = sciml("+plugin=nosuch")
    _one_line_error(result, "unknown plugin 'nosuch'", "hep")


def test_bad_data_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.h5"
    _one_line_error(sciml("+plugin=hep", f"data.path={missing}", f"hydra.run.dir={tmp_path / 'a'}", *FAST),
                    str(missing))
    corrupt = tmp_path / "corrupt.h5"
    corrupt.write_bytes(b"not an hdf5 file at all")
    _one_line_error(sciml("+plugin=hep", f"data.path={corrupt}", f"hydra.run.dir={tmp_path / 'b'}", *FAST),
                    str(corrupt), "not a readable HDF5 file")
    wrong = write_h5(tmp_path / "two_channels.h5", n=16, channels=2)
    _one_line_error(sciml("+plugin=hep", f"data.path={wrong}", f"hydra.run.dir={tmp_path / 'c'}", *FAST,
                          "data.channels=3"),
                    str(wrong), "2 channels, expected 3")


def test_bad_override_is_named(tmp_path, data_file):
    result = sciml("+plugin=hep", f"data.path={data_file}", "optimizer.weight_decay=-1", f"hydra.run.dir={tmp_path}",
                   *FAST)
    _one_line_error(result, "optimizer", "weight_decay")
    result = sciml("+plugin=hep", "optimizer.no_such_key=1")
    assert result.returncode != 0 and "no_such_key" in result.stderr and "Traceback" not in result.stderr


def test_multirun_summary_reports_every_job(tmp_path, data_file):
    sweep = tmp_path / "sweep"
    result = sciml("-m", "+plugin=hep", f"data.path={data_file}", f"hydra.sweep.dir={sweep}", *FAST,
                   "trainer.max_epochs=1", "data.batch_size=32,0")
    assert result.returncode != 0, "a failed job makes the sweep exit non-zero"
    assert "Traceback" not in result.stderr
    assert (sweep / "0" / "metrics.json").is_file() and (sweep / "1").is_dir()
    with open(sweep / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["status"] for r in rows] == ["completed", "failed"]
    assert float(rows[0]["test/auc"]) > 0 and "data.batch_size=0" in rows[1]["error"]
    assert "| 1 | failed |" in (sweep / "summary.md").read_text()
