"""Weighted binary-classification metrics as HEP analyses quote them.

torchmetrics' ROC metrics take no per-event weights, and physics samples are weighted (cross-sections,
pile-up, re-weighting), so the weighted ROC is computed here as a torchmetrics `Metric` (state synced across
ranks like any other).
"""
from __future__ import annotations

import torch
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from sciml.errors import DegenerateDataError


def weighted_roc(scores: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor):
    """Background efficiency (FPR) and signal efficiency (TPR) at every distinct score threshold, from (0, 0)."""
    order = torch.argsort(scores, descending=True, stable=True)
    scores, labels, weights = scores[order], labels[order].to(weights.dtype), weights[order]
    tps = torch.cumsum(weights * labels, 0)
    fps = torch.cumsum(weights * (1 - labels), 0)
    last_of_tie = torch.ones_like(scores, dtype=torch.bool)
    last_of_tie[:-1] = scores[1:] != scores[:-1]  # thresholds sit between distinct scores
    zero = scores.new_zeros(1, dtype=weights.dtype)
    tpr = torch.cat([zero, tps[last_of_tie] / tps[-1]])
    fpr = torch.cat([zero, fps[last_of_tie] / fps[-1]])
    return fpr, tpr


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> float:
    """Linear interpolation of fp(xp) at x, xp non-decreasing (first crossing)."""
    i = int(torch.searchsorted(xp, x.reshape(1), right=False).clamp(1, len(xp) - 1))
    x0, x1, y0, y1 = xp[i - 1], xp[i], fp[i - 1], fp[i]
    return float(y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0))


WORKING_POINTS = {"sig_eff_at_bkg_eff_1e-2": 1e-2, "sig_eff_at_bkg_eff_1e-3": 1e-3}
MIN_BACKGROUND_EVENTS = 10  # a working point resting on fewer background events is flagged


def binary_values(scores: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                  working_points: bool = False) -> dict[str, float]:
    """AUC and accuracy at score 0.5 (and, with `working_points`, the HEP working points) of one sample."""
    if len(labels) == 0 or labels.min() == labels.max():
        raise DegenerateDataError(_one_class_message(labels))
    fpr, tpr = weighted_roc(scores, labels, weights)
    correct = ((scores >= 0.5) == (labels == 1)).to(weights.dtype)
    values = {"auc": float(torch.trapezoid(tpr, fpr)), "acc": float((weights * correct).sum() / weights.sum())}
    if working_points:
        for name, eff in WORKING_POINTS.items():
            values[name] = _interp(torch.tensor(eff, dtype=fpr.dtype), fpr, tpr)
        fpr_at_half = _interp(torch.tensor(0.5, dtype=tpr.dtype), tpr, fpr)
        bkg = weights[labels == 0]
        resolution = float(bkg.min() / bkg.sum())
        values["bkg_rej_at_sig_eff_0.5"] = 1.0 / max(fpr_at_half, resolution)
    return values


def _one_class_message(labels: torch.Tensor) -> str:
    if len(labels) == 0:
        return "no events were evaluated; ROC metrics need signal and background events"
    which = "signal" if int(labels[0]) == 1 else "background"
    return f"all {len(labels)} evaluated events are {which}; ROC metrics need signal and background events"


def effective_count(weights: torch.Tensor) -> float:
    """Kish's effective number of events, (sum w)^2 / sum w^2: the count that sets the statistical precision."""
    return float(weights.sum() ** 2 / (weights ** 2).sum()) if len(weights) else 0.0


class WeightedBinaryClassification(Metric):
    """AUC and accuracy at score 0.5 with per-event weights; with `working_points=True` also signal efficiency at
    background efficiency 1e-2 and 1e-3 and background rejection (1 / background efficiency) at 50 % signal
    efficiency, as HEP analyses quote them, with the number of background events each working point rests on
    (`bkg_events_at_bkg_eff_1e-2`, ...: the effective number of background events times the efficiency).

    When no background passes at 50 % signal efficiency the rejection is a lower bound: one over the smallest
    background weight fraction the sample can resolve. One class only raises `DegenerateDataError`.
    """

    full_state_update = False

    def __init__(self, working_points: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.working_points = working_points
        for name in ("scores", "labels", "weights"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, scores: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None):
        self.scores.append(scores.detach().double().flatten())
        self.labels.append(labels.detach().flatten())
        self.weights.append(torch.ones_like(self.scores[-1]) if weights is None
                            else weights.detach().double().flatten())

    def samples(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scores, labels and weights of every evaluated event over all ranks: a collective call under DDP."""
        with self.sync_context():
            return tuple(dim_zero_cat(s).cpu() if len(s) else torch.zeros(0)
                         for s in (self.scores, self.labels, self.weights))

    def curve(self):
        """The (background, signal) efficiency curve over all ranks: a collective call under DDP."""
        return weighted_roc(*self.samples())

    def compute(self) -> dict[str, torch.Tensor]:
        scores, labels, weights = (dim_zero_cat(s) for s in (self.scores, self.labels, self.weights))
        values = binary_values(scores, labels, weights, self.working_points)
        if self.working_points:
            n_bkg = effective_count(weights[labels == 0])
            values |= {f"bkg_events_at_bkg_eff_{k.rsplit('_', 1)[1]}": n_bkg * eff
                       for k, eff in WORKING_POINTS.items()}
        return {k: torch.as_tensor(v, dtype=torch.float64) for k, v in values.items()}

    def bootstrap(self, resamples: int, seed: int = 0, confidence: float = 0.95) -> dict[str, tuple[float, float]]:
        """Confidence intervals of every value, resampling events (a collective call under DDP)."""
        from sciml.bootstrap import intervals

        scores, labels, weights = self.samples()

        def statistic(units):
            idx = torch.as_tensor(units)
            try:
                return binary_values(scores[idx], labels[idx], weights[idx], self.working_points)
            except DegenerateDataError:
                return {}

        return intervals(statistic, len(labels), resamples, seed, confidence)
