"""Verification of probabilistic forecasts of a binary event, as forecasters do it (Wilks, Statistical Methods in the
Atmospheric Sciences; Roebber 2009 for the performance diagram): ROC AUC, Brier score and Brier skill score against
climatology, the critical success index (CSI) at its best probability threshold, and the reliability (attributes)
and performance diagrams. The scores come from torchmetrics; the states are synced across ranks like any metric.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.functional import mean_squared_error
from torchmetrics.functional.classification import binary_auroc, binary_precision_recall_curve, binary_roc
from torchmetrics.utilities.data import dim_zero_cat

from sciml.errors import DegenerateDataError

THRESHOLDS = 101  # probability thresholds 0, 0.01, ..., 1 for CSI and the performance diagram


class ForecastVerification(Metric):
    """Probabilities of an event and its outcomes (0/1).

    `climatology` is the reference forecast of the Brier skill score: the event frequency of the training data
    (set it before `compute`); None uses the frequency of the evaluated sample (a skill score the forecaster
    could not have known in advance). That sample-climatology score is always reported too, as `bss_sample`.
    """

    full_state_update = False

    def __init__(self, bins: int = 10, **kwargs):
        super().__init__(**kwargs)
        self.bins = bins
        self.climatology: float | None = None
        self.add_state("probs", default=[], dist_reduce_fx="cat")
        self.add_state("outcomes", default=[], dist_reduce_fx="cat")

    def update(self, probs: torch.Tensor, outcomes: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        if weights is not None:
            raise ValueError("ForecastVerification takes no per-sample weights")
        self.probs.append(probs.detach().float().flatten())
        self.outcomes.append(outcomes.detach().long().flatten())

    def _data(self) -> tuple[torch.Tensor, torch.Tensor]:
        probs, outcomes = dim_zero_cat(self.probs), dim_zero_cat(self.outcomes)
        _check_outcomes(outcomes)
        return probs.clamp(0, 1), outcomes

    def compute(self) -> dict[str, torch.Tensor]:
        return verification_values(*self._data(), self.climatology)

    def samples(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Probabilities and outcomes of every evaluated storm over all ranks (a collective under DDP)."""
        with self.sync_context():
            return self._data()

    def bootstrap(self, resamples: int, seed: int = 0, confidence: float = 0.95,
                  names: tuple[str, ...] = ("auc", "brier", "bss")) -> dict[str, tuple[float, float]]:
        """Confidence intervals of the scores `names`, resampling the evaluated storms (collective under DDP)."""
        from sciml.bootstrap import intervals

        probs, outcomes = (t.cpu() for t in self.samples())

        def statistic(units):
            idx = torch.as_tensor(units)
            try:
                values = verification_values(probs[idx], outcomes[idx], self.climatology, curves=False)
            except DegenerateDataError:
                return {}
            return {k: float(values[k]) for k in names}

        return intervals(statistic, len(outcomes), resamples, seed, confidence)

    def curves(self) -> dict[str, np.ndarray]:
        """Reliability bins, performance curve and ROC over all ranks (a collective under DDP)."""
        with self.sync_context():
            probs, outcomes = self._data()
        edges = torch.linspace(0, 1, self.bins + 1, device=probs.device)
        which = torch.bucketize(probs, edges[1:-1], right=True)
        count = torch.bincount(which, minlength=self.bins).float()
        mean_prob = torch.bincount(which, weights=probs, minlength=self.bins) / count.clamp(min=1)
        observed = torch.bincount(which, weights=outcomes.float(), minlength=self.bins) / count.clamp(min=1)
        precision, recall, thresholds = binary_precision_recall_curve(probs, outcomes, thresholds=THRESHOLDS)
        fpr, tpr, _ = binary_roc(probs, outcomes)
        return {k: v.double().cpu().numpy() for k, v in {
            "bin_count": count, "bin_prob": mean_prob, "bin_observed": observed,
            "sr": precision[:-1], "pod": recall[:-1], "threshold": thresholds,
            "pofd": fpr, "roc_pod": tpr, "base_rate": outcomes.float().mean()}.items()}


