"""Test metrics of whole training runs with a CPU speed option against fp32, over seeds: does the faster setting
train as well? (`benchmarks/cpu_options.py` measures the speed; this measures what the speed costs, if anything.)

Each seed runs every option once, in turn, as `python -m sciml +plugin=NAME seed=S <option overrides>`; the same
seed gives every option the same split, initial weights and batch order. The table gives the test metrics' mean and
standard deviation over seeds and the wall time per run (a shared machine: compare within a seed).

    PYTHONPATH=. python benchmarks/option_metrics.py --plugin hep --seeds 3 --out docs/performance.md
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_bench import TEST_METRICS  # noqa: E402
from markers import replace_block  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OPTIONS = {
    "fp32": [],
    "bf16 channels-last": ["trainer.precision=bf16-mixed", "callbacks.speed.channels_last=true"],
    "bf16 autocast": ["trainer.precision=bf16-mixed"],
}


def run(plugin: str, seed: int, overrides: list[str], workdir: Path) -> dict:
    out = Path(tempfile.mkdtemp(dir=workdir))
    command = [sys.executable, "-m", "sciml", f"+plugin={plugin}", f"seed={seed}", f"hydra.run.dir={out}",
               "callbacks.progress_bar=null", *overrides]
    start = time.perf_counter()
    with open(out / "run.log", "w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    metrics = json.loads((out / "metrics.json").read_text())
    return {"wall_s": time.perf_counter() - start, "metrics": metrics}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plugin", default="hep", choices=list(TEST_METRICS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--options", nargs="+", default=["fp32", "bf16 channels-last"], choices=list(OPTIONS))
    parser.add_argument("--out", type=Path)
    parser.add_argument("overrides", nargs="*", help="extra overrides for every run")
    args = parser.parse_args()
    keys = TEST_METRICS[args.plugin]
    runs: dict[str, list[dict]] = {name: [] for name in args.options}
    with tempfile.TemporaryDirectory(dir=ROOT / "benchmarks") as tmp:
        for seed in range(1, args.seeds + 1):
            for name in args.options:
                result = run(args.plugin, seed, [*OPTIONS[name], *args.overrides], Path(tmp))
                runs[name].append(result)
                print(f"seed {seed} {name}: {result['wall_s']:.0f} s, "
                      f"{ {k: round(result['metrics'].get(k, float('nan')), 4) for k in keys} }", flush=True)
    lines = ["| option | " + " | ".join(keys) + " | wall s per run |", "|---" * (len(keys) + 2) + "|"]
    for name, results in runs.items():
        cells = []
        for key in keys:
            values = np.array([r["metrics"].get(key, np.nan) for r in results])
            cells.append(f"{values.mean():.4f} ± {values.std(ddof=1):.4f}" if len(values) > 1 else f"{values[0]:.4f}")
        walls = " / ".join(f"{r['wall_s']:.0f}" for r in results)
        lines.append(f"| {name} (`{' '.join(OPTIONS[name]) or 'defaults'}`) | " + " | ".join(cells) + f" | {walls} |")
    extra = f" {' '.join(args.overrides)}" if args.overrides else ""
    lines += ["", f"`{args.plugin}`, seeds 1-{args.seeds} (mean ± standard deviation over seeds), whole runs with the "
              f"plugin's defaults otherwise. Command: `PYTHONPATH=. python benchmarks/option_metrics.py --plugin "
              f"{args.plugin} --seeds {args.seeds}{extra}`"]
    table = "\n".join(lines)
    print(table)
    if args.out:
        replace_block(args.out, f"option-metrics-{args.plugin}", table)


if __name__ == "__main__":
    main()
