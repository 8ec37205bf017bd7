"""Weighted binary-classification metrics as HEP analyses quote them.

torchmetrics' ROC metrics take no per-event weights, and physics samples are weighted (cross-sections,
pile-up, re-weighting), so the weighted ROC is computed here as a torchmetrics `Metric` (state synced across
ranks like any other).
"""
from __future__ import annotations

import torch
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat


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


class WeightedBinaryClassification(Metric):
    """AUC, accuracy at score 0.5, signal efficiency at background efficiency 1e-2 and 1e-3, and background
    rejection (1 / background efficiency) at 50 % signal efficiency, all with per-event weights.

    When no background passes at 50 % signal efficiency the rejection is a lower bound: one over the smallest
    background weight fraction the sample can resolve.
    """

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for name in ("scores", "labels", "weights"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, scores: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None):
        self.scores.append(scores.detach().double().flatten())
        self.labels.append(labels.detach().flatten())
        self.weights.append(torch.ones_like(self.scores[-1]) if weights is None else weights.detach().double().flatten())

    def curve(self):
        """The (background, signal) efficiency curve over all ranks: a collective call under DDP."""
        with self.sync_context():
            return weighted_roc(dim_zero_cat(self.scores), dim_zero_cat(self.labels), dim_zero_cat(self.weights))

    def compute(self) -> dict[str, torch.Tensor]:
        scores, labels, weights = (dim_zero_cat(s) for s in (self.scores, self.labels, self.weights))
        if labels.min() == labels.max():
            raise ValueError("ROC metrics need both classes in the evaluated sample")
        fpr, tpr = weighted_roc(scores, labels, weights)
        auc = torch.trapezoid(tpr, fpr)
        correct = ((scores >= 0.5) == (labels == 1)).double()
        accuracy = (weights * correct).sum() / weights.sum()
        fpr_at_half = _interp(torch.tensor(0.5, dtype=tpr.dtype), tpr, fpr)
        bkg = weights[labels == 0]
        resolution = float(bkg.min() / bkg.sum())
        values = {
            "auc": auc,
            "acc": accuracy,
            "sig_eff_at_bkg_eff_1e-2": _interp(torch.tensor(1e-2, dtype=fpr.dtype), fpr, tpr),
            "sig_eff_at_bkg_eff_1e-3": _interp(torch.tensor(1e-3, dtype=fpr.dtype), fpr, tpr),
            "bkg_rej_at_sig_eff_0.5": 1.0 / max(fpr_at_half, resolution),
        }
        return {k: torch.as_tensor(v, dtype=torch.float64) for k, v in values.items()}
