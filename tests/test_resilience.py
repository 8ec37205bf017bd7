"""Runs that survive signals, kills, full disks and reruns: sciml.signals, sciml.rundir, sciml.loggers and the
RNGState callback, through the CLI with the hep plugin."""
import csv
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import FAST, ROOT, sciml, write_h5

from sciml import rundir

TESTS = str(ROOT / "tests")
SLOW = ["+callbacks.slow._target_=resilience_helpers.SlowBatches", "+callbacks.slow.seconds=0.05"]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_h5(tmp_path_factory.mktemp("data") / "images.h5", n=384)


def _args(data_file, run_dir, *extra):
    return ["+plugin=hep", f"data.path={data_file}", f"hydra.run.dir={run_dir}", *FAST, *extra]


def _env(**extra):
    return {"PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]), **extra}


def _start(args, env=None):
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or _env())}
    return subprocess.Popen([sys.executable, "-m", "sciml", *args], env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait_for(path: Path, process, timeout=120):
    start = time.time()
    while not path.is_file():
        assert process.poll() is None, process.communicate()[0][-3000:]
        assert time.time() - start < timeout, f"{path} did not appear"
        time.sleep(0.05)


def _val_epochs(run_dir):
    with open(run_dir / "logs" / "metrics.csv") as f:
        return [int(row["epoch"]) for row in csv.DictReader(f) if row.get("val/loss")]


def _one_line(result_text, *fragments):
    assert "Traceback" not in result_text, result_text[-3000:]
    lines = [line for line in result_text.splitlines() if all(f in line for f in fragments)]
    assert len(lines) == 1, result_text[-3000:]
    return lines[0]


# ------------------------------------------------------------------------------------------------------- signals

def test_sigterm_saves_a_checkpoint_exits_143_and_the_rerun_resumes(tmp_path, data_file):
    run_dir = tmp_path / "run"
    logs = ["logger=[csv,tensorboard]"]
    process = _start(_args(data_file, run_dir, "trainer.max_epochs=50", *SLOW, *logs))
    _wait_for(run_dir / "checkpoints" / "last.ckpt", process)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 143, output[-3000:]
    line = _one_line(output, "sciml: received SIGTERM at epoch")
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert line.endswith(f"step {saved['global_step']}; checkpoint saved to {run_dir / 'checkpoints' / 'last.ckpt'}")
    assert saved["global_step"] >= 9, "saved at the step the signal stopped (at the earliest the first epoch end)"

    stopped_epoch = saved["epoch"]
    again = sciml(*_args(data_file, run_dir, f"trainer.max_epochs={stopped_epoch + 2}", *logs))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stdout + again.stderr
    # Logs continue: every epoch's validation once, the ones before the signal included.
    assert _val_epochs(run_dir) == list(range(stopped_epoch + 2))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("val/loss")] == [9 * (e + 1) - 1 for e in range(stopped_epoch + 2)]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGUSR1])
def test_sigint_and_the_slurm_signal_stop_at_a_step_with_a_checkpoint(tmp_path, data_file, sig):
    """SIGUSR1 inside a SLURM job with requeue=true: saved, then `scontrol requeue <job id>` (a stand-in scontrol
    records its arguments)."""
    run_dir, bin_dir = tmp_path / "run", tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'scontrol.args'}\n")
    scontrol.chmod(0o755)
    slurm = {"SLURM_JOB_ID": "4242", "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    requeue = ["requeue=true"] if sig == signal.SIGUSR1 else []
    process = _start(_args(data_file, run_dir, "trainer.max_epochs=50", *SLOW, *requeue), env=_env(**slurm))
    _wait_for(run_dir / "checkpoints" / "last.ckpt", process)
    process.send_signal(sig)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 128 + sig, output[-3000:]
    line = _one_line(output, f"sciml: received {sig.name} at epoch", "checkpoint saved to")
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] >= 9  # signal may land at the epoch end
    if sig == signal.SIGUSR1:
        assert line.endswith("; requeued SLURM job 4242")
        assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "4242"]
    else:
        assert not (tmp_path / "scontrol.args").exists()


def test_the_slurm_signal_outside_a_fit_is_noted_not_fatal(tmp_path, capfd):
    """SLURM sends its warning signal to the job's tasks whenever the time limit nears, also after the fit, while the
    test set is evaluated: its default action would kill the finished run (found in CI: a requeue test's signal
    landed in the test phase, "task 0 died by signal: 10")."""
    from sciml.signals import Preemption

    previous = signal.getsignal(signal.SIGUSR2)
    signal.signal(signal.SIGUSR2, signal.SIG_DFL)
    try:
        Preemption(str(tmp_path / "last.ckpt"), slurm_signal="USR2")
        os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(0.1)  # the handler runs at the next bytecode boundary of the main thread
        assert "sciml: received SIGUSR2 outside training; the run goes on" in capfd.readouterr().err
    finally:
        signal.signal(signal.SIGUSR2, previous)


# ------------------------------------------------------------------------------------------------------- exact resume

