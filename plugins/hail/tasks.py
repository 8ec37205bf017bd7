"""The generic tasks with forecast verification added: the event is "severe hail" (size >= threshold).

Classification verifies the predicted probability of the event. Regression predicts a Gaussian hail size (mean and
standard deviation) and verifies the exceedance probability P(size >= threshold) the same way, next to MAE and RMSE.
The Brier skill score's reference is climatology: the event frequency of the training days, which the data module
measures and keeps in checkpoints (`climatology`). With `bootstrap` > 0 the AUC, Brier score and BSS get confidence
intervals from resampled storms. Both tasks use the core's public hooks only.
"""
from __future__ import annotations

import logging

import torch

from sciml.errors import SciMLError
from sciml.tasks import ClassificationTask, RegressionTask
from sciml_plugins.hail.verification import ForecastVerification, plot_all

log = logging.getLogger(__name__)


class _Verification:
    """Shared by both tasks: the training climatology, the intervals and the diagrams."""

    event = "severe hail"

    def climatology(self) -> float | None:
        value = getattr(self.trainer.datamodule, "climatology", None) if self._trainer else None
        if value is None:
            log.warning("no training climatology known: the Brier skill score uses the evaluated sample's frequency")
        return value

    def verify(self, metric: ForecastVerification) -> None:
        """Intervals (logged as test/<score>_ci_low/high) and the diagrams of a test epoch (every rank calls it)."""
        ci = metric.bootstrap(self.bootstrap, self.bootstrap_seed, self.confidence) if self.bootstrap else {}
        for name, (low, high) in ci.items():
            if low == low and high == high:
                self.log_dict({f"test/{name}_ci_low": low, f"test/{name}_ci_high": high})
        clim = metric.climatology
        if clim is None:
            clim = float(torch.cat([o.float() for o in metric.outcomes]).mean()) if metric.outcomes else 0.5
        plot_all(metric, clim, self.plots_dir, self.event, self.trainer.is_global_zero, ci.get("auc"))


class HailClassificationTask(_Verification, ClassificationTask):
    """Binary severe-hail classification with AUC, Brier score, BSS, best CSI and the diagrams."""

    def __init__(self, model, num_classes: int = 2, class_names: list[str] | None = None, signal_class: int = 1,
                 threshold_mm: float = 25.0, optimizer=None, scheduler=None, bootstrap: int = 0,
                 bootstrap_seed: int = 0, confidence: float = 0.95):
        if num_classes != 2:
            raise SciMLError(f"task.num_classes: severe-hail classification is binary, got {num_classes}")
        super().__init__(model, num_classes, class_names, signal_class, optimizer=optimizer, scheduler=scheduler,
                         bootstrap=bootstrap, bootstrap_seed=bootstrap_seed, confidence=confidence)
        self.threshold_mm = threshold_mm
        self.event = f"hail >= {threshold_mm:g} mm"

    def configure_metrics(self, stage):
        return {"binary": ForecastVerification()}

    def epoch_metrics(self, stage):
        self.metrics[stage]["binary"].climatology = self.climatology()
        return super().epoch_metrics(stage)

    def test_report(self):
        metric = self.metrics["test"]["binary"]
        probs, outcomes = metric.samples()  # a collective under DDP
        self.verify(metric)
        if self.trainer.is_global_zero:
            self.score_distributions(probs, outcomes)


class HailRegressionTask(_Verification, RegressionTask):
    """Hail size (mm) as a Gaussian: MAE, RMSE, R^2 of the mean, and verification of P(size >= threshold_mm)."""

    def __init__(self, model, num_targets: int = 1, loss: str = "gaussian_nll", target_offset: float = 25.0,
                 target_scale: float = 20.0, target_name: str = "hail size (mm)", threshold_mm: float = 25.0,
                 optimizer=None, scheduler=None, bootstrap: int = 0, bootstrap_seed: int = 0,
                 confidence: float = 0.95):
        if loss != "gaussian_nll" or num_targets != 1:
            raise SciMLError("task: hail-size regression needs loss=gaussian_nll and num_targets=1 (the exceedance "
                             f"probability comes from the predicted spread), got loss={loss}, "
                             f"num_targets={num_targets}")
        super().__init__(model, num_targets, loss, target_offset, target_scale, target_name, optimizer, scheduler,
                         bootstrap, bootstrap_seed, confidence)
        self.threshold_mm = threshold_mm
        self.event = f"hail >= {threshold_mm:g} mm"

    def configure_metrics(self, stage):
        return {**super().configure_metrics(stage), "verification": ForecastVerification()}

    def exceedance(self, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """P(size >= threshold) under the predicted Gaussian."""
        normal = torch.distributions.Normal(mean, std.clamp(min=1e-3))
        return 1 - normal.cdf(torch.full_like(mean, self.threshold_mm))

    def evaluate_batch(self, batch, stage):
        result = super().evaluate_batch(batch, stage)
        if result is None:
            return None
        mean, std = result
        event = (batch["y"].reshape(len(mean), -1) >= self.threshold_mm).long()
        self.metrics[stage]["verification"].update(self.exceedance(mean, std), event)
        return mean, std

    def epoch_metrics(self, stage):
        self.metrics[stage]["verification"].climatology = self.climatology()
        return super().epoch_metrics(stage)

    def test_report(self):
        super().test_report()
        self.verify(self.metrics["test"]["verification"])

    def predict_step(self, batch, batch_idx):
        out = super().predict_step(batch, batch_idx)
        out["probability"] = self.exceedance(out["prediction"], out["std"])
        return out
