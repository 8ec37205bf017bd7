"""The run directory: where a run's files are, how they are written, who may write them, and when a rerun may
continue what is there.

* Paths: `last_checkpoint(out)` (`checkpoints/last.ckpt`, what a rerun resumes from), `config.yaml`, `error.log`,
  `.lock`.
* Atomic writes: `atomic_write` / `write_text` write a temporary file in the target's own directory, flush and fsync
  it, and rename it over the target; `AtomicCheckpointIO` does the same for every Lightning checkpoint. A crash or a
  full disk (ENOSPC, EDQUOT) leaves the previous file whole; a full disk is one line (`DiskFull`).
* The lock: one launch owns a run directory (`fcntl.flock` on `<run>/.lock`, taken by the launch's rank 0 only and
  released when it exits); a second process gets one line naming the holder.
* The resume policy (`resume=auto|never|force`): a rerun into a directory with a checkpoint continues it only when
  the saved `config.yaml` matches the new config, apart from keys that may change between attempts (IGNORED).
* The error log: the full traceback of a failed run goes to `<run>/error.log` while the console keeps one line.

`claim(cfg)` does the lock, the policy and the error log around one run (sciml.run.run_job).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from omegaconf import DictConfig, OmegaConf

from sciml.errors import SciMLError

log = logging.getLogger("sciml")

CONFIG, ERROR_LOG, LOCK = "config.yaml", "error.log", ".lock"
RESUME_POLICIES = ("auto", "never", "force")
# Keys that may change between attempts of one run without making its checkpoint a different experiment: how long
# to train, where files are, what is watched and logged, how data is fed. Prefixes match whole key segments.
IGNORED = ("trainer.max_epochs", "trainer.max_steps", "trainer.min_epochs", "trainer.max_time",
           "trainer.enable_progress_bar", "trainer.enable_model_summary", "trainer.log_every_n_steps",
           "paths", "callbacks", "logger", "resume", "requeue", "ckpt_path", "train", "objective", "objective_mode",
           "data.num_workers", "data.max_memory_gb", "data.shuffle_buffer_mb",
           "model.input_shape")  # filled from the data when a run starts; a changed network is caught by its shapes
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFull(SciMLError):
    """A write failed for lack of space or quota; the previous version of the file is unchanged."""


def last_checkpoint(out: Path) -> Path:
    """The run's last checkpoint (present or not)."""
    return Path(out) / "checkpoints" / "last.ckpt"


# ---------------------------------------------------------------------------------------------------- atomic writes

def _open_for_write(path: Path) -> IO[bytes]:
    return open(path, "wb")  # a module function so that tests can inject a full disk


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Call `write(file)` on a temporary file beside `path`, fsync it and rename it to `path`.

    The temporary file is in the same directory, so the rename never crosses file systems and is atomic: readers
    and a resuming run see the old file or the new one, never a part. On any failure the temporary file is removed
    and `path` is left as it was; ENOSPC/EDQUOT become a one-line `DiskFull`.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with _open_for_write(tmp) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        full = _disk_full(exc)
        if full:
            kept = "the previous file is unchanged" if path.exists() else "nothing was written"
            raise DiskFull(f"{path}: {os.strerror(full).lower()} while writing it; {kept}") from None
        raise
    _fsync_dir(path.parent)  # makes the rename itself durable


def _disk_full(exc: BaseException | None) -> int | None:
    """ENOSPC/EDQUOT anywhere in the exception chain: torch.save reports a failed write as a RuntimeError of its
    zip writer, with the OSError as its context."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
            return exc.errno
        exc = exc.__cause__ or exc.__context__
    return None


def write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` atomically (see `atomic_write`)."""
    atomic_write(path, lambda f: f.write(text.encode()))


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # some file systems cannot fsync a directory; the rename is still atomic
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _checkpoint_io_class():
    from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
    from lightning_fabric.utilities.cloud_io import _is_local_file_protocol

    class AtomicCheckpointIO(TorchCheckpointIO):
        """Lightning's torch checkpoint IO, written atomically (`atomic_write`): a kill or a full disk while
        `last.ckpt` is written leaves the previous `last.ckpt` loadable. Remote paths (fsspec URLs) keep
        Lightning's own writer."""

        def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
            if storage_options is not None or not _is_local_file_protocol(path):
                return super().save_checkpoint(checkpoint, path, storage_options)
            import torch

            Path(path).parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda f: torch.save(checkpoint, f))

    return AtomicCheckpointIO


def checkpoint_io():
    """The CheckpointIO plugin every sciml Trainer gets (`plugins=[rundir.checkpoint_io()]`)."""
    return _checkpoint_io_class()()


# ---------------------------------------------------------------------------------------------------- lock

def is_launch_rank_zero() -> bool:
    """Whether this process is rank 0 of its launch, from the launchers' environment, before any Trainer exists:
    torchrun sets RANK, srun SLURM_PROCID, Lightning's own DDP launcher LOCAL_RANK (and NODE_RANK) in the ranks it
    starts. Ranks > 0 share rank 0's run directory and must not take its lock."""
    return all(os.environ.get(k, "0") == "0" for k in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"))


class RunLock:
    """An exclusive, non-blocking `flock` on `<run>/.lock`, held while the run lives. The kernel releases it when the
    process ends, however it ends (kill -9 included), so a stale lock cannot block a rerun."""

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                f.close()
                raise
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise SciMLError(f"run directory '{self.path.parent}' is in use by {holder}: wait for that run to end "
                             "or choose another hydra.run.dir") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


# ---------------------------------------------------------------------------------------------------- resume policy

def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        flat: dict[str, Any] = {}
        for key, value in node.items():
            flat |= _flatten(value, f"{prefix}{key}.")
        return flat if flat or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: node}