def test_a_run_killed_mid_epoch_resumes_to_the_same_metrics(tmp_path, data_file):
    """kill -9 in epoch 3 of 5, rerun: the same metrics as an uninterrupted run (RNGState restores the shuffle)."""
    args = ["trainer.max_epochs=5"]
    whole = sciml(*_args(data_file, tmp_path / "whole", *args))
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed_dir = tmp_path / "killed"
    kill = ["+callbacks.kill._target_=resilience_helpers.KillAt", "+callbacks.kill.epoch=2",
            "+callbacks.kill.batch=4"]
    killed = sciml(*_args(data_file, killed_dir, *args, *kill), env=_env())
    assert killed.returncode == -signal.SIGKILL
    assert torch.load(killed_dir / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == 1
    rerun = sciml(*_args(data_file, killed_dir, *args))
    assert rerun.returncode == 0, rerun.stderr[-3000:]

    expected = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    resumed = json.loads((killed_dir / "metrics.json").read_text())
    assert expected.keys() == resumed.keys()
    for key in expected.keys() - {"train/samples_per_s"}:
        if isinstance(expected[key], float):  # warning/... entries are strings
            assert resumed[key] == pytest.approx(expected[key], abs=1e-6, rel=0), key
    assert _val_epochs(killed_dir) == [0, 1, 2, 3, 4], "the killed epoch's rows are replaced, earlier ones kept"


def test_a_run_preempted_mid_epoch_resumes_to_the_same_metrics(tmp_path, data_file):
    """SIGTERM in the middle of epoch 2 of 4 saves a mid-epoch checkpoint; the rerun trains only that epoch's
    remaining batches, in the uninterrupted order (EpochLoader skips the done ones), and ends with equal metrics."""
    args = ["trainer.max_epochs=4"]
    whole = sciml(*_args(data_file, tmp_path / "whole", *args))
    assert whole.returncode == 0, whole.stderr[-3000:]
    stopped_dir = tmp_path / "stopped"
    stop = ["+callbacks.stop._target_=resilience_helpers.SignalAt", "+callbacks.stop.epoch=1",
            "+callbacks.stop.batch=4"]
    stopped = sciml(*_args(data_file, stopped_dir, *args, *stop), env=_env())
    assert stopped.returncode == 143, stopped.stdout[-3000:]
    saved = torch.load(stopped_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert 9 < saved["global_step"] < 18, "saved in the middle of the second epoch"
    rerun = sciml(*_args(data_file, stopped_dir, *args))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    expected = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    resumed = json.loads((stopped_dir / "metrics.json").read_text())
    for key in expected.keys() - {"train/samples_per_s"}:
        if isinstance(expected[key], float):  # warning/... entries are strings
            assert resumed[key] == pytest.approx(expected[key], abs=1e-6, rel=0), key
    assert torch.load(stopped_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 36


# ------------------------------------------------------------------------------------------------------- full disk

class _FullDisk:
    """A file that takes `room` bytes, then fails like a full disk."""

    def __init__(self, path, room):
        self._file, self._room = open(path, "wb"), room

    def write(self, data):
        if len(data) > self._room:
            self._file.write(bytes(data[:self._room]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= len(data)
        return self._file.write(data)

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._file.close()


def test_a_full_disk_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    io = rundir.checkpoint_io()
    last = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"epoch": 1, "state_dict": {"w": torch.arange(1000.0)}}, last)
    before = last.read_bytes()
    monkeypatch.setattr(rundir, "_open_for_write", lambda path: _FullDisk(path, room=100))
    with pytest.raises(rundir.DiskFull) as error:
        io.save_checkpoint({"epoch": 2, "state_dict": {"w": torch.zeros(1000)}}, last)
    assert str(error.value) == f"{last}: no space left on device while writing it; the previous file is unchanged"
    assert last.read_bytes() == before and torch.load(last)["epoch"] == 1
    assert os.listdir(last.parent) == ["last.ckpt"], "no temporary file is left behind"


@pytest.fixture
def tiny_tmpfs(tmp_path):
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root and mount to make a small tmpfs")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_real_full_disk_is_one_line_and_keeps_last_ckpt(tiny_tmpfs, data_file):
    run_dir = tiny_tmpfs / "run"
    big = ["model.widths=[32,64]", "model.hidden=64"]  # a ~0.5 MB checkpoint
    first = sciml(*_args(data_file, run_dir, "trainer.max_epochs=1", *big))
    assert first.returncode == 0, first.stderr[-3000:]
    last = run_dir / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    stat = os.statvfs(tiny_tmpfs)
    free = stat.f_bavail * stat.f_frsize
    (tiny_tmpfs / "filler").write_bytes(b"\0" * (free - 96 * 1024))  # room for logs, not for a checkpoint
    full = sciml(*_args(data_file, run_dir, "trainer.max_epochs=3", *big))
    assert full.returncode != 0
    _one_line(full.stdout + full.stderr, "no space left on device")
    assert last.read_bytes() == before
    assert torch.load(last, weights_only=False)["epoch"] == 0
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.endswith(".tmp")]


# ------------------------------------------------------------------------------------------------------- resume policy

@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory, data_file):
    run_dir = tmp_path_factory.mktemp("policy") / "run"
    result = sciml(*_args(data_file, run_dir, "trainer.max_epochs=1"))
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_a_changed_config_is_refused_in_one_line(one_epoch_run, data_file):
    before = (one_epoch_run / "checkpoints" / "last.ckpt").read_bytes()
    result = sciml(*_args(data_file, one_epoch_run, "trainer.max_epochs=2", "optimizer.lr=1e9", "seed=7"))
    assert result.returncode == 1
    line = _one_line(result.stdout + result.stderr, "holds a run with another config")
    assert "optimizer.lr: 0.005 -> 1000000000.0; seed: 42 -> 7)" in line and "resume=force" in line
    assert "max_epochs" not in line, "training longer is what a rerun is for"
    assert (one_epoch_run / "checkpoints" / "last.ckpt").read_bytes() == before
    assert "optimizer.lr: 1000000000.0" not in (one_epoch_run / "config.yaml").read_text()
    assert not (one_epoch_run / "error.log").exists(), "a refused rerun leaves the directory as it was"

    never = sciml(*_args(data_file, one_epoch_run, "trainer.max_epochs=2", "resume=never"))
    assert never.returncode == 1
    _one_line(never.stdout + never.stderr, "already has a checkpoint", "resume=never")
    bad = sciml(*_args(data_file, one_epoch_run, "resume=sometimes"))
    _one_line(bad.stdout + bad.stderr, "resume=sometimes: expected one of auto, never, force")


def test_resume_force_continues_with_a_warning(tmp_path, one_epoch_run, data_file):
    run_dir = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(one_epoch_run), str(run_dir)], check=True)
    result = sciml(*_args(data_file, run_dir, "trainer.max_epochs=2", "optimizer.weight_decay=0.02",
                          "resume=force"))
    assert result.returncode == 0, result.stderr[-3000:]
    _one_line(result.stdout + result.stderr, "resume=force", "optimizer.weight_decay: 0.01 -> 0.02")
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == 1


