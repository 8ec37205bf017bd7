"""DDP against the hybrid strategy on HEP, side by side: communicated bytes, wall time and test AUC.

Runs sciml's CLI once per configuration, one after the other on the same machine and data: plain DDP, and hybrid
(group_size=1: every rank is its own group, so all traffic is the cross-group model averaging) in periodic and async
mode at each sync period. Then writes a Markdown table into the marked block of the output file.

    python benchmarks/distributed.py --out docs/distributed.md

Bytes are the per-rank totals handed to all-reduce during the fit (`comm/intra_group_bytes`,
`comm/cross_group_bytes`; see sciml/distributed/comm.py). Wall time is the whole CLI run (start-up, fit, test,
predict); samples/s is rank 0's training throughput times the number of ranks, from the last epoch.
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

START, END = "<!-- distributed-benchmark:start -->", "<!-- distributed-benchmark:end -->"


def configurations(periods: list[int]) -> dict[str, list[str]]:
    configs = {"ddp": ["strategy=ddp"]}
    for mode in ("periodic", "async"):
        for period in periods:
            configs[f"hybrid {mode} sync_period={period}"] = [
                "strategy=hybrid", "strategy.group_size=1", f"strategy.sync_period={period}", f"strategy.mode={mode}"]
    return configs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=2, help="CPU processes (gloo)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--periods", default="2,8", help="hybrid sync periods, comma-separated")
    parser.add_argument("--run-dir", type=Path, default=Path("benchmarks/runs/distributed"))
    parser.add_argument("--out", type=Path, default=Path("docs/distributed.md"),
                        help=f"file whose block between {START} and {END} receives the table")
    parser.add_argument("overrides", nargs="*", help="extra sciml overrides for every run")
    args = parser.parse_args(argv)

    common = ["+plugin=hep", "data.path=null", f"trainer.max_epochs={args.epochs}", "trainer.accelerator=cpu",
              f"trainer.devices={args.devices}", "callbacks.progress_bar=null", *args.overrides]
    rows = []
    for name, strategy in configurations([int(p) for p in args.periods.split(",")]).items():
        run_dir = args.run_dir / name.replace(" ", "_").replace("=", "")
        command = [sys.executable, "-m", "sciml", *common, *strategy, f"hydra.run.dir={run_dir}"]
        print("$", shlex.join(["python", *command[1:]]), flush=True)
        start = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if result.returncode:
            sys.exit(f"{name} failed:\n{result.stderr[-3000:]}")
        metrics = json.loads((run_dir / "metrics.json").read_text())
        rows.append((name, metrics, seconds))
        print(f"  {seconds:.0f} s, test/auc {metrics['test/auc']:.4f}", flush=True)

    lines = ["| strategy | cross-group MB | intra-group MB | wall time (s) | train samples/s | test AUC |",
             "|---|---|---|---|---|---|"]
    for name, m, seconds in rows:
        lines.append(f"| {name} | {m['comm/cross_group_bytes'] / 1e6:.2f} | {m['comm/intra_group_bytes'] / 1e6:.2f} "
                     f"| {seconds:.0f} | {m['train/samples_per_s']:.0f} | {m['test/auc']:.4f} |")
    command = shlex.join(["python", "benchmarks/distributed.py", *(argv if argv is not None else sys.argv[1:])])
    report = (f"Measured with `{command}` ({args.devices} CPU processes, gloo, {args.epochs} epochs on the embedded "
              f"sample; {platform.processor() or platform.machine()}, {_cores()} cores), every run in one "
              f"invocation:\n\n" + "\n".join(lines) + "\n")
    print("\n" + report)
    text = args.out.read_text() if args.out.exists() else f"{START}\n{END}\n"
    if START not in text or END not in text:
        sys.exit(f"{args.out}: no block {START} ... {END} to write the table into")
    head, rest = text.split(START, 1)
    args.out.write_text(f"{head}{START}\n{report}{END}{rest.split(END, 1)[1]}")


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


if __name__ == "__main__":
    main()
