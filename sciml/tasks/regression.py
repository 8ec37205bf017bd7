"""Regression of one or more continuous targets, optionally with a predicted uncertainty (Gaussian likelihood)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import MeanAbsoluteError, MeanMetric, MeanSquaredError, MetricCollection, R2Score

from sciml.errors import SciMLError
from sciml.tasks.base import SciMLTask

LOSSES = ("mse", "l1", "huber", "gaussian_nll")


class RegressionTask(SciMLTask):
    """The network predicts `num_targets` values per sample, in units normalised as (y - target_offset) /
    target_scale so that it trains at unit scale; metrics, plots and predictions are in the target's own units.

    With `loss: gaussian_nll` the network returns 2 * num_targets values, the mean and log-variance of a Gaussian,
    trained by its negative log-likelihood; predictions then include `std`. Batches: `x`, `y` of shape (N,) or
    (N, num_targets), optionally `w` (per-sample weights, used in the loss).

    Metrics (torchmetrics, over all targets): mae, rmse, r2, and the loss.
    """

    def __init__(self, model, num_targets: int = 1, loss: str = "mse", target_offset: float = 0.0,
                 target_scale: float = 1.0, target_name: str = "target", optimizer=None, scheduler=None):
        super().__init__(model, optimizer, scheduler)
        if loss not in LOSSES:
            raise SciMLError(f"task.loss: '{loss}' is not one of {', '.join(LOSSES)}")
        if num_targets < 1:
            raise SciMLError(f"task.num_targets must be >= 1, got {num_targets}")
        if not target_scale > 0:
            raise SciMLError(f"task.target_scale must be > 0, got {target_scale}")
        self.num_targets, self.loss_name, self.target_name = num_targets, loss, target_name
        self.target_offset, self.target_scale = float(target_offset), float(target_scale)
        self.metrics = torch.nn.ModuleDict({stage: self._make_metrics() for stage in ("val", "test")})
        self.losses = torch.nn.ModuleDict({stage: MeanMetric() for stage in ("val", "test")})

    @staticmethod
    def _make_metrics() -> MetricCollection:
        return MetricCollection({"mae": MeanAbsoluteError(), "rmse": MeanSquaredError(squared=False),
                                 "r2": R2Score()})

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

    def _loss(self, mean, log_var, target, w):
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
        loss = self._loss(mean, log_var, self._target(batch["y"]), batch.get("w"))
        self.log_train_loss(loss, batch_size=len(mean))
        return loss

    def _evaluate(self, batch, stage):
        x, w = batch["x"], batch.get("w")
        mean, log_var = self._split(self(x))
        target = self._target(batch["y"])
        self.losses[stage].update(self._loss(mean, log_var, target, w), weight=len(x) if w is None else w.sum())
        scale, offset = self.target_scale, self.target_offset
        self.metrics[stage].update((mean * scale + offset).flatten(), (target * scale + offset).flatten())
        return mean * scale + offset, None if log_var is None else (0.5 * log_var).exp() * scale

    def _log_epoch(self, stage):
        values = {"loss": self.losses[stage].compute(), **self.metrics[stage].compute()}
        self.log_dict({f"{stage}/{k}": v.float() for k, v in values.items()}, prog_bar=stage == "val")
        self.losses[stage].reset()
        self.metrics[stage].reset()

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val")

    def on_validation_epoch_end(self):
        self._log_epoch("val")

    def on_test_epoch_start(self):
        self._test_pairs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def test_step(self, batch, batch_idx):
        mean, _ = self._evaluate(batch, "test")
        self._test_pairs.append((mean.detach().float().flatten().cpu(), batch["y"].detach().float().flatten().cpu()))

    def on_test_epoch_end(self):
        self._log_epoch("test")
        if self.trainer.is_global_zero and self._test_pairs:  # this rank's test samples (all of them on one device)
            predicted, observed = (torch.cat(t).numpy() for t in zip(*self._test_pairs))
            plot_regression(predicted, observed, self.plots_dir / "regression.png", name=self.target_name)

    def predict_step(self, batch, batch_idx):
        mean, std = self.predict_physical(batch["x"])
        out = {"prediction": mean, "target": batch["y"].reshape(len(mean), -1).float()}
        if std is not None:
            out["std"] = std
        if "index" in batch:
            out["index"] = batch["index"]
        return self.to_host(out)


def plot_regression(predicted, observed, path, name: str = "target") -> None:
    """Predicted against observed values, with the 1:1 line, and the histogram of the errors."""
    import numpy as np

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