def test_a_directory_in_use_is_refused_in_one_line(tmp_path, data_file):
    run_dir = tmp_path / "busy"
    lock = rundir.RunLock(run_dir)
    lock.acquire()  # this test process plays the run that is using the directory
    try:
        result = sciml(*_args(data_file, run_dir, "trainer.max_epochs=1"))
    finally:
        lock.release()
    assert result.returncode == 1
    _one_line(result.stdout + result.stderr, f"run directory '{run_dir}' is in use by pid {os.getpid()}")
    assert not (run_dir / "config.yaml").exists() and not (run_dir / "error.log").exists()


def test_only_rank_zero_of_a_launch_takes_the_lock(monkeypatch):
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert rundir.is_launch_rank_zero()
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("RANK", "0")
    assert rundir.is_launch_rank_zero()
    for key, value in (("RANK", "1"), ("LOCAL_RANK", "1"), ("SLURM_PROCID", "2"), ("NODE_RANK", "1")):
        monkeypatch.setenv(key, value)
        assert not rundir.is_launch_rank_zero(), key
        monkeypatch.setenv(key, "0")


def test_config_differences_ignore_what_may_change_between_attempts():
    saved = {"seed": 1, "trainer": {"max_epochs": 3, "devices": 1}, "paths": {"output_dir": "a"},
             "model": {"widths": [8, 8]}, "callbacks": {"x": 1}}
    new = {"seed": 1, "trainer": {"max_epochs": 9, "devices": 2}, "paths": {"output_dir": "b"},
           "model": {"widths": [8, 16]}, "resume": "auto", "optimizer": {"lr": 0.1}}
    assert rundir.config_differences(saved, new) == [
        "model.widths: [8, 8] -> [8, 16]", "optimizer.lr: (absent) -> 0.1", "trainer.devices: 1 -> 2"]


# ------------------------------------------------------------------------------------------------------- error.log

def test_an_unexpected_error_is_one_line_and_its_traceback_goes_to_error_log(tmp_path, data_file):
    run_dir = tmp_path / "failing"
    result = sciml(*_args(data_file, run_dir, "+callbacks.fail._target_=resilience_helpers.Fail"), env=_env())
    assert result.returncode == 1
    _one_line(result.stdout + result.stderr, "RuntimeError: injected failure", f"details: {run_dir / 'error.log'}")
    log = (run_dir / "error.log").read_text()
    assert "Traceback (most recent call last)" in log and "resilience_helpers.py" in log
    assert "RuntimeError: injected failure for the error.log test" in log


def test_rng_state_round_trips_every_generator_through_a_weights_only_checkpoint(tmp_path):
    import random

    import numpy as np

    from sciml.callbacks import RNGState

    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    path = tmp_path / "state.pt"
    torch.save(RNGState().state_dict(), path)

    def draws():
        return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]

    expected = draws()
    draws()  # move every generator on
    RNGState().load_state_dict(torch.load(path, weights_only=True))
    assert draws() == expected
