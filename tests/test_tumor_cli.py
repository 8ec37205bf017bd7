"""`python -m sciml +plugin=tumor` as a user runs it, on small synthetic case folders: the run directory, NIfTI
predictions that are what was scored, overlays, `python -m sciml predict` on unseen cases in another label
convention (scored) and on an unlabelled copy of an embedded case (predicted only), the same test metrics and
predictions from 2 DDP ranks as from one process, and errors in data named in one line."""
from __future__ import annotations

import csv
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from conftest import sciml
from test_tumor_reader import write_case, write_cases

from sciml_plugins.tumor.reader import DEFAULT_PATH

# Seconds, not minutes: tiny volumes, a tiny network, few steps.
FAST = ["data.patch_size=32", "data.batch_size=8", "data.samples_per_epoch=64", "model.channels=[8,16,32]",
        "model.strides=[2,2]", "model.downsample=1", "trainer.max_epochs=3", "trainer.check_val_every_n_epoch=1",
        "optimizer.lr=0.01", "callbacks.progress_bar=null", "trainer.enable_model_summary=false"]


def dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cases = write_cases(tmp_path_factory.mktemp("cases"), 4, shape=(36, 40, 12))
    run_dir = tmp_path_factory.mktemp("runs") / "tumor"
    result = sciml("+plugin=tumor", f"data.path={cases}", "data.train_split=rest", "data.test_size=2",
                   f"hydra.run.dir={run_dir}", *FAST)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return cases, run_dir


