"""Against a real one-node cluster: SLURM (slurmctld + slurmd) and a Ray head, started by `make test-cluster`
(.ci/cluster/start.sh). Marked `cluster`: `pytest -m cluster` runs them, and they skip when no cluster is up.

- the sbatch script of docs/distributed.md: 2 ranks under srun, one run directory, metrics written once;
- a sweep through `hydra/launcher=slurm`: a job array whose jobs share the submitting process's sweep directory
  and its summary;
- preemption: SLURM's warning signal, a checkpoint, requeue, resume, and the metrics of an uninterrupted job;
- sweeps through `hydra/launcher=ray_jobs` against the running Ray head: relative paths, a failed job and a job
  whose worker was killed recorded in summary.csv, and a DDP job (2 ranks inside one Ray task).
"""
from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cluster_helpers import ray_address, sbatch, slurm, wait_for  # noqa: F401 (fixtures)
from conftest import FAST, ROOT, write_h5

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(420)]

TINY = [*FAST, "trainer.max_epochs=1"]
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
# What `source .venv/bin/activate` does for a job, for the interpreter running the tests (an activate script names
# the directory its venv was created in, which need not be this one).
ACTIVATE = f"export PATH={Path(sys.executable).parent}:$PATH"


def _summary(sweep_dir: Path) -> list[dict]:
    with open(sweep_dir / "summary.csv") as f:
        return list(csv.DictReader(f))


def _metrics_lines(run_dir: Path, *more: Path) -> list[str]:
    """The 'metrics: {...}' lines rank 0 logs once per run, over every log of the run."""
    logs = [*run_dir.glob("*.log"), *more]
    return [line for log in logs for line in log.read_text().splitlines() if "[sciml][INFO] - metrics: {" in line]


# ---- SLURM -----------------------------------------------------------------------------------------------------------

def _documented_sbatch_script() -> str:
    """The sbatch script of docs/distributed.md, scaled to this one-node CPU cluster and the tiny test data."""
    text = (ROOT / "docs" / "distributed.md").read_text()
    script = re.search(r"### SLURM.*?```bash\n(.*?)```", text, re.S)[1]
    for old, new in [("--nodes=2", "--nodes=1"), ("--ntasks-per-node=4", "--ntasks-per-node=2"),
                     ("#SBATCH --gpus-per-node=4\n", ""), ("--cpus-per-task=8", "--cpus-per-task=1"),
                     ("--time=02:00:00", "--time=00:05:00"),
                     ("source .venv/bin/activate", ACTIVATE),
                     ("data.path=/scratch/jets/", "data.path=images.h5"),
                     ("strategy.group_size=4", "strategy.group_size=1"), ("strategy.sync_period=8", "strategy.sync_period=2"),
                     ("trainer.num_nodes=2 trainer.devices=4", "trainer.num_nodes=1 trainer.devices=2"),
                     ("data.num_workers=4", "data.num_workers=0 trainer.accelerator=cpu " + " ".join(
                         f"'{o}'" for o in TINY))]:
        assert old in script, f"docs/distributed.md's sbatch script no longer has {old!r}: update this test"
        script = script.replace(old, new)
    return script


def test_sbatch_of_the_documented_script(slurm, tmp_path):
    write_h5(tmp_path / "images.h5", n=256)
    (tmp_path / "job.sh").write_text(_documented_sbatch_script())
    job = sbatch(tmp_path / "job.sh", tmp_path, 300, "--output=slurm-%j.out")
    runs = list((tmp_path / "outputs" / "hep").iterdir())
    assert [r.name for r in runs] == [f"slurm-{job}"], runs
    out = (tmp_path / f"slurm-{job}.out").read_text()
    assert "GLOBAL_RANK: 0" in out and "GLOBAL_RANK: 1" in out, out[-3000:]  # srun started 2 ranks
    metrics = json.loads((runs[0] / "metrics.json").read_text())
    assert metrics["comm/cross_group_bytes"] > 0  # hybrid with 2 groups of 1 exchanged across groups
    assert len(_metrics_lines(runs[0])) == 1, "metrics must be written by rank 0 only, once"
    assert sorted(p.name for p in (tmp_path / "outputs" / "hep").iterdir()) == [f"slurm-{job}"]


