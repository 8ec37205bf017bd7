"""`python -m sciml compare`: runs and a baseline on one ROC figure and in one table."""
from __future__ import annotations

import csv
import json

import h5py
import numpy as np
from conftest import sciml

from sciml.plots import save_roc


def fake_run(path, auc, seed):
    rng = np.random.default_rng(seed)
    (path / "plots").mkdir(parents=True)
    fpr = np.sort(np.r_[0, rng.uniform(size=50), 1])
    save_roc(fpr, np.clip(fpr ** (1 / auc - 1), 0, 1), path / "plots" / "roc.csv")
    metrics = {"test/auc": auc, "test/auc_ci_low": auc - 0.01, "test/auc_ci_high": auc + 0.01, "test/acc": 0.8,
               "val/loss": 0.3, "warning/test/sig_eff_at_bkg_eff_1e-3": "rests on 1.0 background events"}
    (path / "metrics.json").write_text(json.dumps(metrics))
    return path


def test_compare_runs_and_baseline(tmp_path):
    a, b = fake_run(tmp_path / "a", 0.9, 0), fake_run(tmp_path / "b", 0.8, 1)
    rng = np.random.default_rng(2)
    label = rng.integers(0, 2, 400)
    with h5py.File(tmp_path / "baseline.h5", "w") as h5:
        h5["score"] = np.clip(0.3 * label + rng.uniform(size=400) * 0.7, 0, 1)
        h5["label"] = label
    out = tmp_path / "cmp"
    result = sciml("compare", str(a), str(b), "--baseline", str(tmp_path / "baseline.h5"), "--out", str(out),
                   timeout=120)
    assert result.returncode == 0, result.stderr
    for name in ("roc.png", "metrics.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    rows = list(csv.DictReader((out / "comparison.csv").open()))
    assert [r["run"] for r in rows] == ["a", "b", "baseline (baseline.h5)"]
    assert float(rows[0]["test/auc"]) == 0.9 and float(rows[1]["test/auc_ci_low"]) == 0.79
    assert 0.5 < float(rows[2]["test/auc"]) <= 1
    table = (out / "comparison.md").read_text()
    assert "| a | 0.9 [0.89, 0.91]" in table and "rests on 1.0 background events" in table
    assert "val/loss" not in table


def test_compare_names_a_bad_run_directory(tmp_path):
    result = sciml("compare", str(tmp_path), timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip() == f"sciml compare: error: {tmp_path}: no metrics.json (not a finished sciml run " \
                                    "directory)"