def test_run_directory_contract(trained):
    cases, run_dir = trained
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("test/dice_wt", "test/dice_tc", "test/dice_et", "test/hd95_wt", "test/hd95_tc", "test/hd95_et",
                "test/iou_edema", "val/dice_wt", "val/dice_wt_best", "train/loss"):
        assert isinstance(metrics[key], float), key
    assert metrics["test/dice_wt"] > 0.5, "the synthetic tumours are bright in FLAIR: easy to find"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    with open(run_dir / "test_per_case.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    # the NIfTI predictions are in the input grid, and they are exactly what was scored
    for row, name in zip(rows, ["case02", "case03"]):
        prediction = nib.load(run_dir / "predictions" / f"{name}_seg.nii.gz")
        truth = nib.load(cases / name / "OTMultiClass.nii.gz")
        assert prediction.shape == truth.shape
        np.testing.assert_allclose(prediction.affine, truth.affine)
        p, t = np.asarray(prediction.dataobj), np.asarray(truth.dataobj)
        assert set(np.unique(p).tolist()) <= {0, 1, 2, 3, 4}
        for region, classes in {"wt": [1, 2, 3, 4], "tc": [1, 3, 4]}.items():
            assert dice(np.isin(p, classes), np.isin(t, classes)) == pytest.approx(float(row[f"dice_{region}"]),
                                                                                   abs=1e-4)
        assert (run_dir / "plots" / f"overlay_{name}.png").read_bytes()[:4] == b"\x89PNG"


def test_predict_scores_unseen_labelled_cases_in_another_convention(trained, tmp_path):
    _, run_dir = trained
    unseen = tmp_path / "unseen"
    truth = write_case(unseen / "new_case", shape=(44, 40, 14), seed=17, convention="brats2023")
    out = tmp_path / "eval"
    [best] = (run_dir / "checkpoints").glob("best-*.ckpt")
    result = sciml("predict", str(best), str(unseen), "-o", str(out), "data.label_convention=brats2023",
                   "callbacks.progress_bar=null")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test/dice_wt"] > 0.5 and not any(k.startswith(("train/", "val/")) for k in metrics)
    written = np.asarray(nib.load(out / "predictions" / "new_case_seg.nii.gz").dataobj)
    assert written.shape == (44, 40, 14) and set(np.unique(written).tolist()) <= {0, 1, 2, 3}  # BraTS 2023 values
    assert dice(written > 0, truth["labels"] > 0) == pytest.approx(metrics["test/dice_wt"], abs=1e-4)


def test_predict_an_unlabelled_case_from_another_directory(trained, tmp_path):
    """A copy of an embedded BRATS case without its label file, predicted with the checkpoint alone from another
    working directory into a fresh one: a NIfTI label volume on the input's grid, nothing scored."""
    _, run_dir = trained
    case = sorted(p for p in DEFAULT_PATH.iterdir() if p.is_dir())[0]
    folder = tmp_path / "new" / case.name
    shutil.copytree(case, folder, ignore=shutil.ignore_patterns("OTMultiClass*"))
    elsewhere, out = tmp_path / "elsewhere", tmp_path / "fresh" / "predicted"
    elsewhere.mkdir()
    [best] = (run_dir / "checkpoints").glob("best-*.ckpt")
    result = sciml("predict", str(best), str(folder), "-o", str(out), "callbacks.progress_bar=null", cwd=elsewhere)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert not any(elsewhere.iterdir()), "nothing may be written outside the run directory"
    flair = nib.load(folder / "Flair_subtrMeanDivStd.nii.gz")
    prediction = nib.load(out / "predictions" / f"{case.name}_seg.nii.gz")
    assert prediction.shape == flair.shape and prediction.get_data_dtype() == np.uint8
    np.testing.assert_allclose(prediction.affine, flair.affine)
    assert set(np.unique(np.asarray(prediction.dataobj)).tolist()) <= {0, 1, 2, 3, 4}
    assert (out / "plots" / f"overlay_{case.name}.png").is_file()
    assert not any(k.startswith("test/") for k in json.loads((out / "metrics.json").read_text()))


def test_two_ddp_ranks_score_and_predict_like_one_process(trained, tmp_path):
    """Three unseen cases on 2 CPU ranks (2 + 1 cases): the test metrics of one process, every case predicted
    once, each rank holding only its own cases."""
    _, run_dir = trained
    unseen = write_cases(tmp_path / "unseen", 3, shape=(36, 40, 12), first_seed=30)
    [best] = (run_dir / "checkpoints").glob("best-*.ckpt")
    metrics = {}
    for name, extra in (("one", []), ("ddp", ["strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu"])):
        out = tmp_path / name
        result = sciml("+plugin=tumor", "train=false", f"ckpt_path={best}", f"data.test_path={unseen}",
                       f"hydra.run.dir={out}", "callbacks.progress_bar=null", *extra)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        metrics[name] = json.loads((out / "metrics.json").read_text())
        assert sorted(p.name for p in (out / "predictions").iterdir()) == [f"case0{i}_seg.nii.gz" for i in range(3)]
    assert "data (rank 1 of 2): test 1" in (tmp_path / "ddp" / "tumor_rank1.log").read_text()
    tests = {k: v for k, v in metrics["one"].items() if k.startswith("test/")}
    assert tests and tests == pytest.approx({k: metrics["ddp"][k] for k in tests}, rel=1e-5, abs=1e-6)
    for i in range(3):
        one, ddp = (np.asarray(nib.load(tmp_path / n / "predictions" / f"case0{i}_seg.nii.gz").dataobj)
                    for n in ("one", "ddp"))
        np.testing.assert_array_equal(one, ddp)


def test_bad_case_folder_is_one_line(tmp_path):
    write_case(tmp_path / "cases" / "c0", skip=("t1c",))
    result = sciml("+plugin=tumor", f"data.path={tmp_path / 'cases'}", f"hydra.run.dir={tmp_path / 'run'}", *FAST)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "case c0: no NIfTI file matching 'T1c*'" in output and "Traceback" not in output
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.slow
def test_default_run_on_the_embedded_cases(tmp_path):
    """`python -m sciml +plugin=tumor` as shipped: trains on two embedded BRATS cases, validates on a third and tests
    the fourth (both held out), and writes the BraTS metrics, the test case's NIfTI in the input grid and its overlay
    (minutes on 2 cores)."""
    run_dir = tmp_path / "run"
    result = sciml("+plugin=tumor", f"hydra.run.dir={run_dir}", "callbacks.progress_bar=null", timeout=3600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for key in ("test/dice_wt", "test/dice_tc", "test/dice_et", "test/hd95_wt", "val/dice_wt_best"):
        assert isinstance(metrics[key], float), key
    assert metrics["test/dice_wt"] > 0.7 and metrics["test/hd95_wt"] < 25 and metrics["val/dice_wt_best"] > 0.5
    case = sorted(p for p in DEFAULT_PATH.iterdir() if p.is_dir())[-1]  # the last case by name is the test case
    assert [p.name for p in (run_dir / "predictions").iterdir()] == [f"{case.name}_seg.nii.gz"]
    prediction = nib.load(run_dir / "predictions" / f"{case.name}_seg.nii.gz")
    flair = nib.load(case / "Flair_subtrMeanDivStd.nii.gz")
    assert prediction.shape == flair.shape
    np.testing.assert_allclose(prediction.affine, flair.affine)
    assert (run_dir / "plots" / f"overlay_{case.name}.png").is_file()
