"""Figures a run leaves in plots/ (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_roc(fpr: np.ndarray, tpr: np.ndarray, path: Path, signal: str = "signal", background: str = "background"):
    """The ROC curve twice: linear, and as HEP quotes it — background rejection against signal efficiency."""
    auc = np.trapezoid(tpr, fpr)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.8))
    left.plot(fpr, tpr, label=f"AUC = {auc:.4f}")
    left.plot([0, 1], [0, 1], ls=":", c="grey")
    left.set(xlabel=f"{background} efficiency", ylabel=f"{signal} efficiency", title="ROC")
    left.legend(loc="lower right")
    keep = fpr > 0
    right.semilogy(tpr[keep], 1.0 / fpr[keep])
    right.set(xlabel=f"{signal} efficiency", ylabel=f"{background} rejection (1 / efficiency)",
              title="Background rejection", xlim=(0, 1))
    right.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
