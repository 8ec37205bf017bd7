"""`python -m sciml compare RUN_DIR... [--baseline SCORES] [--out DIR]`: several runs (and a baseline's scores) on
one figure and in one table.

Reads each run directory's `metrics.json` (with the bootstrap intervals `<metric>_ci_low/_ci_high` when present)
and `plots/roc.csv` (written by the classification tasks), and writes to `--out` (default `comparison/`):
`roc.png` (the ROC curves overlaid; background rejection against signal efficiency beside it), `metrics.png` (the
test metrics of every run with their intervals), `comparison.md` and `comparison.csv` (one row per run).

A baseline is an HDF5 file with `score` and `label` datasets (optionally `weight`; the layout of HEP's
`predictions/test_scores.h5`) or a CSV file with `score` and `label` columns: its ROC is drawn and its AUC tabulated.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import numpy as np

from sciml.errors import SciMLError


def main(argv: list[str]) -> int:
    """The `compare` command; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m sciml compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (each with metrics.json)")
    parser.add_argument("--baseline", type=Path, help="scores of a baseline: HDF5 or CSV with score and label")
    parser.add_argument("--out", type=Path, default=Path("comparison"), help="output folder (default comparison/)")
    parser.add_argument("--stage", default="test", help="metrics of this stage (default test)")
    args = parser.parse_args(argv)
    try:
        table = compare(args.runs, args.out, args.baseline, args.stage)
    except SciMLError as exc:
        print(f"sciml compare: error: {exc}", file=__import__("sys").stderr)
        return 1
    print((args.out / "comparison.md").read_text(), end="")
    print(f"written: {', '.join(str(args.out / f) for f in table)}")
    return 0


def load_run(run: Path) -> dict:
    """A run directory's label, metrics and ROC points (None when it has none)."""
    metrics_file = run / "metrics.json"
    if not metrics_file.is_file():
        raise SciMLError(f"{run}: no metrics.json (not a finished sciml run directory)")
    try:
        metrics = json.loads(metrics_file.read_text())
    except json.JSONDecodeError as exc:
        raise SciMLError(f"{metrics_file}: not valid JSON ({exc})") from None
    roc = None
    if (run / "plots" / "roc.csv").is_file():
        from sciml.plots import read_roc

        roc = read_roc(run / "plots" / "roc.csv")
    return {"name": _label(run), "metrics": metrics, "roc": roc}


def _label(run: Path) -> str:
    """The run's folder name, with its parent when the name alone says little (a multirun's job number)."""
    run = run.resolve()
    return f"{run.parent.name}/{run.name}" if run.name.isdigit() else run.name


def load_baseline(path: Path) -> dict:
    """ROC points and AUC of a baseline's scores."""
    import torch

    from sciml.metrics import binary_values, weighted_roc

    if not path.is_file():
        raise SciMLError(f"--baseline: no such file '{path}'")
    if path.suffix.lower() == ".csv":
        with path.open() as f:
            rows = list(csv.DictReader(f))
        if not rows or not {"score", "label"} <= set(rows[0]):
            raise SciMLError(f"--baseline {path}: a CSV needs the columns score and label")
        score = np.array([float(r["score"]) for r in rows])
        label = np.array([int(float(r["label"])) for r in rows])
        weight = np.array([float(r.get("weight") or 1.0) for r in rows])
    else:
        import h5py

        try:
            with h5py.File(path, "r") as h5:
                missing = {"score", "label"} - set(h5)
                if missing:
                    raise SciMLError(f"--baseline {path}: no {', '.join(sorted(missing))} dataset")
                score, label = h5["score"][...], h5["label"][...]
                weight = h5["weight"][...] if "weight" in h5 else np.ones(len(score))
        except OSError as exc:
            raise SciMLError(f"--baseline {path}: not a readable HDF5 or CSV file ({exc})") from None
    if score.ndim == 2:  # class probabilities: the signal's column
        score = score[:, 1]
    tensors = [torch.as_tensor(a, dtype=torch.float64) for a in (score, label, weight)]
    tensors[1] = tensors[1].long()
    fpr, tpr = weighted_roc(*tensors)
    values = binary_values(tensors[0], tensors[1], tensors[2])
    return {"name": f"baseline ({path.name})", "metrics": {f"test/{k}": v for k, v in values.items()},
            "roc": (fpr.numpy(), tpr.numpy())}


