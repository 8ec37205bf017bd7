"""Hydra callback: one table of every multirun job's status, overrides and metrics (summary.csv, summary.md).

Each job leaves `job_status.json` in its own directory; the table is rebuilt from those files after every job and
at the end of the sweep, so it also exists when a job fails (Hydra raises before `on_multirun_end` then) and with
launchers that run jobs in other processes.
"""
from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

log = logging.getLogger(__name__)


class SweepSummary(Callback):
    """Hydra callback: summary.csv and summary.md of a multirun, rewritten after every job."""
    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        failed = job_return.status == JobStatus.FAILED
        status = {
            "job": config.hydra.job.num,
            "status": "failed" if failed else "completed",
            "overrides": " ".join(job_return.overrides or []),
            "error": " ".join(str(job_return._return_value).split()) if failed else "",
        }
        _write_atomic(Path(config.hydra.runtime.output_dir) / "job_status.json", json.dumps(status, indent=2))
        write_summary(Path(config.hydra.sweep.dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        path = write_summary(Path(config.hydra.sweep.dir))
        if path:
            log.info("sweep summary: %s", path)


def record_failed_job(sweep_dir: Path, job_dir: Path, job: int, overrides: list[str], error: str) -> None:
    """Record a job that ended before its own `on_job_end` could (e.g. a Ray worker that died), and rewrite the
    summary."""
    job_dir.mkdir(parents=True, exist_ok=True)
    status = {"job": job, "status": "failed", "overrides": " ".join(overrides), "error": " ".join(error.split())}
    _write_atomic(job_dir / "job_status.json", json.dumps(status, indent=2))
    write_summary(sweep_dir)


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job of a sweep folder: its status file and metrics.json merged."""
    rows = []
    for status_file in sweep_dir.glob("*/job_status.json"):
        row = json.loads(status_file.read_text())
        metrics_file = status_file.parent / "metrics.json"
        if metrics_file.is_file():
            row.update(json.loads(metrics_file.read_text()))
        row["dir"] = status_file.parent.name
        rows.append(row)
    return sorted(rows, key=lambda r: int(r["job"]))


def write_summary(sweep_dir: Path) -> Path | None:
    """summary.csv and summary.md in `sweep_dir`; returns the markdown file, None without jobs."""
    rows = collect(sweep_dir)
    if not rows:
        return None
    fixed = ["job", "status", "overrides"]
    metrics = sorted({k for r in rows for k in r} - set(fixed) - {"error", "dir"})
    columns = fixed + metrics + ["error"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    _write_atomic(sweep_dir / "summary.csv", buffer.getvalue())

    def cell(value):
        return f"{value:.4g}" if isinstance(value, float) else str(value if value is not None else "")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")).replace("|", "\\|") for c in columns) + " |" for r in rows]
    _write_atomic(sweep_dir / "summary.md", "\n".join(lines) + "\n")
    return sweep_dir / "summary.md"


def _write_atomic(path: Path, text: str) -> None:
    from sciml.rundir import write_text  # temporary file in the same directory, fsync, rename

    write_text(path, text)
