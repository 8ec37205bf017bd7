"""What every task shares: the network, optimizer and schedule from config, an input-shape check, run paths, and one
evaluation lifecycle.

Batches are dicts: `x` (inputs), `y` (targets, absent in files that are predicted, not scored), optionally `w`
(per-sample weights) and `index` (the row, for the prediction writer).

The evaluation lifecycle, the same for every task; a task or plugin overrides these public hooks and nothing else:

    configure_metrics(stage) -> dict[str, Metric]   once per stage ('val', 'test'); kept in self.metrics[stage],
                                                    with a 'loss' MeanMetric added when the task defines none
    evaluate_batch(batch, stage)                    updates self.metrics[stage] with one batch
    epoch_metrics(stage) -> dict[str, Tensor]       the stage's values: every metric computed, dict results
                                                    flattened; {} when nothing was evaluated (unlabelled data)
    log_epoch(stage)                                logs them as '<stage>/<name>'; non-finite values are not logged
                                                    but recorded in `metric_warnings`
    test_report()                                   plots, files and intervals at the end of the test epoch

`validation_step` / `test_step` call `evaluate_batch`; `on_validation_epoch_end` / `on_test_epoch_end` call
`log_epoch` (and `test_report`), then reset every metric of the stage.

Degenerate data (docs/architecture.md, "Degenerate data"): an empty validation or test split, or a metric that
raises `DegenerateDataError` (e.g. ROC metrics on one class), ends the run with one line naming the split and its
files; a metric that is undefined for some part of the data (NaN) is left out of the logs and a warning entry
(`warning/<stage>/<name>`) names it in metrics.json.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torchmetrics import MeanMetric, Metric

from sciml.errors import DegenerateDataError, SciMLError
from sciml.optim.factory import build_optimizer, build_scheduler

log = logging.getLogger(__name__)

STAGES = ("val", "test")
SPLIT_NAMES = {"val": "validation", "test": "test"}


class SciMLTask(pl.LightningModule):
    """Base of the generic tasks.

    Args:
        model: the network (an nn.Module from the plugin's `model` config).
        optimizer, scheduler: the `optimizer` and `scheduler` config groups.
        bootstrap: number of bootstrap resamples for the confidence intervals of the test metrics (0: none).
        bootstrap_seed: seed of the resampling (intervals are reproducible).
        confidence: the intervals' confidence level.
    """

    def __init__(self, model: torch.nn.Module, optimizer: DictConfig | None = None,
                 scheduler: DictConfig | None = None, bootstrap: int = 0, bootstrap_seed: int = 0,
                 confidence: float = 0.95):
        super().__init__()
        # Checkpoints carry the task's settings (every subclass's __init__ arguments); the network is saved as
        # weights, not as a hyperparameter.
        self.save_hyperparameters(ignore=["model"])
        # As plain containers: Lightning loads checkpoints with torch.load(weights_only=True), which refuses
        # OmegaConf objects.
        for hparams in (self._hparams, self._hparams_initial):
            for key, value in hparams.items():
                if isinstance(value, (DictConfig, ListConfig)):
                    hparams[key] = OmegaConf.to_container(value, resolve=True)
        if bootstrap < 0:
            raise SciMLError(f"task.bootstrap must be >= 0 (resamples; 0: no intervals), got {bootstrap}")
        if not 0 < confidence < 1:
            raise SciMLError(f"task.confidence must be between 0 and 1, got {confidence}")
        self.model = model
        self.optimizer_cfg = optimizer
        self.scheduler_cfg = scheduler
        self.bootstrap, self.bootstrap_seed, self.confidence = int(bootstrap), int(bootstrap_seed), confidence
        # warning/<stage>/<name> -> why a value is missing or weak; run.py writes them into metrics.json
        self.metric_warnings: dict[str, str] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    # -- metrics: built once per stage, on first use -------------------------------------------------------------------
    def configure_metrics(self, stage: str) -> Mapping[str, Metric]:
        """The metrics of one stage ('val' or 'test') by name. A metric whose `compute` returns a dict contributes
        each entry under the entry's name. Override in tasks; the default has the loss only."""
        return {}

    @property
    def metrics(self) -> torch.nn.ModuleDict:
        """stage -> ModuleDict of that stage's metrics. Built lazily so that subclasses may set the attributes
        `configure_metrics` reads after calling `super().__init__`; `setup` builds it before the module moves to
        its device."""
        if "stage_metrics" not in self._modules:
            stages = {}
            for stage in STAGES:
                metrics = dict(self.configure_metrics(stage))
                metrics.setdefault("loss", MeanMetric())
                stages[stage] = torch.nn.ModuleDict(metrics)
            self.add_module("stage_metrics", torch.nn.ModuleDict(stages).to(self.device))
        return self._modules["stage_metrics"]

    def evaluate_batch(self, batch: Mapping[str, Any], stage: str) -> Any:
        """Update `self.metrics[stage]` with one batch. Tasks override it."""
        raise NotImplementedError(f"{type(self).__name__} does not implement evaluate_batch")

    def evaluated(self, stage: str) -> bool:
        """Whether any batch of the stage was scored since the last reset (unlabelled data is not)."""
        return any(m.update_called for m in self.metrics[stage].values())

    def epoch_metrics(self, stage: str) -> dict[str, torch.Tensor]:
        """Every metric of the stage computed (dict results flattened); {} when nothing was evaluated."""
        if not self.evaluated(stage):
            return {}
        values: dict[str, torch.Tensor] = {}
        for name, metric in self.metrics[stage].items():
            if not metric.update_called:
                continue
            try:
                value = metric.compute()
            except DegenerateDataError as exc:
                raise DegenerateDataError(f"{self.split_description(stage)}: {exc}") from None
            if isinstance(value, Mapping):
                values.update({k: torch.as_tensor(v) for k, v in value.items()})
            else:
                values[name] = torch.as_tensor(value)
        return values

    def split_description(self, stage: str) -> str:
        """'the test split of /data/x.h5' — the datamodule's files when it says which (attribute `split_files`,
        a mapping stage -> list of paths, or `test_path` / `path`)."""
        text = f"the {SPLIT_NAMES.get(stage, stage)} split"
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer else None
        files = getattr(datamodule, "split_files", None)
        if isinstance(files, Mapping):
            files = files.get(stage)
        elif stage == "test" and getattr(datamodule, "test_path", None):
            files = datamodule.test_path
        else:
            files = getattr(datamodule, "path", None)
        if isinstance(files, (str, Path)):
            files = [files]
        if files:
            files = [str(f) for f in files]
            text += " of " + ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
        return text

    def log_epoch(self, stage: str) -> dict[str, float]:
        """Log the stage's epoch metrics as '<stage>/<name>'. Non-finite values are not logged: a warning entry
        names them. Returns the logged values."""
        try:
            values = self.epoch_metrics(stage)
        except DegenerateDataError:
            if self._sanity_check_is_partial():
                log.info("sanity check: metrics not computed on its first batches only (one class)")
                return {}
            raise
        logged = {}
        for name, value in values.items():
            if value.numel() != 1:  # per-class vectors: the task names each entry in epoch_metrics
                continue
            value = float(value)
            if math.isfinite(value):
                logged[f"{stage}/{name}"] = value
            elif not self._sanity_checking():
                self.warn(f"{stage}/{name}", f"{value} (undefined on {self.split_description(stage)}: "
                                             f"{self.undefined_reason(stage, name)})")
        if logged:
            self.log_dict(logged, prog_bar=stage == "val")
        return logged

    def undefined_reason(self, stage: str, name: str) -> str:
        """Why metric `name` is NaN on a stage (tasks override it with their domain's reasons)."""
        return "no defined value in the evaluated sample"

    def warn(self, key: str, message: str) -> None:
        """Record a warning for metrics.json (`warning/<key>`) and the log (once per key)."""
        full = f"warning/{key}"
        if self.metric_warnings.get(full) != message:
            log.warning("%s: %s", key, message)
        self.metric_warnings[full] = message

    def reset_metrics(self, stage: str) -> None:
        for metric in self.metrics[stage].values():
            metric.reset()

    def test_report(self) -> None:
        """Plots, per-case files and confidence intervals at the end of the test epoch, before the metrics are
        reset. Every rank calls it (metric states are gathered collectively); only rank 0 should write."""

    # -- the Lightning hooks that run the lifecycle --------------------------------------------------------------------
    def validation_step(self, batch, batch_idx):
        self.evaluate_batch(batch, "val")

    def test_step(self, batch, batch_idx):
        self.evaluate_batch(batch, "test")

    def on_validation_epoch_end(self):
        self.log_epoch("val")
        self.reset_metrics("val")

    def on_test_epoch_end(self):
        if self.log_epoch("test"):
            self.test_report()
        self.reset_metrics("test")

    def _sanity_checking(self) -> bool:
        return bool(self._trainer and self.trainer.sanity_checking)

    def _sanity_check_is_partial(self) -> bool:
        """During Lightning's sanity check: did it see only part of the validation split? Degenerate data is then
        judged on the whole split at the first real validation."""
        if not self._sanity_checking():
            return False
        try:
            total = sum(len(d) for d in _as_list(self.trainer.val_dataloaders))
        except TypeError:  # iterable datasets have no length
            return True
        return sum(self.trainer.num_sanity_val_batches) < total

    # -- set-up --------------------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Fail early, in words, when the network does not fit the data's declared input shape or a split that
        will be evaluated is empty."""
        self.metrics  # noqa: B018 -- built here, before Lightning moves the module to its device
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
        if datamodule is not None:
            self._check_split_not_empty(datamodule, stage)
        shape = getattr(datamodule, "input_shape", None)
        if shape is None:
            return
        try:
            with torch.no_grad():
                was_training = self.model.training
                self.model.eval()
                self.model(torch.zeros(2, *shape))
                self.model.train(was_training)
        except RuntimeError as exc:
            raise SciMLError(f"model {type(self.model).__name__} does not accept the data's input shape "
                             f"{tuple(shape)}: {str(exc).splitlines()[0]}") from None

    def _check_split_not_empty(self, datamodule, stage: str) -> None:
        checks = {"fit": ("val", "val_dataloader", self.trainer.limit_val_batches),
                  "validate": ("val", "val_dataloader", self.trainer.limit_val_batches),
                  "test": ("test", "test_dataloader", self.trainer.limit_test_batches)}
        if stage not in checks:
            return
        split, method, limit = checks[stage]
        if not limit or not callable(getattr(datamodule, method, None)):
            return
        try:
            sizes = [len(loader.dataset) for loader in _as_list(getattr(datamodule, method)())]
        except (TypeError, AttributeError, NotImplementedError):  # iterable datasets: no length to check
            return
        total = sum(sizes)
        if self.trainer.world_size > 1:  # shards: the split is empty when every rank's part is
            strategy = self.trainer.strategy
            total = int(strategy.reduce(torch.tensor(float(total), device=strategy.root_device), reduce_op="sum"))
        if total == 0:
            raise DegenerateDataError(f"{self.split_description(split)} is empty: no {SPLIT_NAMES[split]} metrics "
                                      "could be computed; give it data (e.g. more files, or a larger data.*_fraction)"
                                      + (" or set trainer.limit_val_batches=0" if split == "val" else ""))

    def log_train_loss(self, loss: torch.Tensor, batch_size: int) -> None:
        """`train/loss` per step and per epoch. In the progress bar only on CPU: a per-step progress-bar value is
        read on the host after every step (Lightning's `convert_tensors_to_scalars`), a synchronisation that stalls
        an accelerator's queue; on CPU the read costs nothing."""
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=self.device.type == "cpu",
                 batch_size=batch_size)

    @staticmethod
    def to_host(outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Predict-step outputs on the host; floating point as float32, since the bf16/fp16 outputs of mixed
        precision have no numpy type (prediction writers use numpy)."""
        return {k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu() for k, v in outputs.items()}

    @property
    def global_batch_size(self) -> int:
        per_device = getattr(self.trainer.datamodule, "batch_size", None)
        if per_device is None:
            raise SciMLError("the datamodule must expose `batch_size` (per device) for the LR scaling rule")
        return int(per_device) * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def configure_optimizers(self):
        if self.optimizer_cfg is None:
            raise SciMLError("no optimizer configured")
        optimizer = build_optimizer(self.optimizer_cfg, self.model, self.global_batch_size)
        total = self.trainer.estimated_stepping_batches  # also sets up the train dataloader
        batches = self.trainer.num_training_batches
        per_epoch = math.ceil(batches / self.trainer.accumulate_grad_batches) if math.isfinite(batches) else total
        scheduler = build_scheduler(self.scheduler_cfg or {}, optimizer, total, max(int(per_epoch), 1))
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @property
    def plots_dir(self) -> Path:
        path = Path(self.trainer.default_root_dir) / "plots"
        path.mkdir(parents=True, exist_ok=True)
        return path


def _as_list(loaders) -> list:
    if loaders is None:
        return []
    if isinstance(loaders, (list, tuple)):
        return list(loaders)
    if isinstance(loaders, Mapping):
        return list(loaders.values())
    return [loaders]