def compare(runs: list[Path], out: Path, baseline: Path | None = None, stage: str = "test") -> list[str]:
    """Write the comparison of `runs` (and `baseline`) into `out`; returns the names of the files written."""
    entries = [load_run(r) for r in runs]
    if baseline is not None:
        entries.append(load_baseline(baseline))
    out.mkdir(parents=True, exist_ok=True)
    names = _metric_names(entries, stage)
    written = _write_table(entries, names, out)
    if any(e["roc"] is not None for e in entries):
        _plot_rocs(entries, out / "roc.png")
        written.append("roc.png")
    if names:
        _plot_metrics(entries, names, out / "metrics.png")
        written.append("metrics.png")
    return written


def _metric_names(entries: list[dict], stage: str) -> list[str]:
    """The stage's metrics (without their interval keys and warnings), those of the first run first."""
    names: list[str] = []
    for entry in entries:
        for key, value in entry["metrics"].items():
            if (key.startswith(f"{stage}/") and isinstance(value, (int, float)) and not key.endswith(("_ci_low",
                                                                                                        "_ci_high"))
                    and key not in names):
                names.append(key)
    return names


def _cell(metrics: dict, key: str) -> str:
    value = metrics.get(key)
    if not isinstance(value, (int, float)):
        return ""
    text = f"{value:.4g}"
    low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
    if isinstance(low, (int, float)) and isinstance(high, (int, float)):
        text += f" [{low:.4g}, {high:.4g}]"
    if f"warning/{key}" in metrics:
        text += " (!)"
    return text


def _write_table(entries: list[dict], names: list[str], out: Path) -> list[str]:
    with (out / "comparison.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        header = ["run"]
        for n in names:
            header += [n, f"{n}_ci_low", f"{n}_ci_high"]
        writer.writerow(header)
        for e in entries:
            row: list = [e["name"]]
            for n in names:
                row += [e["metrics"].get(n, ""), e["metrics"].get(f"{n}_ci_low", ""),
                        e["metrics"].get(f"{n}_ci_high", "")]
            writer.writerow(row)
    lines = ["| run | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += ["| " + " | ".join([e["name"].replace("|", "\\|"), *(_cell(e["metrics"], n) for n in names)]) + " |"
              for e in entries]
    notes = sorted({f"{e['name']}: {k.removeprefix('warning/')}: {v}" for e in entries
                    for k, v in e["metrics"].items() if k.startswith("warning/")})
    text = "\n".join(lines) + "\n"
    text += "\nValues with [low, high]: bootstrap confidence intervals. (!): see the warnings below.\n"
    if notes:
        text += "\nWarnings:\n" + "".join(f"- {n}\n" for n in notes)
    (out / "comparison.md").write_text(text)
    return ["comparison.md", "comparison.csv"]


def _plot_rocs(entries: list[dict], path: Path) -> None:
    from sciml.plots import plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    for e in entries:
        if e["roc"] is None:
            continue
        fpr, tpr = e["roc"]
        style = {"ls": "--", "c": "k"} if e["name"].startswith("baseline") else {}
        left.plot(fpr, tpr, label=f"{e['name']} (AUC {np.trapezoid(tpr, fpr):.4f})", **style)
        keep = fpr > 0
        right.semilogy(tpr[keep], 1 / fpr[keep], label=e["name"], **style)
    left.plot([0, 1], [0, 1], ls=":", c="grey")
    left.set(xlabel="background efficiency (false positive rate)", ylabel="signal efficiency (true positive rate)",
             title="ROC")
    left.legend(fontsize=7, loc="lower right")
    right.set(xlabel="signal efficiency", ylabel="background rejection", xlim=(0, 1), title="Background rejection")
    right.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_metrics(entries: list[dict], names: list[str], path: Path) -> None:
    """One panel per metric: each run's value with its interval as an error bar."""
    from sciml.plots import plt

    cols = min(len(names), 4)
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 0.5 + 0.35 * len(entries) * rows + 1.2 * rows),
                             squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, names):
        for i, e in enumerate(entries):
            m = e["metrics"]
            value = m.get(name)
            if not isinstance(value, (int, float)):
                continue
            low, high = m.get(f"{name}_ci_low", value), m.get(f"{name}_ci_high", value)
            ax.errorbar([value], [i], xerr=[[max(value - low, 0)], [max(high - value, 0)]], fmt="o", capsize=3)
        ax.set_yticks(range(len(entries)), [e["name"] for e in entries], fontsize=7)
        ax.set_title(name, fontsize=9)
        ax.invert_yaxis()
        ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
