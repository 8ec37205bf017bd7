"""CPU speed options per plugin: bf16 autocast, channels-last and torch.compile, as training samples/s and as a
share of this CPU's matmul peak of the precision used (a 4096x4096 matmul with the same threads, measured in every
round next to the runs it judges).

Each round runs every option once, in turn (`benchmarks/gpu_bench.measure`: one Lightning fit of the plugin's
default config, warm-up steps then timed steps); ratios to fp32 are taken within a round, since the machine's load
drifts. Rates and peaks are per second of this process's CPU time, which other jobs' load moves far less than
wall time (the matmul peak measured by wall time on the loaded machine came out 10x too low). The options are config keys: `trainer.precision=bf16-mixed`, `callbacks.speed.channels_last=true`,
`callbacks.speed.compile=true`.

    PYTHONPATH=. python benchmarks/cpu_options.py --plugins hep --rounds 2 --out docs/performance.md
"""
from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_bench import matmul_peak, measure  # noqa: E402
from markers import replace_block  # noqa: E402

from sciml.threads import configure_threads  # noqa: E402

OPTIONS = {  # name: (precision, channels_last, compile)
    "fp32": ("fp32", False, False),
    "bf16 autocast": ("bf16", False, False),
    "fp32 channels-last": ("fp32", True, False),
    "bf16 channels-last": ("bf16", True, False),
    "fp32 compile": ("fp32", False, True),
    "bf16 compile": ("bf16", False, True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plugins", nargs="+", default=["hep"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--options", nargs="+", default=list(OPTIONS), choices=list(OPTIONS))
    parser.add_argument("--out", type=Path)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    threads = configure_threads("auto", 1)
    device = torch.device("cpu")
    lines = ["| plugin | option | samples per CPU-second (median) | rate / fp32 (median of rounds) | share of the "
             "precision's matmul peak | samples per wall second (median) |", "|---|---|---|---|---|---|"]
    peaks_seen = {"fp32": [], "bf16": []}
    for plugin in args.plugins:
        runs = {name: [] for name in args.options}
        for r in range(args.rounds):
            peaks = {"fp32": matmul_peak(torch.float32, clock=time.process_time),
                     "bf16": matmul_peak(torch.bfloat16, clock=time.process_time)}
            for k, v in peaks.items():
                peaks_seen[k].append(v)
            for name in args.options:
                precision, channels_last, compile = OPTIONS[name]
                result = measure(plugin, precision, device, args.warmup, args.steps, args.overrides,
                                 channels_last=channels_last, compile=compile)
                share = result["samples_per_cpu_s"] * result["flops_per_sample"] / peaks[precision]
                runs[name].append((result["samples_per_cpu_s"], share, result["samples_per_s"]))
                print(f"{plugin} round {r + 1} {name}: {result['samples_per_cpu_s']:.0f} samples per CPU-second "
                      f"({result['samples_per_s']:.0f} per wall second), "
                      f"{100 * share:.0f} % of the {precision} peak {peaks[precision] / 1e9:.0f} GFLOP/s", flush=True)
        for name, values in runs.items():
            base = runs.get("fp32")
            ratio = statistics.median(v[0] / b[0] for v, b in zip(values, base)) if base else float("nan")
            lines.append(f"| {plugin} | {name} | {statistics.median(v[0] for v in values):.0f} | {ratio:.2f} | "
                         f"{100 * statistics.median(v[1] for v in values):.0f} % | {statistics.median(v[2] for v in values):.0f} |")
    lines += ["", f"{args.rounds} interleaved rounds, {args.warmup} warm-up + {args.steps} timed steps, {threads} "
              f"thread(s); rates and peaks per second of this process's CPU time (steadier than wall time on a "
              f"shared machine); matmul peaks (median) fp32 {statistics.median(peaks_seen['fp32']) / 1e9:.0f}, bf16 "
              f"{statistics.median(peaks_seen['bf16']) / 1e9:.0f} GFLOP/s; load average "
              f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs. Command: `PYTHONPATH=. python "
              f"benchmarks/cpu_options.py --plugins {' '.join(args.plugins)} --rounds {args.rounds}`."]
    table = "\n".join(lines)
    print(table)
    if args.out:
        replace_block(args.out, "cpu_options", table)


if __name__ == "__main__":
    main()
