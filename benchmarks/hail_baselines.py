"""Hail baselines (scikit-learn), on the same splits as the plugin's runs:

1. patches: logistic regression on storm-mean predictors (the patch mean of every input field the CNN gets, the
   fields of the plugin's `hail/data=patches` config or of `--cnn-run`), the baseline the CNN of Gagne et al. (2019)
   beat; and the same with the patch maximum and minimum of every field added. Trained on the training +
   validation days, tested on the test days.
2. storm table: a random forest (Gagne et al. 2017) on the same per-storm features the MLP gets (preprocessed by
   the same data module), trained on all days but the test day; scored on the latest day, or on `--unseen`.

Scores: AUC, Brier score, Brier skill score against the training days' climatology. With `--cnn-run DIR` and
`--mlp-run DIR` (run directories of `python -m sciml +plugin=hail` and `... hail/data=storms`) their metrics.json
join the table. The table is printed and, with `--write-docs`, replaces the block between the markers in
docs/hail.md.

    python benchmarks/hail_baselines.py [--cnn-run DIR] [--mlp-run DIR] [--unseen CSV] [--write-docs]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import brier_score_loss, roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


from sciml_plugins.hail.data import data_module

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hail_lodo import features, storm_module, targets, write_block  # noqa: E402  the MLP's preprocessed inputs

DOC = Path(__file__).resolve().parents[1] / "docs" / "hail.md"
BEGIN, END = "<!-- hail_baselines:begin -->", "<!-- hail_baselines:end -->"


def scores(y: np.ndarray, p: np.ndarray, climatology: float) -> dict[str, float]:
    brier = brier_score_loss(y, p)
    return {"auc": roc_auc_score(y, p), "brier": brier, "bss": 1 - brier / np.mean((climatology - y) ** 2)}


def patch_baselines(cnn_run: str | None) -> tuple[dict, dict, int, int]:
    """Logistic regression on patch means, and on patch means, maxima and minima, of the CNN's input fields."""
    overrides = []
    if cnn_run:  # the run's own data keys (fields, split, threshold)
        data = OmegaConf.to_container(OmegaConf.load(Path(cnn_run) / "config.yaml").data)
        overrides = [f"data.{k}={json.dumps(data[k])}" for k in ("path", "variables", "group_by", "split_order",
                                                                 "val_size", "test_size", "test_groups",
                                                                 "threshold_mm", "max_size_mm") if k in data]
    dm = data_module(*overrides)
    dm.setup("fit")
    rows = {k: dm.store.read(dm.rows[k]) for k in ("train", "val", "test")}  # raw fields, not standardised
    x = {k: v["x"] for k, v in rows.items()}
    y = {k: v["y"] for k, v in rows.items()}
    fit_y = np.concatenate([y["train"], y["val"]])
    result = []
    for stats in (lambda a: a.mean(axis=(2, 3)),
                  lambda a: np.concatenate([a.mean(axis=(2, 3)), a.max(axis=(2, 3)), a.min(axis=(2, 3))], axis=1)):
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
        model.fit(np.concatenate([stats(x["train"]), stats(x["val"])]), fit_y)
        result.append(scores(y["test"], model.predict_proba(stats(x["test"]))[:, 1], dm.climatology))
    return result[0], result[1], len(fit_y), len(y["test"])


def table_baseline(unseen: str | None, seed: int) -> tuple[dict, int, int]:
    dm = storm_module(*([f"data.test_path={unseen}"] if unseen else []))
    fit_x = np.concatenate([features(dm, "train"), features(dm, "val")])
    fit_y = np.concatenate([targets(dm, "train"), targets(dm, "val")])
    forest = RandomForestClassifier(n_estimators=500, min_samples_leaf=5, random_state=seed, n_jobs=2)
    forest.fit(fit_x, fit_y)
    test_y = targets(dm, "test")
    return (scores(test_y, forest.predict_proba(features(dm, "test"))[:, 1], dm.climatology),
            len(fit_y), len(test_y))


def run_scores(run_dir: str | None) -> dict | None:
    if not run_dir:
        return None
    metrics = json.loads((Path(run_dir) / "metrics.json").read_text())
    return {k: metrics[f"test/{k}"] for k in ("auc", "brier", "bss")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cnn-run", help="run directory of `python -m sciml +plugin=hail`")
    parser.add_argument("--mlp-run", help="run directory of `python -m sciml +plugin=hail hail/data=storms`")
    parser.add_argument("--unseen", help="storm-table CSV of an unseen day (default: the latest embedded day)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()

    rows = []
    lr, lr_extremes, n_fit, n_test = patch_baselines(args.cnn_run)
    test_days = "the unseen day" if args.unseen else "2015-06-03"
    if (cnn := run_scores(args.cnn_run)) is not None:
        rows.append(("patches (simulated)", "Gagne CNN", cnn, n_fit, n_test))
    rows.append(("patches (simulated)", "logistic regression on storm means", lr, n_fit, n_test))
    rows.append(("patches (simulated)", "logistic regression on storm mean, max, min", lr_extremes, n_fit, n_test))
    rf, n_fit, n_test = table_baseline(args.unseen, args.seed)
    if (mlp := run_scores(args.mlp_run)) is not None:
        rows.append((f"storm table (real), test {test_days}", "MLP", mlp, n_fit, n_test))
    rows.append((f"storm table (real), test {test_days}", "random forest", rf, n_fit, n_test))

    lines = ["| data | model | AUC | Brier | BSS | train+val rows | test rows |", "|---|---|---|---|---|---|---|"]
    for data, model, s, nf, nt in rows:
        lines.append(f"| {data} | {model} | {s['auc']:.3f} | {s['brier']:.3f} | {s['bss']:.3f} | {nf} | {nt} |")
    table = "\n".join(lines)
    print(table)
    if args.write_docs:
        write_block(DOC, BEGIN, END, table)


if __name__ == "__main__":
    main()
