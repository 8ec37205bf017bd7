"""Physics comparison for the hep plugin: the networks sciml trains (the Kurth CNN on calorimeter images, ParticleNet
and a Particle Flow Network on the constituents) against classifiers on high-level jet features, on one sample.

1. Generate a labelled sample with the plugin's Pythia 8 + FastJet simulation (skipped if the file exists).
2. Train and test each network with sciml's CLI on it (a finished run in the run directory is reused). All runs
   split the file with the same seed, so they test the same rows.
3. Train gradient-boosted trees (and simpler baselines) on the jet mass and N-subjettiness ratios of the non-test
   rows and evaluate them on exactly the networks' test rows (read back from the runs' prediction files).
4. Write a Markdown table: AUC and background rejection at 30 % and 50 % signal efficiency, with 95 % bootstrap
   intervals over the test jets (the same resamples for every classifier, so differences are paired), parameters
   and training time.

    python benchmarks/hep_physics.py --data benchmarks/data/hep_top_qcd_large.h5 --n-jets 15000 --epochs 15 \
        --seeds 1 2 3 --out docs/hep-physics.md
    python benchmarks/hep_physics.py --data plugins/hep/data/hep_top_qcd_40x40.h5 --out docs/hep-physics-embedded.md

Runs go to `--run-dir` (default benchmarks/runs/hep_physics/<data file's stem>); finished ones are reused.
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

from sciml.metrics import weighted_roc

NETWORKS = {  # name: (description, sciml overrides)
    "cnn": ("CNN on 3-channel calorimeter images (Kurth et al. network)", []),
    "particlenet": ("ParticleNet-Lite on the 30 leading constituents", ["hep/input=particles"]),
    "pfn": ("Particle Flow Network on the 30 leading constituents", ["hep/input=particles", "hep/network=pfn"]),
}


def working_points(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> dict[str, float]:
    """AUC and background rejection (1 / background efficiency) at 30 % and 50 % signal efficiency (weighted)."""
    fpr, tpr = weighted_roc(torch.as_tensor(scores, dtype=torch.float64), torch.as_tensor(labels),
                            torch.as_tensor(weights, dtype=torch.float64))
    fpr, tpr = fpr.numpy(), tpr.numpy()
    bkg = weights[labels == 0]
    floor = bkg.min() / bkg.sum()  # no background left: the rejection is a lower bound
    out = {"auc": float(np.trapezoid(tpr, fpr))}
    for eff in (0.3, 0.5):
        out[f"r{int(eff * 100)}"] = 1.0 / max(float(np.interp(eff, tpr, fpr)), floor)
    return out


def bootstrap(scores: dict[str, np.ndarray], labels, weights, resamples: int, seed: int = 0):
    """Central values and 95 % intervals of each classifier's metrics, and of the AUC differences, over the same
    resamples of the test jets for every classifier."""
    rng = np.random.default_rng(seed)
    draws = [rng.integers(0, len(labels), len(labels)) for _ in range(resamples)]
    result = {}
    for name, s in scores.items():
        central = working_points(s, labels, weights)
        samples = {k: [] for k in central}
        for idx in draws:
            for k, v in working_points(s[idx], labels[idx], weights[idx]).items():
                samples[k].append(v)
        result[name] = {k: (central[k], *np.percentile(samples[k], [2.5, 97.5])) for k in central}
        result[name]["auc_samples"] = np.array(samples["auc"])
    return result


def train_network(name: str, run_dir: Path, seed: int | None, args) -> tuple[np.ndarray, np.ndarray, dict]:
    """Train and test one network with sciml's CLI (a finished run in `run_dir` is reused): its test rows, scores,
    parameters and wall time."""
    timing = run_dir / "wall_seconds.txt"
    if (run_dir / "metrics.json").exists() and timing.exists():  # reuse a finished run (minutes of CPU)
        print(f"reusing the {name} run in {run_dir}")
    else:
        command = [sys.executable, "-m", "sciml", "+plugin=hep", *NETWORKS[name][1], f"data.path={args.data}",
                   f"hydra.run.dir={run_dir}", "callbacks.progress_bar=null", *args.overrides]
        if args.epochs:
            command.append(f"trainer.max_epochs={args.epochs}")
        if seed is not None:
            command.append(f"seed={seed}")
        start = time.time()
        subprocess.run(command, check=True)
        timing.write_text(f"{time.time() - start:.0f}\n")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    with h5py.File(run_dir / "predictions" / f"{args.data.stem}_scores.h5") as h5:
        rows, scores = h5["row"][...], h5["score"][...]
    return rows, scores, {"params": int(metrics.get("model/params", 0)), "seconds": float(timing.read_text())}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("benchmarks/data/hep_top_qcd_large.h5"))
    parser.add_argument("--n-jets", type=int, default=15000, help="jets per class, when the file is generated")
    parser.add_argument("--seed", type=int, default=7, help="generation seed")
    parser.add_argument("--run-dir", type=Path, default=None, help="default: benchmarks/runs/hep_physics/<stem>")
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: the plugin's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="training seeds of the networks (default: the config's); the table's intervals are "
                             "the first seed's, a second table gives the spread over seeds")
    parser.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples of the test jets")
    parser.add_argument("--out", type=Path, default=Path("docs/hep-physics.md"))
    parser.add_argument("overrides", nargs="*", help="extra sciml overrides for every network run")
    args = parser.parse_args(argv)
    args.run_dir = args.run_dir or Path("benchmarks/runs/hep_physics") / args.data.stem

    if not args.data.exists():
        from sciml_plugins.hep.simulate import simulate

        args.data.parent.mkdir(parents=True, exist_ok=True)
        start = time.time()
        simulate(args.n_jets, args.data, seed=args.seed, n_constituents=30)
        print(f"generated {2 * args.n_jets} jets in {time.time() - start:.0f} s")

    scores, rows, info, by_seed = {}, None, {}, {}
    seeds = args.seeds or [None]
    for name in args.networks:
        for seed in seeds:
            run_dir = args.run_dir / (name if seed is None else f"{name}_seed{seed}")
            run_rows, run_scores, run_info = train_network(name, run_dir, seed, args)
            if rows is not None and not np.array_equal(rows, run_rows):
                raise SystemExit(f"{run_dir}: tested other rows than the first run (data.split_seed must agree)")
            rows = run_rows
            by_seed.setdefault(name, []).append({"seed": seed, "scores": run_scores, **run_info})
        scores[name], info[name] = by_seed[name][0]["scores"], by_seed[name][0]

    with h5py.File(args.data) as h5:
        labels, weights = h5["label"][...], h5["normweight"][...]
        features = {k: h5["features"][k][...] for k in ("mass", "tau21", "tau32")}
    is_test = np.zeros(len(labels), bool)
    is_test[rows] = True
    y_test, w_test = labels[rows], weights[rows]
    described = {name: NETWORKS[name][0] for name in args.networks}
    for name, columns, model in [
        ("mass", ["mass"], None),
        ("tau32", ["tau32"], None),
        ("logistic regression on mass, tau32", ["mass", "tau32"],
         make_pipeline(StandardScaler(), LogisticRegression())),
        ("BDT on mass, tau21, tau32", ["mass", "tau21", "tau32"], HistGradientBoostingClassifier(random_state=0)),
    ]:
        x = np.stack([features[c] for c in columns], axis=1)
        start = time.time()
        if model is None:  # a one-sided cut: the better direction on the training rows
            train = working_points(x[~is_test, 0], labels[~is_test], weights[~is_test])["auc"]
            s = x[is_test, 0] * (1 if train >= 0.5 else -1)
            params = 1
        else:
            step = model.steps[-1][0] if hasattr(model, "steps") else None  # pipelines route weights by step name
            model.fit(x[~is_test], labels[~is_test],
                      **{f"{step}__sample_weight" if step else "sample_weight": weights[~is_test]})
            s = model.predict_proba(x[is_test])[:, 1]
            params = sum(int(p.get_n_leaf_nodes()) * 2 - 1 for trees in getattr(model, "_predictors", [])
                         for p in trees) or 3 * len(columns)
        key = f"cut on {name} alone" if model is None else name
        scores[key], described[key] = s, key
        info[key] = {"params": params, "seconds": time.time() - start}

    stats = bootstrap(scores, y_test, w_test, args.bootstrap)
    ranked = sorted(stats, key=lambda k: -stats[k]["auc"][0])
    fmt = lambda v, digits: f"{v[0]:.{digits}f} [{v[1]:.{digits}f}, {v[2]:.{digits}f}]"  # noqa: E731
    lines = ["| classifier | test AUC [95 % CI] | background rejection at 30 % signal eff. | at 50 % signal eff. "
             "| parameters (trees: nodes) | training time (2 cores, wall) |", "|---|---|---|---|---|---|"]
    for name in ranked:
        seconds = info[name]["seconds"]
        took = f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"
        lines.append(f"| {described[name]} | {fmt(stats[name]['auc'], 4)} | {fmt(stats[name]['r30'], 0)} | "
                     f"{fmt(stats[name]['r50'], 1)} | {info[name]['params']:,} | {took} |")

    def versus(a: str, b: str) -> str:
        diff = stats[a]["auc_samples"] - stats[b]["auc_samples"]
        return (f"ahead of {described[b]} by {stats[a]['auc'][0] - stats[b]['auc'][0]:.4f} (95 % paired bootstrap "
                f"interval [{np.percentile(diff, 2.5):.4f}, {np.percentile(diff, 97.5):.4f}])")

    # the best against the runner-up, and against the physicist's baseline (the BDT) when that is not the runner-up
    others = list(dict.fromkeys([ranked[1], *(k for k in ranked if k.startswith("BDT"))]))
    verdict = f"Best AUC: {described[ranked[0]]}, " + "; ".join(versus(ranked[0], b) for b in others
                                                                 if b != ranked[0]) + "."
    spread = ""
    if len(seeds) > 1:  # training-seed spread of the networks, on the same test rows
        rows_md = ["| network | test AUC per seed | mean ± s.d. | rejection at 50 % signal eff., mean ± s.d. "
                   "| training time, mean |", "|---|---|---|---|---|"]
        for name in sorted(by_seed, key=lambda n: -np.mean([working_points(r["scores"], y_test, w_test)["auc"]
                                                            for r in by_seed[n]])):
            points = [working_points(r["scores"], y_test, w_test) for r in by_seed[name]]
            auc, r50 = np.array([p["auc"] for p in points]), np.array([p["r50"] for p in points])
            minutes = np.mean([r["seconds"] for r in by_seed[name]]) / 60
            rows_md.append(f"| {described[name]} | {', '.join(f'{a:.4f}' for a in auc)} | {auc.mean():.4f} ± "
                           f"{auc.std(ddof=1):.4f} | {r50.mean():.1f} ± {r50.std(ddof=1):.1f} | {minutes:.1f} min |")
        spread = (f"\nOver training seeds {', '.join(map(str, seeds))} (initial weights and batch order; the same "
                  "split):\n\n" + "\n".join(rows_md) + "\n")
    with h5py.File(args.data) as h5:
        n_total = len(h5["label"])
    report = (f"Sample: {n_total} jets ({args.data.name}); test split {len(rows)} jets, the same rows for every "
              f"classifier; networks trained with sciml's defaults{f' for {args.epochs} epochs' if args.epochs else ''}"
              f"{f', seed {seeds[0]} in this table' if seeds[0] is not None else ''}"
              f" (training time: the whole CLI run, testing included), feature classifiers on the non-test rows; "
              f"intervals from {args.bootstrap} bootstrap resamples of the test jets.\n\n"
              + "\n".join(lines) + f"\n\n{verdict}\n" + spread)
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("<!-- written by benchmarks/hep_physics.py -->\n" + report)


if __name__ == "__main__":
    main()