def _check_outcomes(outcomes: torch.Tensor) -> None:
    if len(outcomes) == 0 or outcomes.min() == outcomes.max():
        which = "none was evaluated" if len(outcomes) == 0 else (
            f"all {len(outcomes)} are {'events' if int(outcomes[0]) else 'non-events'}")
        raise DegenerateDataError(f"forecast verification needs storms with and without the event; {which}")


def verification_values(probs: torch.Tensor, outcomes: torch.Tensor, climatology: float | None,
                        curves: bool = True) -> dict[str, torch.Tensor]:
    """AUC, Brier score, BSS against `climatology` (None: the sample's frequency), BSS against the sample's
    frequency and, with `curves`, the best CSI with its threshold, POD and success ratio."""
    _check_outcomes(outcomes)
    base_rate = outcomes.float().mean()
    clim = base_rate if climatology is None else torch.tensor(climatology, device=probs.device)
    brier = mean_squared_error(probs, outcomes.float())
    brier_clim = ((clim - outcomes.float()) ** 2).mean()
    # bss_sample: against the evaluated sample's own frequency, as hagelslag's reliability diagrams report it
    brier_sample = base_rate * (1 - base_rate)
    values = {"auc": binary_auroc(probs, outcomes), "brier": brier, "bss": 1 - brier / brier_clim,
              "bss_sample": 1 - brier / brier_sample, "base_rate": base_rate}
    if curves:
        csi, threshold, pod, sr = best_csi(probs, outcomes)
        values |= {"csi": csi, "csi_threshold": threshold, "pod": pod, "sr": sr}
    return {k: torch.as_tensor(v, dtype=torch.float32) for k, v in values.items()}


def csi_from(pod: torch.Tensor, sr: torch.Tensor) -> torch.Tensor:
    """CSI = hits / (hits + misses + false alarms) = 1 / (1/POD + 1/SR - 1); 0 where POD or SR is 0."""
    ok = (pod > 0) & (sr > 0)
    return torch.where(ok, 1 / (1 / pod.clamp(min=1e-12) + 1 / sr.clamp(min=1e-12) - 1), torch.zeros_like(pod))


def best_csi(probs: torch.Tensor, outcomes: torch.Tensor):
    """The highest CSI over probability thresholds 0, 0.01, ..., 1, with its threshold, POD and success ratio."""
    precision, recall, thresholds = binary_precision_recall_curve(probs, outcomes, thresholds=THRESHOLDS)
    sr, pod = precision[:-1], recall[:-1]  # the last point is torchmetrics' (precision 1, recall 0) end point
    csi = csi_from(pod, sr)
    i = int(torch.argmax(csi))
    return csi[i], thresholds[i], pod[i], sr[i]


