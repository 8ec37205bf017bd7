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
_LARS = ["optimizer=lars", "optimizer.lr={lars_lr}", "optimizer.base_batch_size={base}", "optimizer.lr_scaling=linear",
         "scheduler=warmup_poly", "scheduler.warmup_epochs={warmup}", "scheduler.power=2"]
# key (the sweep directory's prefix) -> (label, overrides)
RECIPES = {
    "sgd": ("SGD + linear scaling + warm-up", [
        "optimizer=sgd", "optimizer.lr={sgd_lr}", "optimizer.momentum=0.9", "optimizer.weight_decay=0.0005",
        "optimizer.base_batch_size={base}", "optimizer.lr_scaling=linear", "optimizer.exclude_from_decay=true",
        "scheduler=warmup_poly", "scheduler.warmup_epochs={warmup}", "scheduler.power=2",
    ]),
    # optimizer=lars's default: biases and batch-norm parameters excluded (plain momentum SGD), as in MLPerf
    "lars": ("LARS + warm-up + poly decay", _LARS),
    # You et al. 2017, Algorithm 1: the trust ratio and weight decay on every parameter
    "lars-all": ("LARS on all parameters + warm-up + poly decay", [*_LARS, "optimizer.exclude_from_decay=false"]),
}


def recipe_of(overrides: dict) -> str | None:
    """A run's recipe key, from its overrides (exclude_from_decay defaults to true in optimizer=lars)."""
    excluded = overrides.get("optimizer.exclude_from_decay", "true").lower() == "true"
    return {("sgd", True): "sgd", ("lars", True): "lars", ("lars", False): "lars-all"}.get(
        (overrides.get("optimizer"), excluded))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("benchmarks/data/hep_top_qcd_large.h5"))
    parser.add_argument("--batch-sizes", default="128,512,2048,4096")
    parser.add_argument("--seeds", default="1")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--base", type=int, default=128, help="batch size at which the base LRs are given")
    parser.add_argument("--sgd-lr", default="0.05", help="base LR, or a comma list to sweep")
    parser.add_argument("--lars-lr", default="0.5", help="base LR, or a comma list to sweep")
    parser.add_argument("--model", default="model.widths=[16,32,32] model.hidden=32 model.batch_norm=true",
                        help="model overrides (a smaller net than the default keeps the study affordable on CPU; "
                             "batch norm as in the paper's AlexNet-BN and ResNet-50)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at once through hydra/launcher=local_parallel (joblib caps each run's threads)")
    parser.add_argument("--sweep-dir", type=Path, default=Path("benchmarks/runs/large_batch"),
                        help="root of the sweeps; the report reads every sweep under it")
    parser.add_argument("--name", default="main", help="sub-directory name of this invocation's sweeps")
    parser.add_argument("--recipes", default="sgd,lars", help=f"recipes to run, of {', '.join(RECIPES)}")
    parser.add_argument("--out", type=Path, default=Path("docs/large-batch.md"))
    parser.add_argument("--report-only", action="store_true", help="rebuild the report from existing sweeps")
    args = parser.parse_args(argv)

    for key in args.recipes.split(","):
        overrides = [o.format(sgd_lr=args.sgd_lr, lars_lr=args.lars_lr, base=args.base, warmup=args.warmup)
                     for o in RECIPES[key][1]]
        sweep = args.sweep_dir / f"{key}-{args.name}"
        command = [sys.executable, "-m", "sciml", "-m", "+plugin=hep", f"data.path={args.data}",
                   f"trainer.max_epochs={args.epochs}", *shlex.split(args.model), *overrides,
                   f"data.batch_size={args.batch_sizes}", f"seed={args.seeds}", "callbacks.progress_bar=null",
                   f"hydra.sweep.dir={sweep}"]
        if args.jobs > 1:
            command += ["hydra/launcher=local_parallel", f"hydra.launcher.n_jobs={args.jobs}"]
        if not args.report_only:
            print("+", shlex.join(command[1:]), flush=True)
            subprocess.run(command, check=False)  # failed jobs are in the summary

    # Every sweep under the root counts: runs are told apart by their overrides (optimizer, batch, base LR).
    runs = defaultdict(list)  # (recipe, batch, lr) -> [(val auc, test auc, test acc)] over seeds
    seeds = defaultdict(list)  # (recipe, batch, lr) -> the seeds of those runs
    # values compared in lower case: Hydra records `true` as `True`
    wanted = {k: v.lower() for k, v in (item.split("=", 1) for item in [*shlex.split(args.model),
                                                                        f"trainer.max_epochs={args.epochs}"])}
    sweeps = []
    for summary in sorted(args.sweep_dir.glob("*/summary.csv")):
        used = False
        for row in csv.DictReader(open(summary)):
            o = dict(item.split("=", 1) for item in row["overrides"].split() if "=" in item)
            if any(o.get(k, "").lower() != v for k, v in wanted.items()) or any(
                    k.startswith("model.") and k not in wanted for k in o):  # the same network, exactly
                continue
            name = recipe_of(o)
            if name is None:
                continue
            ok = row["status"] == "completed"
            values = tuple(float(row[k]) if ok else float("nan") for k in ("val/auc_best", "test/auc", "test/acc"))
            key = name, int(o["data.batch_size"]), float(o["optimizer.lr"])
            runs[key].append(values)
            seeds[key].append(o["seed"])
            used = True
        if used:
            sweeps.append(summary.parent)
    batches = sorted({b for _, b, _ in runs})

    def best_lr(name, batch):
        """The base LR with the best mean validation AUC over the seeds that every LR of the grid ran (so that
        seeds added later at the chosen LR cannot change the choice); test numbers are read only for that LR."""
        lrs = [lr for n, b, lr in runs if n == name and b == batch]
        common = set.intersection(*(set(seeds[name, batch, lr]) for lr in lrs)) if lrs else set()

        def val_auc(lr):
            v = [r[0] for r, s in zip(runs[name, batch, lr], seeds[name, batch, lr]) if s in common]
            return np.nan_to_num(np.nanmean(v), nan=-1) if v else -1

        return max(lrs, key=val_auc, default=None)

    def cell(values):
        v = np.array(values)
        if np.isnan(v[:, 1]).all():
            return ["diverged", "diverged"]
        spread = lambda x: f" ± {np.nanstd(x, ddof=1):.4f}" if np.isfinite(x).sum() > 1 else ""  # noqa: E731
        failed = f" ({np.isnan(v[:, 1]).sum()} of {len(v)} diverged)" if np.isnan(v[:, 1]).any() else ""
        return [f"{np.nanmean(v[:, 1]):.4f}{spread(v[:, 1])}{failed}", f"{np.nanmean(v[:, 2]):.4f}"]

    present = [key for key in RECIPES if any(n == key for n, _, _ in runs)]
    lines = ["| global batch | " + " | ".join(f"{RECIPES[k][0]}: test AUC (base LR) | test acc" for k in present)
             + " |", "|---|" + "---|---|" * len(present)]
    chosen = {}
    for b in batches:
        cells = []
        for key in present:
            lr = chosen[key, b] = best_lr(key, b)
            auc, acc = cell(runs[key, b, lr]) if lr is not None else ("–", "–")
            cells += [auc if lr is None else f"{auc} ({lr:g})", acc]
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    lines += ["", "Every run (base LR at batch %d, scaled linearly; val AUC is the best epoch's):" % args.base, "",
              "| recipe | global batch | base LR | seeds | val AUC | test AUC | test acc |",
              "|---|---|---|---|---|---|---|"]
    for (key, b, lr), values in sorted(runs.items()):
        v = np.array(values)
        lines.append(f"| {key} | {b} | {lr:g} | {len(v)} | {np.nanmean(v[:, 0]):.4f} | "
                     + " | ".join(cell(values)) + " |")
    table = "\n".join(lines)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for key in present:
        xs = [b for b in batches if chosen[key, b] is not None]
        aucs = [np.array(runs[key, b, chosen[key, b]])[:, 1] for b in xs]
        ax.errorbar(xs, [np.nanmean(a) for a in aucs], yerr=[np.nanstd(a, ddof=1) if len(a) > 1 else 0 for a in aucs],
                    marker="o", capsize=3, label=RECIPES[key][0])
    ax.set(xscale="log", xlabel="global batch size", ylabel="test AUC (LR chosen by val AUC; ± sd over seeds)",
           title="HEP top tagging: large-batch training")
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.minorticks_off()  # log-axis minor labels would overlap the batch-size ticks
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    plot = args.out.with_suffix(".png")
    fig.savefig(plot, dpi=110)

    block = [BEGIN, "", table, "", f"![test AUC vs batch]({plot.name})", "", "Commands:", ""]
    block += ["    " + sweep_command(d) for d in sweeps]
    block = "\n".join(block + ["", END])
    # Only the block between the markers is rewritten: the hand-written reading around it stays.
    text = args.out.read_text() if args.out.exists() else f"{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    args.out.write_text(head + block + rest.split(END, 1)[1])
    print(table)


def sweep_command(sweep: Path) -> str:
    """The command that made a sweep, from Hydra's own record of it (multirun.yaml)."""
    from omegaconf import OmegaConf

    overrides = OmegaConf.load(sweep / "multirun.yaml").hydra.overrides.task
    return shlex.join(["python", "-m", "sciml", "-m", *overrides, f"hydra.sweep.dir={sweep}"])


if __name__ == "__main__":
    main()
