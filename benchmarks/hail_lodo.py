"""Leave-one-day-out validation of the tabular mode on the real storm table (11 run days, 2015-05-20 .. 06-03).

Each day in turn is the test day (`data.test_groups=[DAY]`); of the other ten, the latest two validate (the MLP's
checkpoint of the best validation loss is tested) and eight train. Compared on exactly the same rows and the same
preprocessed features (missing codes filled, skewed variables logged, clipped, standardised with the training days'
statistics): the plugin's MLP (`python -m sciml +plugin=hail hail/data=storms`, run as one Hydra multirun), and
scikit-learn's logistic regression (C=0.05) and random forest (500 trees, 5 storms per leaf), both fitted on the
training + validation days. Scores: AUC and the Brier skill score against the training days' climatology (the
reference the plugin uses, known at forecast time).

    python benchmarks/hail_lodo.py [--sweep-dir runs/hail_lodo] [--write-docs]

An existing sweep directory with all eleven metrics.json is reused (delete it to retrain the MLP).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import brier_score_loss, roc_auc_score

from sciml_plugins.hail.data import HailDataModule, data_module

DOC = Path(__file__).resolve().parents[1] / "docs" / "hail.md"
BEGIN, END = "<!-- hail_lodo:begin -->", "<!-- hail_lodo:end -->"


def write_block(doc: Path, begin: str, end: str, table: str) -> None:
    """Rewrite only the part of `doc` between the markers: the hand-written text around it stays."""
    text = doc.read_text()
    start, stop = text.index(begin) + len(begin), text.index(end)
    doc.write_text(text[:start] + "\n" + table + "\n" + text[stop:])
    print(f"written to {doc}")
MODELS = ("MLP", "logistic regression", "random forest")


def scores(y: np.ndarray, p: np.ndarray, climatology: float) -> tuple[float, float]:
    return roc_auc_score(y, p), 1 - brier_score_loss(y, p) / np.mean((climatology - y) ** 2)


def features(dm: HailDataModule, split: str) -> np.ndarray:
    """The inputs exactly as the MLP sees them (the data module's on-device preprocessing)."""
    batch = {"x": torch.as_tensor(dm.store.read(dm.rows[split])["x"])}
    return dm.on_after_batch_transfer(batch, 0)["x"].numpy()


def targets(dm: HailDataModule, split: str) -> np.ndarray:
    return dm.store.read(dm.rows[split])["y"]


def storm_module(*overrides: str) -> HailDataModule:
    """The MLP's datamodule (`hail/data=storms` and `overrides`), split and fitted."""
    dm = data_module("hail/data=storms", *overrides)
    dm.setup("fit")
    return dm


def mlp_runs(days: list[str], sweep: Path) -> dict[str, dict]:
    """metrics.json of each day's MLP run, training them (one multirun) unless all are there."""
    def collect():
        found = {}
        for config in sweep.glob("*/config.yaml"):
            day = str(OmegaConf.load(config).data.test_groups[0])
            if (config.parent / "metrics.json").is_file():
                found[day] = json.loads((config.parent / "metrics.json").read_text())
        return found

    found = collect() if sweep.is_dir() else {}
    if set(days) - set(found):
        cmd = [sys.executable, "-m", "sciml", "-m", "+plugin=hail", "hail/data=storms",
               f"data.test_groups={','.join(f'[{d}]' for d in days)}", f"hydra.sweep.dir={sweep}", "callbacks.progress_bar=null",
               "trainer.enable_model_summary=false"]
        print(" ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        found = collect()
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sweep-dir", default="runs/hail_lodo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()

    days = sorted(set(storm_module().store.groups("day")))
    mlp = mlp_runs(days, Path(args.sweep_dir).resolve())

    rows = []
    for day in days:
        dm = storm_module(f"data.test_groups=[{day}]")
        fit_x = np.concatenate([features(dm, "train"), features(dm, "val")])
        fit_y = np.concatenate([targets(dm, "train"), targets(dm, "val")])
        test_x, test_y = features(dm, "test"), targets(dm, "test")
        lr = LogisticRegression(C=0.05, max_iter=5000).fit(fit_x, fit_y)
        rf = RandomForestClassifier(n_estimators=500, min_samples_leaf=5, random_state=args.seed, n_jobs=2)
        rf.fit(fit_x, fit_y)
        m = mlp[day]
        assert abs(m["test/base_rate"] - test_y.mean()) < 1e-4, f"{day}: MLP run tested other rows"
        rows.append((day, len(test_y), test_y.mean(), dm.climatology,
                     (m["test/auc"], m["test/bss"]),
                     scores(test_y, lr.predict_proba(test_x)[:, 1], dm.climatology),
                     scores(test_y, rf.predict_proba(test_x)[:, 1], dm.climatology)))

    head = " | ".join(f"{m} AUC | {m} BSS" for m in MODELS)
    lines = [f"| test day | storms | severe | training clim. | {head} |", "|---" * 10 + "|"]
    for day, n, rate, clim, *s in rows:
        lines.append(f"| {day} | {n} | {rate:.2f} | {clim:.2f} | "
                     + " | ".join(f"{a:.3f} | {b:+.3f}" for a, b in s) + " |")
    means = np.array([[v for pair in r[4:] for v in pair] for r in rows]).mean(axis=0)
    lines.append("| **mean of 11 days** | | | | " + " | ".join(
        f"**{means[i]:.3f}** | **{means[i + 1]:+.3f}**" for i in range(0, 6, 2)) + " |")
    table = "\n".join(lines)
    print(table)
    if args.write_docs:
        write_block(DOC, BEGIN, END, table)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
