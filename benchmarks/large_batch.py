"""The large-batch study (issue: "LARS keeps accuracy at a 16-32x larger batch, where SGD degrades").

Runs two Hydra multiruns on a HEP sample — (a) momentum SGD + linear LR scaling + warm-up, (b) LARS + warm-up +
polynomial decay — over the same batch sizes, epochs and seeds, then writes the table and a plot.

    python benchmarks/large_batch.py --data benchmarks/data/hep_top_qcd_large.h5 --out docs/large-batch.md

The exact sciml commands are printed and written into the report.
"""
from __future__ import annotations

import argparse
import csv
import shlex
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

BEGIN, END = "<!-- large_batch:begin -->", "<!-- large_batch:end -->"
RECIPES = {
    "SGD + linear scaling + warm-up": [
        "optimizer=sgd", "optimizer.lr={sgd_lr}", "optimizer.momentum=0.9", "optimizer.weight_decay=0.0005",
        "optimizer.base_batch_size={base}", "optimizer.lr_scaling=linear", "optimizer.exclude_from_decay=true",
        "scheduler=warmup_poly", "scheduler.warmup_epochs={warmup}", "scheduler.power=2",
    ],
    "LARS + warm-up + poly decay": [
        "optimizer=lars", "optimizer.lr={lars_lr}", "optimizer.base_batch_size={base}",
        "optimizer.lr_scaling=linear", "scheduler=warmup_poly", "scheduler.warmup_epochs={warmup}",
        "scheduler.power=2",
    ],
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("benchmarks/data/hep_top_qcd_large.h5"))
    parser.add_argument("--batch-sizes", default="128,512,2048,4096")
    parser.add_argument("--seeds", default="1")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--base", type=int, default=128, help="batch size at which the base LRs are given")
    parser.add_argument("--sgd-lr", type=float, default=0.05)
    parser.add_argument("--lars-lr", type=float, default=0.5)
    parser.add_argument("--model", default="model.widths=[16,32,32] model.hidden=32",
                        help="model overrides (a smaller net than the default keeps the study affordable on CPU)")
    parser.add_argument("--sweep-dir", type=Path, default=Path("benchmarks/runs/large_batch"))
    parser.add_argument("--out", type=Path, default=Path("docs/large-batch.md"))
    parser.add_argument("--report-only", action="store_true", help="rebuild the report from existing sweeps")
    args = parser.parse_args(argv)

    commands = {}
    for i, (name, recipe) in enumerate(RECIPES.items()):
        overrides = [o.format(sgd_lr=args.sgd_lr, lars_lr=args.lars_lr, base=args.base, warmup=args.warmup)
                     for o in recipe]
        command = [sys.executable, "-m", "sciml", "-m", "+plugin=hep", f"data.path={args.data}",
                   f"trainer.max_epochs={args.epochs}", *shlex.split(args.model), *overrides,
                   f"data.batch_size={args.batch_sizes}", f"seed={args.seeds}", "callbacks.progress_bar=null",
                   f"hydra.sweep.dir={args.sweep_dir / str(i)}"]
        commands[name] = command
        if not args.report_only:
            print("+", shlex.join(command[1:]), flush=True)
            subprocess.run(command, check=False)  # failed jobs are in the summary

    results = defaultdict(list)  # (recipe, batch) -> [(auc, acc, seconds)]
    for i, name in enumerate(RECIPES):
        summary = args.sweep_dir / str(i) / "summary.csv"
        for row in csv.DictReader(open(summary)):
            batch = int(next(o.split("=")[1] for o in row["overrides"].split() if o.startswith("data.batch_size=")))
            if row["status"] == "completed":
                results[name, batch].append((float(row["test/auc"]), float(row["test/acc"])))
            else:
                results[name, batch].append((float("nan"), float("nan")))

    batches = sorted({b for _, b in results})
    lines = ["| global batch | " + " | ".join(f"{n}: test AUC | {n}: test acc" for n in RECIPES) + " |",
             "|---|" + "---|---|" * len(RECIPES)]
    for b in batches:
        cells = []
        for name in RECIPES:
            values = np.array(results[name, b])
            auc, acc = values[:, 0], values[:, 1]
            if np.isnan(auc).all():
                cells += ["diverged", "diverged"]
                continue
            spread = lambda v: f" ± {np.nanstd(v, ddof=1):.4f}" if np.isfinite(v).sum() > 1 else ""  # noqa: E731
            failed = f" ({np.isnan(auc).sum()} of {len(auc)} seeds diverged)" if np.isnan(auc).any() else ""
            cells += [f"{np.nanmean(auc):.4f}{spread(auc)}{failed}", f"{np.nanmean(acc):.4f}{spread(acc)}"]
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name in RECIPES:
        means = [np.nanmean(np.array(results[name, b])[:, 0]) for b in batches]
        ax.plot(batches, means, marker="o", label=name)
    ax.set(xscale="log", xlabel="global batch size", ylabel="test AUC", title="HEP top tagging: large-batch training")
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    plot = args.out.with_suffix(".png")
    fig.savefig(plot, dpi=110)

    block = [BEGIN, "", table, "", f"![test AUC vs batch]({plot.name})", "", "Commands:", ""]
    block += ["    " + shlex.join(["python", *c[1:]]) for c in commands.values()]
    block = "\n".join(block + ["", END])
    # Only the block between the markers is rewritten: the hand-written reading around it stays.
    text = args.out.read_text() if args.out.exists() else f"{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    args.out.write_text(head + block + rest.split(END, 1)[1])
    print(table)


if __name__ == "__main__":
    main()
