"""Physics check for the hep plugin: the Kurth CNN on calorimeter images against a high-level-feature baseline.

1. Generate a large labelled sample with the plugin's Pythia 8 + FastJet simulation (skipped if the file exists).
2. Train and test the CNN with sciml's CLI on it.
3. Train gradient-boosted trees on the jet mass and N-subjettiness ratios of the same training rows and evaluate
   them on exactly the CNN's test rows (read back from the run's predictions file).
4. Write a Markdown table: AUC and background rejection at 50 % signal efficiency (weighted, same metric code).

    python benchmarks/hep_physics.py --n-jets 15000 --out docs/hep-physics.md
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from sciml.metrics import WeightedBinaryClassification


def metrics(scores, labels, weights):
    m = WeightedBinaryClassification()
    m.update(torch.as_tensor(scores), torch.as_tensor(labels), torch.as_tensor(weights))
    return {k: float(v) for k, v in m.compute().items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-jets", type=int, default=15000, help="jets per class")
    parser.add_argument("--data", type=Path, default=Path("benchmarks/data/hep_top_qcd_large.h5"))
    parser.add_argument("--run-dir", type=Path, default=Path("benchmarks/runs/hep_physics"))
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path("docs/hep-physics.md"))
    parser.add_argument("overrides", nargs="*", help="extra sciml overrides for the CNN run")
    args = parser.parse_args(argv)

    if not args.data.exists():
        from sciml_plugins.hep.simulate import simulate

        args.data.parent.mkdir(parents=True, exist_ok=True)
        start = time.time()
        simulate(args.n_jets, args.data, seed=args.seed)
        print(f"generated {2 * args.n_jets} jets in {time.time() - start:.0f} s")

    cnn_cmd = [sys.executable, "-m", "sciml", "+plugin=hep", f"data.path={args.data}",
               f"trainer.max_epochs={args.epochs}", f"hydra.run.dir={args.run_dir}", "callbacks.progress_bar=null",
               *args.overrides]
    timing = args.run_dir / "wall_seconds.txt"
    if (args.run_dir / "metrics.json").exists() and timing.exists():  # reuse a finished CNN run (minutes of CPU)
        print(f"reusing the CNN run in {args.run_dir}")
    else:
        start = time.time()
        subprocess.run(cnn_cmd, check=True)
        timing.write_text(f"{time.time() - start:.0f}\n")
    cnn_seconds = float(timing.read_text())
    cnn_metrics = json.loads((args.run_dir / "metrics.json").read_text())

    with h5py.File(args.run_dir / "predictions" / f"{args.data.stem}_scores.h5") as h5:
        test_rows, cnn_scores = h5["row"][...], h5["score"][...]
    with h5py.File(args.data) as h5:
        labels, weights = h5["label"][...], h5["normweight"][...]
        features = {k: h5["features"][k][...] for k in ("mass", "tau21", "tau32")}
    is_test = np.zeros(len(labels), bool)
    is_test[test_rows] = True
    y_test, w_test = labels[test_rows], weights[test_rows]

    rows = [("CNN on 3-channel images (sciml, Kurth et al. network)", metrics(cnn_scores, y_test, w_test))]
    for name, columns, model in [
        ("jet mass alone (cut)", ["mass"], None),
        ("tau32 alone (cut)", ["tau32"], None),
        ("logistic regression on mass, tau32", ["mass", "tau32"],
         make_pipeline(StandardScaler(), LogisticRegression())),
        ("gradient-boosted trees on mass, tau32", ["mass", "tau32"], HistGradientBoostingClassifier(random_state=0)),
        ("gradient-boosted trees on mass, tau21, tau32", ["mass", "tau21", "tau32"],
         HistGradientBoostingClassifier(random_state=0)),
    ]:
        x = np.stack([features[c] for c in columns], axis=1)
        if model is None:  # a one-sided cut: the better of the two directions on the training rows
            train_auc = metrics(x[~is_test, 0], labels[~is_test], weights[~is_test])["auc"]
            scores = x[is_test, 0] * (1 if train_auc >= 0.5 else -1)
            scores = (scores - scores.min()) / (np.ptp(scores) or 1.0)  # a monotone map to [0, 1]
        else:
            step = model.steps[-1][0] if hasattr(model, "steps") else None  # pipelines route weights by step name
            fit_weights = {f"{step}__sample_weight" if step else "sample_weight": weights[~is_test]}
            model.fit(x[~is_test], labels[~is_test], **fit_weights)
            scores = model.predict_proba(x[is_test])[:, 1]
        rows.append((name, metrics(scores, y_test, w_test)))

    lines = [
        "| classifier | test AUC | background rejection at 50 % signal efficiency | signal efficiency at 1 % background |",
        "|---|---|---|---|",
    ]
    for name, m in rows:
        lines.append(f"| {name} | {m['auc']:.4f} | {m['bkg_rej_at_sig_eff_0.5']:.1f} | "
                     f"{m['sig_eff_at_bkg_eff_1e-2']:.3f} |")
    with h5py.File(args.data) as h5:
        n_total = len(h5["label"])
    table = "\n".join(lines)
    report = (f"Sample: {n_total} jets ({args.data.name}, seed {args.seed}); CNN test split {len(test_rows)} jets, "
              f"same rows for every classifier; baselines trained on the CNN's training + validation rows.\n"
              f"CNN run: {args.epochs} epochs, {cnn_seconds:.0f} s wall time on this machine, "
              f"train/samples_per_s = {cnn_metrics.get('train/samples_per_s', float('nan')):.0f}.\n\n{table}\n")
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("<!-- written by benchmarks/hep_physics.py -->\n" + report)


if __name__ == "__main__":
    main()
