"""Semi-supervised study for docs/climate.md: supervised on 100 % of the labels, supervised on 10 %, and
semi-supervised on 10 % (the other 90 % train the auto-encoder branch), on the same data and the same number of
optimizer steps (validated every 20 steps; the checkpoint with the best validation mIoU is tested). Each
configuration is one `python -m sciml +plugin=climate` run; the table is printed as Markdown and written to
OUT/summary.md. One thread per run: on a shared machine two threads per process are many times slower.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/climate_semi_supervised.py --out runs/climate_semi \
        --steps 240 --seeds 0 1

Defaults: the embedded sample (160 global 96 x 144 snapshots: 112 train, 24 validation, 24 test), cropped to the
Northern Hemisphere 0-66 N (35 x 144 grid points) and a narrower network (widths 8, 16, 32) so that six runs fit in
about 20 minutes on a shared 2-core machine; batch 8. Other overrides replace these two, e.g. `-- data.crop=null`.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = {
    "supervised, 100 % labels": ["data.labeled_fraction=1.0"],
    "supervised, 10 % labels": ["data.labeled_fraction=0.1", "data.unlabeled=drop"],
    "semi-supervised, 10 % labels": ["data.labeled_fraction=0.1", "data.unlabeled=reconstruct"],
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/climate_semi"))
    parser.add_argument("--steps", type=int, default=240, help="optimizer steps per run")
    parser.add_argument("--val-every", type=int, default=20, help="validate every N steps (the same in every run)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("overrides", nargs="*", default=["data.crop={lat:[0,66]}", "model.widths=[8,16,32]"],
                        help="overrides for every run (replace the defaults), e.g. data.path=DIR")
    args = parser.parse_args(argv)
    rows = []
    for seed in args.seeds:
        for name, overrides in CONFIGS.items():
            kind = name.split(",")[0].replace("-", "_")
            run_dir = args.out / f"seed{seed}" / kind / overrides[0].split("=")[1]
            command = [sys.executable, "-m", "sciml", "+plugin=climate", *overrides, f"seed={seed}",
                       f"trainer.max_steps={args.steps}", "trainer.max_epochs=-1",
                       "trainer.check_val_every_n_epoch=null",
                       f"+trainer.val_check_interval={args.val_every}", "callbacks.progress_bar=null",
                       f"hydra.run.dir={run_dir}", *args.overrides]
            shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, never a resume of an older one
            print("$", " ".join(command[1:]), flush=True)
            start = time.time()
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                print(result.stdout[-2000:], result.stderr[-2000:], file=sys.stderr)
                return 1
            m = json.loads((run_dir / "metrics.json").read_text())
            rows.append((name, seed, m["test/iou_tc"], m["test/iou_ar"], m["test/miou"], time.time() - start))
            print(f"  {name}: IoU TC {m['test/iou_tc']:.3f}, AR {m['test/iou_ar']:.3f}, "
                  f"mIoU {m['test/miou']:.3f} ({rows[-1][-1]:.0f} s)", flush=True)
    table = ["| training | seed | IoU TC | IoU AR | mean IoU | wall time |", "|---|---|---|---|---|---|"]
    table += [f"| {n} | {s} | {tc:.3f} | {ar:.3f} | {mi:.3f} | {t:.0f} s |" for n, s, tc, ar, mi, t in rows]
    text = "\n".join(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
