"""Launching DDP ranks from a Hydra application, in single runs and in multirun sweeps.

Lightning's `ddp` launcher (`_SubprocessScriptLauncher`, used by `strategy=ddp` and `strategy=hybrid` alike) starts
ranks 1..N-1 of each node by re-running the command line. Under Hydra it builds that command with
`_hydra_subprocess_cmd`: `sys.argv` plus `hydra.run.dir=...`. Under `-m` that command still holds `-m` and the sweep,
so every child re-runs the whole sweep in new sweep directories (Lightning #11300, hydra #2070).

`install()` (called once, when `sciml.distributed` is imported) replaces the two module-level references that
`pytorch_lightning.strategies.launchers.subprocess_script` calls:

* `_hydra_subprocess_cmd` -> `hydra_subprocess_cmd`: the child runs *this job* only, in Hydra's RUN mode: the job's
  own overrides (`hydra.overrides.task`), its output directory as `hydra.run.dir`, no `.hydra/` of its own
  (`hydra.output_subdir=null`) and a per-rank `hydra.job.name` (its log file, `<name>_rank<L>.log`).
* `_launch_process_observer` -> one whose watchdog thread ends with the job (`job_scope`). Lightning's watchdog
  kills the launching process when a child exits non-zero; in a sweep the launching process is the sweep, and a
  job whose ranks failed together (e.g. a diverging learning rate) must not take the rest of the sweep down.

`job_scope(trainer)` wraps one job in the launching process: at its end it waits for the job's child ranks, destroys
the process group and restores the environment variables Lightning set for the launch (`LOCAL_RANK` among them,
which would otherwise make the next job's Lightning believe its processes were started externally), leaving out
`MASTER_PORT`, so that the next job of a sweep launches its own ranks afresh on a new port.

Ranks started by torchrun or srun are not launched by Lightning and need none of this: every rank runs Hydra itself,
in the run directory they agree on (see `conf/hydra/default.yaml` and docs/distributed.md).
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from lightning_fabric.strategies.launchers.subprocess_script import _ChildProcessObserver

log = logging.getLogger(__name__)

# Set by Lightning's launcher in the launching process before it starts the children.
LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
# Hydra overrides that belong to the sweep or to the launching process, not to one rank of one job.
_NOT_FORWARDED = ("hydra.mode", "hydra.run", "hydra.sweep", "hydra.sweeper", "hydra/sweeper", "hydra.launcher",
                  "hydra/launcher", "hydra.output_subdir", "hydra.job.name")
# Command-line flags that change which config is composed.
_CONFIG_FLAGS = {"config_path": "--config-path", "config_name": "--config-name", "config_dir": "--config-dir"}
_CHILD_EXIT_TIMEOUT_S = 120.0  # after a successful job: the children only exit
_FAILED_JOB_GRACE_S = 10.0

_observers: list[_JobObserver] = []  # watchdogs of the current job's children
# The command that starts the application, when this process's own `sys.argv` is not it: a job that runs in a Ray
# worker has Ray's worker script as `__main__`. Set by the launcher that runs the job (sciml.launchers.ray_jobs).
_app_command: list[str] | None = None


def app_command() -> list[str]:
    """The interpreter, the application (`-m module` or script) and the config flags of this process's command line,
    without the overrides: what a child rank of a job runs."""
    from hydra.utils import to_absolute_path

    import __main__

    if _app_command is not None:
        return list(_app_command)
    if __main__.__spec__ is None:  # started as `python script.py`
        command = [sys.executable, to_absolute_path(sys.argv[0])]
    else:
        command = [sys.executable, "-m", __main__.__spec__.name]
    return command + _config_flags(sys.argv[1:])


@contextmanager
def app_command_set(command: Sequence[str]) -> Iterator[None]:
    """Child ranks started inside this block run `command` (see `app_command`)."""
    global _app_command
    saved, _app_command = _app_command, list(command)
    try:
        yield
    finally:
        _app_command = saved


def hydra_subprocess_cmd(local_rank: int) -> tuple[Sequence[str], str]:
    """The command and working directory of local rank `local_rank` of the running Hydra job (replaces Lightning's
    `_hydra_subprocess_cmd`, same signature)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd

    hydra_cfg = HydraConfig.get()
    command = app_command()
    command += [o for o in hydra_cfg.overrides.hydra if not _override_key(o).startswith(_NOT_FORWARDED)]
    command += list(hydra_cfg.overrides.task)
    node = int(os.environ.get("NODE_RANK", 0))
    prefix = f"node{node}_" if node else ""  # other nodes: distinct log names in a shared run directory
    name = f"{hydra_cfg.job.name}_{prefix}rank{local_rank}"
    command += [f'hydra.run.dir="{hydra_cfg.runtime.output_dir}"',  # quoted, as Lightning does
                "hydra.output_subdir=null", f"hydra.job.name={name}"]
    return command, get_original_cwd()