def test_slurm_sweep_lands_in_one_sweep_directory(slurm, tmp_path):
    """Each job of the array is a SLURM job with its own SLURM_JOB_ID; all must use the sweep directory of the
    submitting process (computed once there), with one summary of both jobs."""
    write_h5(tmp_path / "images.h5", n=192)
    result = subprocess.run(
        [sys.executable, "-m", "sciml", "-m", "+plugin=hep", "hydra/launcher=slurm", "hydra.launcher.mem_gb=1",
         "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=5", "data.path=images.h5", *TINY,
         "seed=1,2"], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=360)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    sweeps = [p for p in (tmp_path / "multirun" / "hep").rglob("multirun.yaml")]
    assert len(sweeps) == 1, sweeps
    sweep = sweeps[0].parent
    assert sorted(p.name for p in (tmp_path / "multirun" / "hep").iterdir()) == [sweep.relative_to(
        tmp_path / "multirun" / "hep").parts[0]], "the jobs scattered into several sweep directories"
    rows = _summary(sweep)
    assert [(r["job"], r["status"]) for r in rows] == [("0", "completed"), ("1", "completed")], rows
    assert [r["overrides"].split()[-1] for r in rows] == ["seed=1", "seed=2"]
    for job in ("0", "1"):
        assert (sweep / job / "metrics.json").is_file()
        submitit_logs = list((sweep / ".submitit").glob(f"*_{job}/*_log.out"))
        assert len(submitit_logs) == 1, submitit_logs  # run as a job of the array, on the cluster


def _preemptible_script(tmp_path: Path) -> Path:
    script = tmp_path / "job.sh"
    script.write_text(f"""#!/bin/bash
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=1
#SBATCH --output=slurm-%j.out
#SBATCH --open-mode=append
#SBATCH --time=00:10:00
#SBATCH --requeue
#SBATCH --signal=USR1@120
{ACTIVATE}
export PYTHONPATH={ROOT / "tests"}
srun python -m sciml +plugin=hep data.path=images.h5 {' '.join(f"'{o}'" for o in FAST)} trainer.max_epochs=4 \\
    requeue=true +callbacks.slow._target_=resilience_helpers.SlowBatches +callbacks.slow.seconds=0.25
""")
    return script


def _job_field(job: int, field: str) -> str | None:
    result = subprocess.run(["scontrol", "show", "job", str(job)], capture_output=True, text=True, timeout=30)
    match = re.search(rf"\b{field}=(\S+)", result.stdout)
    return match[1] if match else None


