"""Re-train the best network of an architecture search and the default network with the same settings and seeds,
and compare them on the test split (AUC, parameters): the table of docs/sweeps.md.

    python -m sciml -m +plugin=hep +experiment=hep_arch_search            # the search (resumable)
    python benchmarks/arch_search.py multirun/hep_arch_search --epochs 10 --seeds 0 1

Both networks are trained by the same command (`hydra/launcher=local_parallel`, one job per seed) on the same
data split; only the model overrides of best.yaml (or of `--trial N` of pareto.csv) differ. Writes
`comparison-trialN.md` and `.json` into the sweep directory and prints the table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml


def train(name: str, model_overrides: list[str], out: Path, epochs: int, seeds: list[int], extra: list[str]) -> dict:
    sweep = out / name.replace(" ", "_")
    cmd = [sys.executable, "-m", "sciml", "-m", "+plugin=hep", "hydra/launcher=local_parallel",
           f"hydra.sweep.dir={sweep}", f"trainer.max_epochs={epochs}", "callbacks.progress_bar=null",
           "trainer.enable_model_summary=false", f"seed={','.join(map(str, seeds))}", *extra, *model_overrides]
    done = [sweep / str(i) / "metrics.json" for i in range(len(seeds))]
    if all(p.is_file() for p in done) and (sweep / "wall_s.txt").is_file():  # already trained: reuse
        wall = float((sweep / "wall_s.txt").read_text())
    else:
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        wall = time.perf_counter() - start
        (sweep / "wall_s.txt").write_text(f"{wall:.1f}\n")
    runs = [json.loads((sweep / str(i) / "metrics.json").read_text()) for i in range(len(seeds))]
    aucs = [r["test/auc"] for r in runs]
    return {"name": name, "overrides": model_overrides, "params": int(runs[0]["model/params"]),
            "test_auc": aucs, "test_auc_mean": statistics.fmean(aucs),
            "test_auc_std": statistics.stdev(aucs) if len(aucs) > 1 else 0.0,
            "bkg_rej_at_sig_eff_0.5": statistics.fmean(r["test/bkg_rej_at_sig_eff_0.5"] for r in runs),
            "wall_s": wall, "command": " ".join(cmd[1:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path, help="sweep directory of the search (with best.yaml)")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs of both networks")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--trial", type=int, default=None, help="a trial of pareto.csv instead of best.yaml's")
    parser.add_argument("--default-only", action="store_true", help="train the default network only (it does "
                        "not depend on the search, so it can run while the search does)")
    args, extra = parser.parse_known_args()

    out = args.sweep_dir / "comparison"
    if args.default_only:
        print(train("default", [], out, args.epochs, args.seeds, extra))
        return
    best = yaml.safe_load((args.sweep_dir / "best.yaml").read_text())
    overrides = best["overrides"]
    if args.trial is not None:
        import csv

        rows = {int(r["trial"]): r for r in csv.DictReader(open(args.sweep_dir / "pareto.csv"))}
        keys = [o.split("=", 1)[0] for o in overrides]
        overrides = [f"{k}={rows[args.trial][k]}" for k in keys]
    results = [train("default", [], out, args.epochs, args.seeds, extra),
               train(f"search trial {args.trial if args.trial is not None else best['trial']}", overrides, out,
                     args.epochs, args.seeds, extra)]
    lines = [f"| network | parameters | test AUC (seeds {', '.join(map(str, args.seeds))}) | mean ± std | "
             "bkg rejection at 50 % sig. eff. | wall time (s) |", "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['name']} `{' '.join(r['overrides']) or 'KurthCNN defaults'}` | {r['params']:,} | "
                     f"{', '.join(f'{a:.4f}' for a in r['test_auc'])} | {r['test_auc_mean']:.4f} ± "
                     f"{r['test_auc_std']:.4f} | {r['bkg_rej_at_sig_eff_0.5']:.1f} | {r['wall_s']:.0f} |")
    table = "\n".join(lines) + "\n"
    tag = f"trial{args.trial if args.trial is not None else best['trial']}"
    (args.sweep_dir / f"comparison-{tag}.md").write_text(table)
    (args.sweep_dir / f"comparison-{tag}.json").write_text(json.dumps(results, indent=2))
    print(table)


if __name__ == "__main__":
    main()
