"""Figures a run leaves in plots/ (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_roc(fpr: np.ndarray, tpr: np.ndarray, path: Path, signal: str = "signal", background: str = "background",
             auc_interval: tuple[float, float] | None = None, confidence: float = 0.95):
    """The ROC curve twice: linear, and as HEP quotes it — background rejection against signal efficiency. With
    `auc_interval` the legend gives the AUC's bootstrap confidence interval. The points go to roc.csv beside it."""
    save_roc(fpr, tpr, Path(path).with_suffix(".csv"))
    auc = np.trapezoid(tpr, fpr)
    label = f"AUC = {auc:.4f}"
    if auc_interval is not None and all(np.isfinite(auc_interval)):
        label += f" [{auc_interval[0]:.4f}, {auc_interval[1]:.4f}] ({confidence:.0%} CI)"
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.8))
    left.plot(fpr, tpr, label=label)
    left.plot([0, 1], [0, 1], ls=":", c="grey")
    left.set(xlabel=f"{background} efficiency", ylabel=f"{signal} efficiency", title="ROC")
    left.legend(loc="lower right", fontsize=8)
    keep = fpr > 0
    right.semilogy(tpr[keep], 1.0 / fpr[keep])
    right.set(xlabel=f"{signal} efficiency", ylabel=f"{background} rejection (1 / efficiency)",
              title="Background rejection", xlim=(0, 1))
    right.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_roc(fpr: np.ndarray, tpr: np.ndarray, path: Path) -> None:
    """The ROC curve's points as CSV (columns fpr, tpr) beside its figure: `sciml compare` overlays them."""
    np.savetxt(path, np.column_stack([fpr, tpr]), delimiter=",", header="fpr,tpr", comments="", fmt="%.7g")


def read_roc(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The (fpr, tpr) points that `save_roc` wrote."""
    data = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)
    return data[:, 0], data[:, 1]


def plot_score_distributions(train, test, path: Path, signal: str = "signal", background: str = "background",
                             bins: int = 40) -> dict[str, float]:
    """The overtraining check: the signal score's distribution per class, training rows (filled) against test rows
    (points), normalised and weighted, with the two-sample Kolmogorov-Smirnov p-value of each class
    (scipy.stats.ks_2samp, unweighted). `train` and `test` are (scores, labels 0/1, weights). Returns
    {class name: p-value}; a small p-value means the network scores its training rows differently."""
    from scipy.stats import ks_2samp

    edges = np.linspace(0, 1, bins + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    fig, ax = plt.subplots(figsize=(6, 4.2))
    pvalues = {}
    for label, name, colour in ((0, background, "tab:blue"), (1, signal, "tab:red")):
        (s_train, w_train), (s_test, w_test) = ((s[y == label], w[y == label]) for s, y, w in (train, test))
        if len(s_train) == 0 or len(s_test) == 0:
            continue
        p = float(ks_2samp(s_train, s_test).pvalue)
        pvalues[name] = p
        ax.hist(s_train, bins=edges.tolist(), weights=w_train, density=True, histtype="stepfilled", alpha=0.3,
                color=colour, label=f"{name} (training)")
        counts, _ = np.histogram(s_test, bins=edges, weights=w_test)
        raw, _ = np.histogram(s_test, bins=edges)
        norm = counts.sum() * np.diff(edges)
        # Poisson errors of the weighted counts: sqrt(sum w^2) per bin, approximated with the mean weight
        errors = np.sqrt(raw) * (counts / np.maximum(raw, 1)) / np.where(norm > 0, norm, 1)
        ax.errorbar(centres, counts / np.where(norm > 0, norm, 1), yerr=errors, fmt="o", ms=3, color=colour,
                    label=f"{name} (test), KS p = {p:.3g}")
    ax.set(xlabel=f"{signal} score", ylabel="normalised density", yscale="log",
           title="Score distributions: training vs test")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return pvalues