def _ignored(key: str) -> bool:
    return any(key == p or key.startswith(p + ".") for p in IGNORED)


def config_differences(saved: dict, new: dict) -> list[str]:
    """`key: saved -> new` for every leaf that differs, apart from IGNORED keys."""
    old, now = _flatten(saved), _flatten(new)
    missing = "(absent)"
    return [f"{k}: {old.get(k, missing)} -> {now.get(k, missing)}" for k in sorted(old.keys() | now.keys())
            if not _ignored(k) and old.get(k, missing) != now.get(k, missing)]


def check_resume(cfg: DictConfig, out: Path) -> None:
    """Apply `cfg.resume` to a run directory that already holds `checkpoints/last.ckpt` (NeMo's exp_manager
    `resume_if_exists` is the model; `auto` is its `resume_if_exists=True` with a config check):

    * auto:  continue when the saved config.yaml matches the new config (IGNORED keys apart); otherwise stop with
             one line naming the differing keys;
    * never: stop if the directory has a checkpoint (a run is never continued; use a new directory);
    * force: continue despite differences, with a warning naming them. The checkpoint's optimizer, scheduler and
             loop state win over changed values of those keys.

    Runs that do not resume from the directory (train=false, or an explicit ckpt_path) are not affected.
    """
    policy = cfg.get("resume", "auto")
    if policy not in RESUME_POLICIES:
        raise SciMLError(f"resume={policy}: expected one of {', '.join(RESUME_POLICIES)}")
    last = last_checkpoint(out)
    if not cfg.get("train", True) or cfg.get("ckpt_path") or not last.is_file():
        return
    if policy == "never":
        raise SciMLError(f"run directory '{out}' already has a checkpoint ({last}) and resume=never: "
                         "choose another hydra.run.dir, or resume=auto to continue it")
    saved_file = out / CONFIG
    if not saved_file.is_file():
        log.warning("run directory '%s' has a checkpoint but no %s to compare with: resuming", out, CONFIG)
        return
    try:
        saved = OmegaConf.to_container(OmegaConf.load(saved_file), resolve=False)
    except Exception as exc:
        raise SciMLError(f"{saved_file}: not readable YAML ({type(exc).__name__}: {exc})") from None
    differences = config_differences(saved, OmegaConf.to_container(cfg, resolve=True))
    if not differences:
        return
    shown = "; ".join(differences[:5]) + (f"; and {len(differences) - 5} more" if len(differences) > 5 else "")
    if policy == "auto":
        raise SciMLError(f"run directory '{out}' holds a run with another config ({shown}): rerun with its values, "
                         "choose another hydra.run.dir, or resume=force to continue it anyway")
    log.warning("resume=force: continuing '%s' although the config changed (%s); the checkpoint's optimizer and "
                "scheduler state are kept", out, shown)


# ---------------------------------------------------------------------------------------------------- error log

def write_error_log(out: Path, exc: BaseException) -> Path | None:
    """The full traceback of a failed run in `<run>/error.log` (ranks > 0: `error.rank<N>.log`). Best effort: a
    full disk must not hide the original error."""
    rank = next((os.environ[k] for k in ("RANK", "SLURM_PROCID", "LOCAL_RANK") if os.environ.get(k, "0") != "0"),
                None)
    path = Path(out) / (ERROR_LOG if rank is None else f"error.rank{rank}.log")
    text = (f"{time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()} on {socket.gethostname()}\n"
            f"command: {' '.join(sys.argv)}\n\n" + "".join(traceback.format_exception(exc)))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, text)
    except (OSError, SciMLError):
        return None
    return path


# ---------------------------------------------------------------------------------------------------- one run

@contextlib.contextmanager
def claim(cfg: DictConfig) -> Iterator[Path]:
    """Own the run directory for one run: take the lock (launch rank 0), apply the resume policy, and on failure
    write the traceback to error.log (its path is set as the exception's `error_log` attribute)."""
    out = Path(cfg.paths.output_dir)
    lock = RunLock(out) if is_launch_rank_zero() else None
    if lock:
        lock.acquire()  # a directory in use raises here, before anything of ours is written into it
    try:
        check_resume(cfg, out)  # a refused rerun leaves the directory as it was (no error.log)
        try:
            yield out
        except Exception as exc:
            path = write_error_log(out, exc)
            with contextlib.suppress(AttributeError):
                exc.error_log = path
            raise
    finally:
        if lock:
            lock.release()


def continue_logs(trainer, resume: str | None) -> None:
    """Tell the loggers that can continue across resumes (sciml.loggers) from which step this fit goes on: rows
    of earlier attempts before that step are kept, later ones (an interrupted epoch) are dropped. A fresh fit
    (`resume` None) starts from step 0, i.e. clean logs."""
    step = 0
    if resume:
        import torch

        step = int(torch.load(resume, map_location="cpu", mmap=True, weights_only=False).get("global_step", 0))
    for logger in trainer.loggers:
        if hasattr(logger, "resume_from_step"):
            logger.resume_from_step(step)
