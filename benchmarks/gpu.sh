#!/usr/bin/env bash
# Training speed of every plugin on one GPU (fp32 and bf16: samples/s, MFU, data wait, peak memory), written to
# docs/performance.md. About 3-5 minutes on an H100/H200. `--cpu` runs the same benchmark on CPU with few steps
# (a check of the script; the GPU rows are marked as not yet measured). Extra arguments go to gpu_bench.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
exec timeout 480 "$PYTHON" benchmarks/gpu_bench.py "$@"