def _config_flags(argv: list[str]) -> list[str]:
    from hydra._internal.utils import get_args_parser

    args, _ = get_args_parser().parse_known_args(argv)
    flags = []
    for attribute, flag in _CONFIG_FLAGS.items():
        value = getattr(args, attribute, None)
        if value is not None:
            flags += [flag, value]
    return flags


def _override_key(override: str) -> str:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_override(override).key_or_group


class _JobObserver(_ChildProcessObserver):
    """Lightning's watchdog of the child ranks (it kills every process when a child exits non-zero), for one job:
    after `stop()` returns it never kills anything."""

    def __init__(self, main_pid: int, child_processes: list[subprocess.Popen]):
        super().__init__(main_pid=main_pid, child_processes=child_processes)
        self._lock, self._stopped = threading.Lock(), False

    def _run(self) -> bool:
        with self._lock:
            return self._stopped or super()._run()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True


def _launch_process_observer(child_processes: list[subprocess.Popen]) -> None:
    observer = _JobObserver(main_pid=os.getpid(), child_processes=child_processes)
    _observers.append(observer)
    observer.start()


@contextmanager
def job_scope(trainer) -> Iterator[None]:
    """One job of the launching process: on exit, wait for the child ranks Lightning started, tear the process group
    down and restore the launch environment, so that the next job of a sweep starts clean."""
    saved = {key: os.environ.get(key) for key in LAUNCH_ENV}
    failed = True
    try:
        yield
        failed = False
    finally:
        # After a failure of this rank the children cannot finish the job (they may wait in a collective for it):
        # a short grace to exit on their own, e.g. when they failed alike, then they are killed.
        _finish_job(trainer, saved, timeout=_FAILED_JOB_GRACE_S if failed else _CHILD_EXIT_TIMEOUT_S)


def _finish_job(trainer, saved_env: dict[str, str | None], timeout: float) -> None:
    import torch.distributed as dist

    while _observers:
        _observers.pop().stop()
    procs = getattr(trainer.strategy.launcher, "procs", None) or []
    for proc in procs:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.warning("rank process %d did not exit within %.0f s; killing it", proc.pid, timeout)
            proc.kill()
            proc.wait()
            continue
        if proc.returncode:
            log.warning("rank process %d exited with code %d", proc.pid, proc.returncode)
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for key, value in saved_env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    if procs:
        # This process hosted the job's TCPStore on MASTER_PORT. torch keeps such servers per port for reuse while
        # anything still references the job's process group, so a next job on the same port could read this job's
        # keys (stale rank addresses: connection refused or a hang). The next job picks a free port instead, also
        # when the first took MASTER_PORT from the environment.
        os.environ.pop("MASTER_PORT", None)


def install() -> None:
    """Point Lightning's subprocess launcher at this module's child command and job-scoped watchdog."""
    from pytorch_lightning.strategies.launchers import subprocess_script

    subprocess_script._hydra_subprocess_cmd = hydra_subprocess_cmd
    subprocess_script._launch_process_observer = _launch_process_observer
