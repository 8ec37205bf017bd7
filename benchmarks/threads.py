"""torch's default threads against sciml's `threads=auto` and one thread, as whole training processes.

Each round runs every setting once, in turn, so that the load of a shared machine hits them alike; the table gives
the median training rate (`train/samples_per_s` of metrics.json) and wall time, and each setting's rate as a ratio
to torch's default within the same round (median over rounds). Absolute numbers drift with the machine's load:
compare the ratios.

    PYTHONPATH=. python benchmarks/threads.py --rounds 3 --out docs/performance.md
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from markers import replace_block  # benchmarks/ is on sys.path when run as a script

SETTINGS = {
    "torch default (threads=null)": ({}, ["threads=null"]),
    "sciml default (threads=auto)": ({}, []),
    "OMP_NUM_THREADS=1": ({"OMP_NUM_THREADS": "1"}, ["threads=null"]),
}


def run_once(plugin: str, env: dict, overrides: list[str], extra: list[str], workdir: Path) -> tuple[float, float]:
    out = Path(tempfile.mkdtemp(dir=workdir))
    command = [sys.executable, "-m", "sciml", f"+plugin={plugin}", "trainer.max_epochs=1", f"hydra.run.dir={out}",
               "callbacks.progress_bar=null", *extra, *overrides]
    start = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    return json.loads((out / "metrics.json").read_text())["train/samples_per_s"], wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plugin", default="hep")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, help="write the table into this markdown file (between markers)")
    parser.add_argument("extra", nargs="*", help="more overrides for every run")
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    os.environ.clear()
    os.environ.update(env)
    results = {name: [] for name in SETTINGS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, (setting_env, overrides) in SETTINGS.items():
                rate, wall = run_once(args.plugin, setting_env, overrides, args.extra, Path(tmp))
                results[name].append((rate, wall))
                print(f"round {r + 1} {name}: {rate:.0f} samples/s, {wall:.1f} s", flush=True)
    base = list(SETTINGS)[0]
    lines = ["| setting | training samples/s (median) | wall s (median) | rate / torch default (median of rounds) |",
             "|---|---|---|---|"]
    for name, runs in results.items():
        ratio = statistics.median(r[0] / b[0] for r, b in zip(runs, results[base]))
        lines.append(f"| {name} | {statistics.median(r[0] for r in runs):.0f} | "
                     f"{statistics.median(r[1] for r in runs):.1f} | {ratio:.2f} |")
    load = os.getloadavg()
    lines.append("")
    lines.append(f"`{args.plugin}`, 1 epoch, {args.rounds} interleaved rounds, load average at the end "
                 f"{load[0]:.1f} on {os.cpu_count()} CPUs. Command: `PYTHONPATH=. python benchmarks/threads.py "
                 f"--rounds {args.rounds} {' '.join(args.extra)}`.".replace(" `", "`"))
    table = "\n".join(lines)
    print(table)
    if args.out:
        replace_block(args.out, "threads", table)


if __name__ == "__main__":
    main()
