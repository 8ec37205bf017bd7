#!/usr/bin/env bash
# `make test-cluster`: install SLURM and munge when missing (Debian, as root), start a one-node SLURM cluster and a
# Ray head on this machine (.ci/cluster/start.sh), run `pytest -m cluster`, and stop every daemon by its PID
# whatever happened. Usage: .ci/cluster/test.sh [PYTHON] [pytest args...].
set -euo pipefail
python=${1:-.venv/bin/python}
shift || true
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    [ "$(id -u)" = 0 ] || { echo "test-cluster: slurm-wlm and munge are missing; installing them needs root" >&2; exit 1; }
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge > /dev/null
fi
[ "$(id -u)" = 0 ] || { echo "test-cluster: the SLURM daemons are started as root; run it as root" >&2; exit 1; }

state=$(mktemp -d /tmp/sciml-cluster.XXXXXX)
here=$(dirname "$0")
cleanup() {
    status=$?
    "$here/stop.sh" "$state"
    if [ "$status" != 0 ]; then
        echo "test-cluster: failed (exit $status); daemon logs:" >&2
        for log in "$state"/log/*; do echo "== $log" >&2; tail -n 20 "$log" >&2; done
    fi
    rm -rf "$state"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

"$here/start.sh" "$state" "$python"
# shellcheck disable=SC1091
source "$state/env"
OMP_NUM_THREADS=1 "$python" -m pytest -q -m cluster -p no:cacheprovider --durations=10 "$@"