def plot_reliability(curves: dict[str, np.ndarray], climatology: float, path: Path, event: str) -> None:
    """Attributes diagram: observed frequency against forecast probability per bin, with the climatology lines, the
    no-skill line (half-way between climatology and perfect reliability) and the region where bins add skill; the
    forecast histogram underneath (sharpness)."""
    from sciml.plots import plt

    fig, (ax, hist) = plt.subplots(2, 1, figsize=(5, 6.2), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    p = np.linspace(0, 1, 101)
    no_skill = (p + climatology) / 2
    ax.fill_between(p, no_skill, np.where(p < climatology, 0, 1), color="tab:green", alpha=0.12,
                    label="bins that add skill")
    ax.plot([0, 1], [0, 1], c="grey", ls=":", label="perfect reliability")
    ax.plot(p, no_skill, c="tab:green", ls="--", lw=1, label="no skill")
    ax.axhline(climatology, c="tab:orange", lw=1, ls="-.", label=f"climatology {climatology:.2f}")
    ax.axvline(climatology, c="tab:orange", lw=1, ls="-.")
    used = curves["bin_count"] > 0
    ax.plot(curves["bin_prob"][used], curves["bin_observed"][used], "o-", c="tab:blue", label="forecast")
    ax.set(ylabel=f"observed frequency of {event}", xlim=(0, 1), ylim=(0, 1), title="Attributes diagram")
    ax.legend(loc="upper left", fontsize=8)
    edges = np.linspace(0, 1, len(curves["bin_count"]) + 1)
    hist.bar(edges[:-1], curves["bin_count"], width=np.diff(edges), align="edge", color="tab:blue", alpha=0.6)
    hist.set(xlabel=f"forecast probability of {event}", ylabel="forecasts", yscale="log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_performance(curves: dict[str, np.ndarray], path: Path, event: str) -> None:
    """Performance diagram (Roebber 2009): probability of detection against success ratio at every probability
    threshold, over contours of CSI and lines of frequency bias; the best-CSI threshold marked."""
    from sciml.plots import plt

    sr_grid, pod_grid = np.meshgrid(np.linspace(0.01, 1, 200), np.linspace(0.01, 1, 200))
    csi_grid = 1 / (1 / sr_grid + 1 / pod_grid - 1)
    fig, ax = plt.subplots(figsize=(5.6, 5))
    filled = ax.contourf(sr_grid, pod_grid, csi_grid, levels=np.linspace(0, 1, 11), cmap="Blues", alpha=0.7)
    fig.colorbar(filled, ax=ax, label="critical success index (CSI)")
    bias = ax.contour(sr_grid, pod_grid, pod_grid / sr_grid, levels=[0.5, 1, 1.5, 2, 4], colors="grey",
                      linestyles="--", linewidths=0.8)
    ax.clabel(bias, fmt="bias %.1f", fontsize=7)
    sr, pod, thr = curves["sr"], curves["pod"], curves["threshold"]
    valid = (sr > 0) & (pod > 0)
    ax.plot(sr[valid], pod[valid], c="tab:red", lw=1.5, label="forecast")
    for t in (0.1, 0.3, 0.5, 0.7, 0.9):
        i = int(np.argmin(np.abs(thr - t)))
        if valid[i]:
            ax.annotate(f"{thr[i]:.1f}", (sr[i], pod[i]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    csi = np.where(valid, 1 / (1 / np.where(valid, sr, 1) + 1 / np.where(valid, pod, 1) - 1), 0)
    best = int(np.argmax(csi))
    ax.plot(sr[best], pod[best], "k*", ms=11, label=f"best CSI {csi[best]:.2f} at p >= {thr[best]:.2f}")
    ax.set(xlabel="success ratio (1 - false alarm ratio)", ylabel="probability of detection", xlim=(0, 1),
           ylim=(0, 1), title=f"Performance diagram: {event}")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_roc(curves: dict[str, np.ndarray], path: Path, event: str,
             auc_interval: tuple[float, float] | None = None) -> None:
    from sciml.plots import plt

    pofd, pod = curves["pofd"], curves["roc_pod"]
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    label = f"AUC = {np.trapezoid(pod, pofd):.3f}"
    if auc_interval is not None and all(np.isfinite(auc_interval)):
        label += f" [{auc_interval[0]:.3f}, {auc_interval[1]:.3f}]"
    ax.plot(pofd, pod, c="tab:blue", label=label)
    ax.plot([0, 1], [0, 1], ls=":", c="grey", label="no skill")
    ax.set(xlabel="probability of false detection", ylabel="probability of detection", title=f"ROC: {event}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_all(metric: ForecastVerification, climatology: float, directory: Path, event: str,
             is_global_zero: bool = True, auc_interval: tuple[float, float] | None = None) -> None:
    """reliability.png, performance.png and roc.png in `directory` (every rank must call it under DDP); the ROC's
    legend gives `auc_interval` (a bootstrap confidence interval) when known."""
    curves = metric.curves()
    if not is_global_zero:
        return
    plot_reliability(curves, climatology, directory / "reliability.png", event)
    plot_performance(curves, directory / "performance.png", event)
    plot_roc(curves, directory / "roc.png", event, auc_interval)
    from sciml.plots import save_roc

    save_roc(curves["pofd"], curves["roc_pod"], directory / "roc.csv")  # for `sciml compare`
