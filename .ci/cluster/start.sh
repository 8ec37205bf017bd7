#!/usr/bin/env bash
# Start a one-node test cluster on this machine: munged, slurmctld and slurmd (as root), and a Ray head.
# Usage: .ci/cluster/start.sh STATE_DIR [PYTHON]. Everything lives in STATE_DIR (configs, spool, logs, PID files,
# and `env`, the variables a client needs: SLURM_CONF, RAY_ADDRESS). Stop it with .ci/cluster/stop.sh STATE_DIR.
# Nothing outside STATE_DIR is written: no /etc/slurm, the system's munged socket is not used.
set -euo pipefail
state=$(realpath -m "${1:?usage: start.sh STATE_DIR [PYTHON]}")
python=${2:-.venv/bin/python}
slurmctld_port=${SCIML_SLURMCTLD_PORT:-6817}
slurmd_port=${SCIML_SLURMD_PORT:-6818}
ray_port=${SCIML_RAY_PORT:-6379}

mkdir -p -m 700 "$state"
mkdir -p "$state"/{ctld,slurmd,log,munge,ray}
chmod 700 "$state/munge"
host=$(hostname -s)
cpus=$(nproc)
# Memory a little below what the machine has: a node configured with more than it reports is drained.
mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)

# munge: our own daemon and socket (slurm.conf's AuthInfo points the SLURM daemons and clients at it).
key=$state/munge/munge.key
if [ -r /etc/munge/munge.key ]; then cp /etc/munge/munge.key "$key"; else head -c 1024 /dev/urandom > "$key"; fi
chmod 400 "$key"
socket=$state/munge/munge.socket
munged --foreground --force --socket="$socket" --key-file="$key" --pid-file="$state/munge/munged.pid" \
    --log-file="$state/log/munged.log" --seed-file="$state/munge/seed" > "$state/log/munged.out" 2>&1 &
echo $! > "$state/munged.pid"

# The pitfalls are in DESIGN.md: SlurmctldHost is this host's name (with its address, in case the name does not
# resolve); proctrack/linuxproc and task/none need no cgroups or systemd; no accounting daemon (so `sacct` fails
# and submitit warns "Bypassing sacct error" while polling).
cat > "$state/slurm.conf" <<CONF
ClusterName=sciml-ci
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$slurmctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$socket
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/slurmd/%n
SlurmctldPidFile=$state/ctld/slurmctld.pid
SlurmdPidFile=$state/slurmd/slurmd.pid
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=300
KillWait=10
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
# slurm.conf must be readable by slurmd and the job's user; cgroup.conf is not needed with these plugins.
chmod 644 "$state/slurm.conf"
export SLURM_CONF=$state/slurm.conf

for _ in $(seq 50); do [ -S "$socket" ] && break; sleep 0.2; done
[ -S "$socket" ] || { echo "munged did not start; see $state/log/munged.log" >&2; exit 1; }

slurmctld -D -i -f "$SLURM_CONF" > "$state/log/slurmctld.out" 2>&1 &
echo $! > "$state/slurmctld.pid"
slurmd -D -f "$SLURM_CONF" > "$state/log/slurmd.out" 2>&1 &
echo $! > "$state/slurmd.pid"

# Ready when the node takes jobs.
for _ in $(seq 60); do
    if sinfo -h -N -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then break; fi
    sleep 1
done
sinfo -h -N -o '%T' | grep -qE '^(idle|mixed|allocated)' || {
    echo "SLURM node did not become idle; see $state/log/" >&2; sinfo -N >&2 || true; exit 1; }

# Ray head. `--block` keeps one process in front of the head's daemons: stopping it by PID ends them all, and no
# other Ray instance on the machine is touched (`ray stop` would end every Ray process of the user). Started
# through $python so that the workers run that interpreter (a copied venv's `ray` script may name another).
"$python" -m ray.scripts.scripts start --head --block --port="$ray_port" --num-cpus="$cpus" --include-dashboard=false \
    --temp-dir="$state/ray" --disable-usage-stats > "$state/log/ray.out" 2>&1 &
echo $! > "$state/ray.pid"
for _ in $(seq 120); do
    if RAY_ADDRESS=127.0.0.1:$ray_port "$python" -c 'import ray; ray.init(); ray.shutdown()' >/dev/null 2>&1; then
        ray_ok=1; break
    fi
    sleep 1
done
[ -n "${ray_ok:-}" ] || { echo "Ray head did not start; see $state/log/ray.out" >&2; exit 1; }

cat > "$state/env" <<ENV
export SLURM_CONF=$SLURM_CONF
export RAY_ADDRESS=127.0.0.1:$ray_port
ENV
echo "cluster up: SLURM node $host ($cpus CPUs, $mem_mb MB), Ray head 127.0.0.1:$ray_port; state in $state"
