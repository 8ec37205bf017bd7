"""Regression of one or more continuous targets, optionally with a predicted uncertainty (Gaussian likelihood)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics import MeanAbsoluteError, MeanSquaredError, Metric, R2Score
from torchmetrics.utilities.data import dim_zero_cat

from sciml.bootstrap import intervals
from sciml.errors import SciMLError
from sciml.tasks.base import SciMLTask

LOSSES = ("mse", "l1", "huber", "gaussian_nll")


class RegressionTask(SciMLTask):
    """The network predicts `num_targets` values per sample, in units normalised as (y - target_offset) /
    target_scale so that it trains at unit scale; metrics, plots and predictions are in the target's own units.

    With `loss: gaussian_nll` the network returns 2 * num_targets values, the mean and log-variance of a Gaussian,
    trained by its negative log-likelihood; predictions then include `std`. Batches: `x`, `y` of shape (N,) or
    (N, num_targets), optionally `w` (per-sample weights, used in the loss).

    Metrics (torchmetrics, over all targets): mae, rmse, r2, and the loss; with `bootstrap` > 0 their confidence
    intervals from resampled test samples (`test/rmse_ci_low`, ...), and `plots/regression.png`.
    """

    def __init__(self, model, num_targets: int = 1, loss: str = "mse", target_offset: float = 0.0,
                 target_scale: float = 1.0, target_name: str = "target", optimizer=None, scheduler=None,
                 bootstrap: int = 0, bootstrap_seed: int = 0, confidence: float = 0.95):
        super().__init__(model, optimizer, scheduler, bootstrap, bootstrap_seed, confidence)
        if loss not in LOSSES:
            raise SciMLError(f"task.loss: '{loss}' is not one of {', '.join(LOSSES)}")
        if num_targets < 1:
            raise SciMLError(f"task.num_targets must be >= 1, got {num_targets}")
        if not target_scale > 0:
            raise SciMLError(f"task.target_scale must be > 0, got {target_scale}")
        self.num_targets, self.loss_name, self.target_name = num_targets, loss, target_name
        self.target_offset, self.target_scale = float(target_offset), float(target_scale)

    def configure_metrics(self, stage):
        metrics = {"mae": MeanAbsoluteError(), "rmse": MeanSquaredError(squared=False), "r2": R2Score()}
        if stage == "test":  # the test pairs, for the plot and the bootstrap intervals
            metrics["pairs"] = Pairs()
        return metrics

    @property
    def outputs_per_target(self) -> int:
        return 2 if self.loss_name == "gaussian_nll" else 1

    def _split(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Network output -> normalised mean (N, T) and log-variance (N, T) or None."""
        expected = self.num_targets * self.outputs_per_target
        if out.ndim != 2 or out.shape[1] != expected:
            raise SciMLError(f"model output has shape {tuple(out.shape)}, task.loss={self.loss_name} with "
                             f"task.num_targets={self.num_targets} needs (batch, {expected}): set the model's "
                             "number of outputs")
        if self.outputs_per_target == 1:
            return out, None
        return out[:, :self.num_targets], out[:, self.num_targets:].clamp(-10, 10)

    def _target(self, y: torch.Tensor) -> torch.Tensor:
        y = y.reshape(len(y), -1).float()
        if y.shape[1] != self.num_targets:
            raise SciMLError(f"targets have {y.shape[1]} values per sample, task.num_targets={self.num_targets}")
        return (y - self.target_offset) / self.target_scale

    def loss(self, mean, log_var, target, w):
        if self.loss_name == "gaussian_nll":
            loss = F.gaussian_nll_loss(mean, target, log_var.exp(), reduction="none", full=True)
        elif self.loss_name == "l1":
            loss = F.l1_loss(mean, target, reduction="none")
        elif self.loss_name == "huber":
            loss = F.huber_loss(mean, target, reduction="none")
        else:
            loss = F.mse_loss(mean, target, reduction="none")
        loss = loss.mean(dim=1)
        return loss.mean() if w is None else (loss * w).sum() / w.sum()

    def predict_physical(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Mean (N, T) and standard deviation (N, T) or None, in target units."""
        mean, log_var = self._split(self(x))
        std = None if log_var is None else (0.5 * log_var).exp() * self.target_scale
        return mean * self.target_scale + self.target_offset, std

    def training_step(self, batch, batch_idx):
        mean, log_var = self._split(self(batch["x"]))
        loss = self.loss(mean, log_var, self._target(batch["y"]), batch.get("w"))
        self.log_train_loss(loss, batch_size=len(mean))
        return loss

    def evaluate_batch(self, batch, stage):
        """Update the stage's metrics; returns the predicted mean and standard deviation (or None) in target
        units, None for unlabelled batches."""
        if "y" not in batch:  # unlabelled rows are predicted, not scored
            return None
        x, w = batch["x"], batch.get("w")
        mean, log_var = self._split(self(x))
        target = self._target(batch["y"])
        metrics = self.metrics[stage]
        metrics["loss"].update(self.loss(mean, log_var, target, w), weight=len(x) if w is None else w.sum())
        scale, offset = self.target_scale, self.target_offset
        predicted, observed = (mean * scale + offset).flatten(), (target * scale + offset).flatten()
        for name in ("mae", "rmse", "r2"):
            metrics[name].update(predicted, observed)
        if "pairs" in metrics:
            metrics["pairs"].update(predicted, observed)
        return mean * scale + offset, None if log_var is None else (0.5 * log_var).exp() * scale

    def test_report(self):
        predicted, observed = self.metrics["test"]["pairs"].values()  # a collective under DDP
        if self.bootstrap:
            ci = intervals(lambda units: regression_values(predicted[units], observed[units]), len(predicted),
                           self.bootstrap, self.bootstrap_seed, self.confidence)
            for name, (low, high) in ci.items():
                self.log_dict({f"test/{name}_ci_low": low, f"test/{name}_ci_high": high})
        if self.trainer.is_global_zero and len(predicted):
            plot_regression(predicted, observed, self.plots_dir / "regression.png", name=self.target_name)

    def predict_step(self, batch, batch_idx):
        mean, std = self.predict_physical(batch["x"])
        out = {"prediction": mean}
        if "y" in batch:  # the target passes through when the file has one
            out["target"] = batch["y"].reshape(len(mean), -1).float()
        if std is not None:
            out["std"] = std
        if "index" in batch:
            out["index"] = batch["index"]
        return self.to_host(out)


class Pairs(Metric):
    """Predicted and observed values of every evaluated sample, gathered over ranks (for plots and intervals);
    computes nothing itself."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("predicted", default=[], dist_reduce_fx="cat")
        self.add_state("observed", default=[], dist_reduce_fx="cat")

    def update(self, predicted: torch.Tensor, observed: torch.Tensor) -> None:
        self.predicted.append(predicted.detach().double().flatten())
        self.observed.append(observed.detach().double().flatten())

    def compute(self) -> dict:
        return {}

    def values(self) -> tuple[np.ndarray, np.ndarray]:
        """(predicted, observed) over all ranks: a collective call under DDP."""
        with self.sync_context():
            return tuple(dim_zero_cat(s).float().cpu().numpy() if len(s) else np.zeros(0)  # bf16 has no numpy type
                         for s in (self.predicted, self.observed))


def regression_values(predicted: np.ndarray, observed: np.ndarray) -> dict[str, float]:
    """MAE, RMSE and R^2 of one sample (for the bootstrap; the logged values come from torchmetrics)."""
    error = predicted - observed
    variance = ((observed - observed.mean()) ** 2).sum()
    return {"mae": float(np.abs(error).mean()), "rmse": float(np.sqrt((error ** 2).mean())),
            "r2": float(1 - (error ** 2).sum() / variance) if variance > 0 else float("nan")}


def plot_regression(predicted, observed, path, name: str = "target") -> None:
    """Predicted against observed values, with the 1:1 line, and the histogram of the errors."""
    from sciml.plots import plt  # the Agg backend is set there

    error = predicted - observed
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.8))
    left.scatter(observed, predicted, s=6, alpha=0.5)
    lo, hi = float(min(observed.min(), predicted.min())), float(max(observed.max(), predicted.max()))
    left.plot([lo, hi], [lo, hi], ls=":", c="grey")
    left.set(xlabel=f"observed {name}", ylabel=f"predicted {name}",
             title=f"MAE {np.abs(error).mean():.3g}, RMSE {np.sqrt((error ** 2).mean()):.3g}")
    right.hist(error, bins=40)
    right.set(xlabel=f"predicted - observed {name}", ylabel="samples", title="errors")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
