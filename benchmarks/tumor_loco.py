"""Leave-one-case-out evaluation of the tumor plugin: how well the default model segments a brain it has not seen.

For each case of the data (default: the four embedded BRATS 2015 cases), train the default configuration on the
other cases with sciml's CLI and test it on the held-out case (no validation case: the checkpoint is the one
with the lowest training loss, so nothing of the held-out case steers training). Writes a Markdown table of Dice
and HD95 per case and region, their means, and the wall time of each fold.

With `--full-size DIR` (a folder holding the original, uncropped case folders), each fold's trained checkpoint is
also evaluated on the original full-size volume of its held-out case, as a user evaluates unseen cases:
`train=false ckpt_path=... data.test_path=CASE_FOLDER`. `--reuse` skips training for folds already trained.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/tumor_loco.py --jobs 2 [sciml overrides ...]
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sciml_plugins.tumor.reader import DEFAULT_PATH, find_cases

REGIONS = ("wt", "tc", "et")


def evaluate_full_size(case: str, run_dir: Path, originals: Path, overrides: list[str]) -> dict:
    folder = next(p for p in originals.rglob(case) if p.is_dir())
    out = run_dir / "full_size"
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "sciml", "+plugin=tumor", "train=false",
               f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", f"data.test_path={folder}",
               f"hydra.run.dir={out}", "callbacks.progress_bar=null", *overrides]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"full-size evaluation of {case} failed:\n{result.stdout[-3000:]}")
    with open(out / "test_per_case.csv") as f:
        row = next(csv.DictReader(f))
    return {"case": case, "seconds": math.nan, **{k: float(v) for k, v in row.items() if k != "case"},
            "command": " ".join(command[1:])}


def fold(case: str, run_dir: Path, data: str | None, overrides: list[str], reuse: bool = False) -> dict:
    if reuse and (run_dir / "test_per_case.csv").is_file():
        return {"case": case, "seconds": math.nan, "command": "(reused)",
                **{k: float(v) for k, v in next(csv.DictReader(open(run_dir / "test_per_case.csv"))).items()
                   if k != "case"}}
    command = [sys.executable, "-m", "sciml", "+plugin=tumor", "data.train_split=rest", "data.group_by=case",
               f"data.test_groups=[{case}]", "data.val_size=0", "+trainer.limit_val_batches=0",
               "monitor=train/seg_loss", "monitor_mode=min", f"hydra.run.dir={run_dir}",
               # without validation, Lightning saves checkpoints at the end of training epochs only if validation
               # would run every epoch
               "trainer.check_val_every_n_epoch=1",
               "callbacks.progress_bar=null", *([f"data.path={data}"] if data else []), *overrides]
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run: sciml would resume from an old last.ckpt
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode:
        raise SystemExit(f"fold {case} failed:\n{result.stderr[-3000:]}")
    with open(run_dir / "test_per_case.csv") as f:
        row = next(csv.DictReader(f))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {"case": case, "seconds": seconds, **{k: float(v) for k, v in row.items() if k != "case"},
            "samples_per_s": metrics.get("train/samples_per_s", math.nan), "command": " ".join(command[1:])}


def table(rows: list[dict]) -> str:
    def cell(v):
        return "–" if math.isnan(v) else f"{v:.3f}" if v < 10 else f"{v:.1f}"

    head = ["case", *(f"Dice {r.upper()}" for r in REGIONS), *(f"HD95 {r.upper()} (mm)" for r in REGIONS),
            "wall time (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        values = [row[f"dice_{r}"] for r in REGIONS] + [row[f"hd95_{r}"] for r in REGIONS]
        seconds = "–" if math.isnan(row["seconds"]) else f"{row['seconds']:.0f}"
        lines.append(f"| {row['case']} | " + " | ".join(cell(v) for v in values) + f" | {seconds} |")
    means = []
    for key in [f"dice_{r}" for r in REGIONS] + [f"hd95_{r}" for r in REGIONS]:
        finite = [row[key] for row in rows if not math.isnan(row[key])]
        means.append(sum(finite) / len(finite) if finite else math.nan)
    lines.append("| **mean** | " + " | ".join(f"**{cell(v)}**" for v in means) + " | |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="folder of case folders (default: the embedded cases)")
    parser.add_argument("--run-dir", type=Path, default=Path("benchmarks/runs/tumor_loco"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/runs/tumor_loco/results.md"))
    parser.add_argument("--full-size", type=Path, default=None, help="folder of the original case folders")
    parser.add_argument("--reuse", action="store_true", help="keep folds that were already trained")
    parser.add_argument("--jobs", type=int, default=1, help="folds run at the same time")
    parser.add_argument("overrides", nargs="*", help="extra sciml overrides, applied to every fold")
    args = parser.parse_args(argv)
    cases = [c.name for c in find_cases(args.data or DEFAULT_PATH, ["Flair*", "T1c*"], "OTMultiClass*", None)]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(lambda case: fold(case, args.run_dir / case, args.data, args.overrides, args.reuse),
                             sorted(cases)))
        full = list(pool.map(lambda case: evaluate_full_size(case, args.run_dir / case, args.full_size,
                                                             args.overrides), sorted(cases))) if args.full_size else []
    text = (f"Leave-one-case-out, {len(rows)} folds: train on the other cases, test on the one named.\n\n"
            f"    nice -n 10 python benchmarks/tumor_loco.py --jobs {args.jobs} {' '.join(args.overrides)}\n\n{table(rows)}\n\n"
            f"Fold command (one case): `python {rows[0]['command']}`\n")
    if full:
        text += (f"\nThe same checkpoints on the original full-size volumes (240 x 240 x 155, every slice) of the "
                 f"held-out cases:\n\n{table(full)}\n\nEvaluation command (one case): `python {full[0]['command']}`\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