def test_preempted_job_checkpoints_requeues_and_resumes(slurm, tmp_path):
    """SLURM's warning signal (what `#SBATCH --signal=USR1@120` sends 120 s before the time limit; sent here with
    `scancel --signal=USR1` at a known point) makes the run save `last.ckpt` at the next step boundary and, with
    `requeue=true`, requeue itself (docs/resilience.md); the requeued job (same id, same run directory) resumes from
    it and finishes. Then it must end with the metrics of the same job run without interruption."""
    write_h5(tmp_path / "images.h5", n=600)
    script = _preemptible_script(tmp_path)
    submit = ["sbatch", "--parsable", f"--chdir={tmp_path}", str(script)]
    job = int(subprocess.run(submit, capture_output=True, text=True, check=True).stdout.strip())
    reference = int(subprocess.run(submit, capture_output=True, text=True, check=True).stdout.strip())
    run = tmp_path / "outputs" / "hep" / f"slurm-{job}"

    def epochs_logged() -> int:
        csv_file = run / "logs" / "metrics.csv"
        return sum(1 for line in csv_file.read_text().splitlines()[1:] if line.split(",")[0]) if \
            csv_file.is_file() else 0

    def first_epoch_done() -> bool:
        state = _job_field(job, "JobState")
        assert state in ("PENDING", "RUNNING"), f"job {job} is {state}: " + \
            (tmp_path / f"slurm-{job}.out").read_text()[-3000:]
        return epochs_logged() >= 1 and state == "RUNNING"

    # Batches slowed down (0.25 s each, ~3 s an epoch): the signal lands in epoch 2 or 3, not after the fit.
    wait_for(first_epoch_done, 180, "epoch 1 of the job")
    subprocess.run(["scancel", "--signal=USR1", str(job)], check=True, timeout=30)
    wait_for(lambda: _job_field(job, "Restarts") == "1" and _job_field(job, "JobState") == "PENDING", 120,
             "the job to be requeued")
    # SLURM holds a requeued job back for 2 minutes (its begin time); a real queue would start it later anyway. Not
    # in the same second as the requeue, though: slurmd refuses a credential no newer than the revoked one ("Job
    # credential revoked").
    time.sleep(3)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True, timeout=30)
    wait_for(lambda: _job_field(job, "JobState") != "PENDING", 60, "the requeued job to start")
    wait_for(lambda: _job_field(job, "JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 300,
             "the requeued job to finish")
    wait_for(lambda: _job_field(reference, "JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 300,
             "the uninterrupted job to finish")
    out = (tmp_path / f"slurm-{job}.out").read_text()
    assert _job_field(job, "JobState") == "COMPLETED", out[-4000:]
    assert _job_field(reference, "JobState") == "COMPLETED"
    assert re.search(rf"sciml: received SIGUSR1 at epoch \d+ step \d+; checkpoint saved to \S+last\.ckpt; "
                     rf"requeued SLURM job {job}", out), out[-4000:]
    assert re.search(r"Restored all states from the checkpoint at \S+/checkpoints/last\.ckpt", out), out[-4000:]
    assert sorted(p.name for p in run.parent.iterdir()) == sorted([f"slurm-{job}", f"slurm-{reference}"])

    resumed = json.loads((run / "metrics.json").read_text())
    uninterrupted = json.loads((run.parent / f"slurm-{reference}" / "metrics.json").read_text())
    # The signal's checkpoint is mid-epoch: the resumed epoch trains its remaining batches in the uninterrupted
    # order (sciml.data.sampler.EpochLoader), so the metrics are those of the uninterrupted job.
    differing = {k: (resumed[k], uninterrupted.get(k)) for k in resumed
                 if k != "train/samples_per_s" and resumed[k] != pytest.approx(uninterrupted.get(k), abs=1e-6)}
    assert not differing, differing


# ---- Ray -------------------------------------------------------------------------------------------------------------

def _ray_sweep(tmp_path: Path, *overrides: str, timeout: float = 300, wait: bool = True):
    command = [sys.executable, "-m", "sciml", "-m", "+plugin=hep", "hydra/launcher=ray_jobs", *TINY, *overrides]
    if not wait:
        return subprocess.Popen(command, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    return subprocess.run(command, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=timeout)


def test_ray_sweep_against_the_running_cluster(ray_address, tmp_path):
    """Relative paths (the Ray workers start elsewhere), a 2-job sweep with one failing job, one summary."""
    write_h5(tmp_path / "images.h5", n=192)
    result = _ray_sweep(tmp_path, "data.path=images.h5,missing.h5", "hydra.sweep.dir=sweep")
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]  # one job failed
    assert "object_store_memory" not in result.stderr
    # the sweep's one-line error (Ray forwards the workers' output to the same stream, in any order)
    assert "data.path: no such file or folder 'missing.h5'" in result.stderr.splitlines()
    rows = _summary(tmp_path / "sweep")
    assert [(r["job"], r["status"]) for r in rows] == [("0", "completed"), ("1", "failed")], rows
    assert float(rows[0]["test/auc"]) > 0 and "missing.h5" in rows[1]["error"]
    assert (tmp_path / "sweep" / "0" / "metrics.json").is_file()


def test_ray_ddp_job_runs_its_ranks_in_the_task(ray_address, tmp_path):
    """Lightning starts rank 1 by re-running the application; in a Ray worker that is sciml, not Ray's worker."""
    write_h5(tmp_path / "images.h5", n=256)
    result = _ray_sweep(tmp_path, f"data.path={tmp_path / 'images.h5'}", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                        "strategy=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                        "hydra.launcher.ray.remote.num_cpus=2", "seed=1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = tmp_path / "sweep" / "0"
    assert (run / "hep_rank1.log").is_file()  # rank 1 ran this job, in its directory
    assert json.loads((run / "metrics.json").read_text())["comm/intra_group_bytes"] > 0  # gradients all-reduced
    assert len(_metrics_lines(run)) == 1
    assert [r["status"] for r in _summary(tmp_path / "sweep")] == ["completed"]


def test_ray_job_whose_worker_dies_is_recorded(ray_address, tmp_path):
    write_h5(tmp_path / "images.h5", n=192)
    sweep = tmp_path / "sweep"
    proc = _ray_sweep(tmp_path, f"data.path={tmp_path / 'images.h5'}", f"hydra.sweep.dir={sweep}",
                      "trainer.max_epochs=1000", wait=False)
    try:
        wait_for(lambda: (sweep / "0" / "hep.log").is_file(), 120, "the job to start")
        pid = wait_for(lambda: _ray_worker_pid(sweep / "0"), 60, "the job's Ray worker")
        os.kill(pid, 9)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, output[-3000:]
    [row] = _summary(sweep)
    # recorded, and not retried (a retry would train the 1000 epochs from scratch and time out)
    assert row["status"] == "failed" and "WorkerCrashedError" in row["error"], row


def _ray_worker_pid(run_dir: Path) -> int | None:
    """The Ray worker process that runs the job writing `run_dir` (its open files include the job's log)."""
    log = str(run_dir / "hep.log")
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if not (proc / "cmdline").read_bytes().startswith(b"ray::"):
                continue
            if any(os.readlink(fd) == log for fd in (proc / "fd").iterdir()):
                return int(proc.name)
        except OSError:
            continue
    time.sleep(0.5)
    return None
