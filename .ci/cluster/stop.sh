#!/usr/bin/env bash
# Stop what .ci/cluster/start.sh STATE_DIR started, by the PIDs it recorded: the Ray head, slurmd, slurmctld and
# munged (in this order: the SLURM daemons still need munge to say goodbye). Safe to call twice or after a
# partial start.
set -uo pipefail
state=${1:?usage: stop.sh STATE_DIR}
[ -d "$state" ] || exit 0
for name in ray slurmd slurmctld munged; do
    file=$state/$name.pid
    [ -f "$file" ] || continue
    pid=$(cat "$file")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null
        for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        if kill -0 "$pid" 2>/dev/null; then
            echo "stop.sh: $name ($pid) did not exit after SIGTERM; killing it" >&2
            kill -KILL "$pid" 2>/dev/null
        fi
    fi
    rm -f "$file"
done
