"""Stopping a fit on a signal without losing it: SIGTERM (SLURM at preemption and time limits, Kubernetes, `kill`),
SIGINT (Ctrl+C) and SLURM's warning signal (`#SBATCH --signal=USR1@120`).

Lightning already does half of this: during a fit its signal connector turns SIGTERM into `received_sigterm`, and
the loops raise `SIGTERMException` at the next step (or epoch, or validation batch) boundary. But that exception is a
`SystemExit` without a code, so the run ended with exit status 0, no message and no checkpoint. `Preemption`
completes it:

* SIGINT and the SLURM signal are routed to the same handler, so all three stop at a step boundary (a second Ctrl+C
  interrupts at once);
* when the fit stops, `checkpoints/last.ckpt` is saved (atomically, sciml.rundir) and one line is printed:
  `sciml: received SIGTERM at epoch E step S; checkpoint saved to PATH`;
* with `requeue=true` inside a SLURM job it runs `scontrol requeue <job>` (as Lightning's SLURMEnvironment
  auto-requeue does; the requeued job has the same job id, hence the same run directory, and resumes);
* `sciml.run.run_job` exits with 128 + the signal number: 143 (SIGTERM), 130 (SIGINT), 138 (SIGUSR1), the codes a
  shell reports for a process killed by that signal, so SLURM and schedulers record the job as not completed.

Lightning's own SLURM SIGUSR1 handler (auto-requeue) saves `hpc_ckpt_N.ckpt` from inside the signal handler, in the
middle of a step; ours replaces it for the fit, and the requeue happens after the step-boundary checkpoint instead.
"""
from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import threading
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.utilities.exceptions import SIGTERMException

from sciml.errors import SciMLError

log = logging.getLogger("sciml")

_received: list[signal.Signals] = []  # signals received by this process during fits, in order


def exit_code() -> int:
    """The exit status for a run stopped by a signal: 128 + its number (143 when unknown)."""
    return 128 + int(_received[0] if _received else signal.SIGTERM)


def _signal(name: str | int, key: str) -> signal.Signals:
    try:
        if isinstance(name, int):
            return signal.Signals(name)
        name = str(name).upper()
        return signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]
    except (KeyError, ValueError):
        raise SciMLError(f"{key}={name}: not a signal name (e.g. SIGUSR1, SIGUSR2, SIGTERM)") from None


class Preemption(pl.Callback):
    """Save `checkpoint` and stop cleanly when the fit receives SIGTERM, SIGINT or `slurm_signal`.

    Args:
        checkpoint: where to save (the run's `checkpoints/last.ckpt`, which a rerun resumes from).
        slurm_signal: the signal SLURM sends before the time limit (`--signal=USR1@SECONDS`), or null.
        requeue: inside a SLURM job, requeue it (`scontrol requeue`) after saving.
    """

    def __init__(self, checkpoint: str, slurm_signal: str | int | None = "SIGUSR1", requeue: bool = False):
        self.checkpoint = Path(checkpoint)
        self.slurm_signal = _signal(slurm_signal, "callbacks.preemption.slurm_signal") if slurm_signal else None
        self.requeue = bool(requeue)
        if self.slurm_signal is not None:
            _note_outside_fits(self.slurm_signal)

    def on_train_start(self, trainer, pl_module):
        # After Lightning's signal connector has installed its SIGTERM handler (Trainer._run), which restores the
        # previous handlers of every signal at teardown, ours included.
        if threading.current_thread() is not threading.main_thread():
            return
        sigterm_handler = signal.getsignal(signal.SIGTERM)

        def handler(signum, frame):
            received = signal.Signals(signum)
            _received.append(received)
            if received == signal.SIGINT:
                signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl+C interrupts at once
            if callable(sigterm_handler):
                sigterm_handler(signum, frame)  # Lightning: received_sigterm, forward to DDP children, broadcast

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)
        if self.slurm_signal is not None:
            signal.signal(self.slurm_signal, handler)

    def on_exception(self, trainer, pl_module, exception):
        if not isinstance(exception, SIGTERMException):
            return
        name = (_received[-1] if _received else signal.SIGTERM).name
        where = f"at epoch {trainer.current_epoch} step {trainer.global_step}"
        if trainer.state.fn != "fit":
            if trainer.is_global_zero:
                print(f"sciml: received {name} while {trainer.state.stage.value if trainer.state.stage else 'running'}"
                      f"; stopped (the trained checkpoints are kept)", flush=True)
            return
        trainer.save_checkpoint(self.checkpoint)  # every rank: it synchronises them
        if not trainer.is_global_zero:
            return
        line = f"sciml: received {name} {where}; checkpoint saved to {self.checkpoint}"
        job = _slurm_job_id()
        if self.requeue and job:
            result = _requeue(job)
            line += f"; requeued SLURM job {job}" if result == 0 else f"; requeuing SLURM job {job} failed ({result})"
        print(line, flush=True)


def _note_outside_fits(signum: signal.Signals) -> None:
    """Outside a fit (reading the data before it, testing, predicting) SLURM's warning signal must not kill the run
    (its default action): it is noted in one line and the run goes on. Installed before the Trainer runs, so that
    Lightning's signal connector, which restores the handlers it found when a fit or test ends, keeps this one
    (and does not add its own mid-step `hpc_ckpt` handler)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signum) not in (signal.SIG_DFL, None):
        return
    rank_zero = (os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0") == "0"

    def note(received, frame):
        if rank_zero:  # os.write: print() is not safe inside a signal handler
            os.write(2, f"sciml: received {signal.Signals(received).name} outside training; the run goes on\n"
                     .encode())

    signal.signal(signum, note)


def _slurm_job_id() -> str | None:
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ.get("SLURM_JOB_ID")
    return job if job and re.fullmatch(r"[0-9_]+", job) else None


def _requeue(job: str) -> int | str:
    try:
        return subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60).returncode
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{type(exc).__name__}: {exc}"


def stopped_by_signal(exc: BaseException) -> bool:
    """Whether `exc` is Lightning's exception for a run stopped by SIGTERM."""
    return isinstance(exc, SIGTERMException)
