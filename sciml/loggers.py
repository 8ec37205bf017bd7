"""Lightning's CSV and TensorBoard loggers, continued across resumes.

Lightning's CSVLogger deletes an existing `metrics.csv` when it starts, so a resumed run lost the epochs before its
checkpoint. These loggers keep them: before a fit, `sciml.rundir.continue_logs` calls `resume_from_step(step)` with
the global step of the checkpoint the fit starts from, and every row (CSV) or event (TensorBoard) logged at that step
or later by an earlier attempt is dropped, since the fit logs those steps again. Without that call (test-only runs)
existing rows are kept and new ones appended.
"""
from __future__ import annotations

import csv
import io

from pytorch_lightning.loggers import CSVLogger as _CSVLogger
from pytorch_lightning.loggers import TensorBoardLogger as _TensorBoardLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment

from sciml import rundir


class _ContinuedWriter(ExperimentWriter):
    def __init__(self, log_dir: str, keep_before: int | None):
        self._keep_before = keep_before
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:  # called by the base class instead of deleting metrics.csv
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as f:
            reader = csv.DictReader(f)
            rows, keys = list(reader), list(reader.fieldnames or [])
        if self._keep_before is not None:
            rows = [r for r in rows if _step(r) < self._keep_before]
        if not rows:
            self._fs.rm_file(self.metrics_file_path)
            return
        self.metrics_keys = keys  # new keys extend the header (the base class rewrites the file then)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
        rundir.write_text(self.metrics_file_path, buffer.getvalue())


def _step(row: dict) -> float:
    try:
        return float(row.get("step") or 0)
    except ValueError:
        return 0.0


class CSVLogger(_CSVLogger):
    """`pytorch_lightning.loggers.CSVLogger` whose `metrics.csv` continues across resumes."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._resume_step: int | None = None

    def resume_from_step(self, step: int) -> None:
        self._resume_step = step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuedWriter(self.log_dir, self._resume_step)
        return self._experiment  # type: ignore[return-value]  # Lightning types the slot as its private base


class TensorBoardLogger(_TensorBoardLogger):
    """`pytorch_lightning.loggers.TensorBoardLogger` that continues its event files across resumes. TensorBoard
    already merges the event files of one directory; `purge_step` (a SummaryWriter argument) hides the events of
    earlier attempts at and after the resumed step."""

    def resume_from_step(self, step: int) -> None:
        if step > 0 and self._experiment is None:
            self._kwargs["purge_step"] = step  # SummaryWriter keyword arguments, kept by the base class
