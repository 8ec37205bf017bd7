"""Overlays of truth and prediction on the MR image: a quick visual check of each predicted case."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from sciml_plugins.tumor.reader import REGIONS, Case


def overlay(case: Case, prediction: np.ndarray, path: Path, channel_name: str, n_slices: int = 3) -> None:
    """The axial slices with the most tumour (in truth, else in the prediction): the first modality in grey,
    contours of truth (solid) and prediction (dashed) for whole tumour, core and enhancing tumour. Shown in
    radiological convention (the patient's right on the image's left), anterior up."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import nibabel as nib

    # choose the slices in the file's own axial order, show them reoriented to RAS when axis 2 stays axial
    truth = case.y
    amount = ((truth if truth is not None else prediction) > 0).sum((0, 1))
    chosen = np.sort(np.argsort(amount, kind="stable")[::-1][:n_slices])
    to_ras = nib.orientations.ornt_transform(nib.orientations.io_orientation(case.affine),
                                             nib.orientations.axcodes2ornt("RAS"))
    if to_ras[2, 0] != 2:  # an oblique or non-axial third axis: show the array as it is
        to_ras = np.array([[0, 1], [1, 1], [2, 1]])

    def ras(volume, z):
        if volume is None:
            return None
        return nib.orientations.apply_orientation(volume[:, :, z:z + 1], to_ras)[:, :, 0]

    colours = {"wt": "#2ca02c", "tc": "#ff7f0e", "et": "#d62728"}
    fig, axes = plt.subplots(1, len(chosen), figsize=(4 * len(chosen), 4.6), squeeze=False)
    for ax, z in zip(axes[0], chosen):
        ax.imshow(ras(case.x[0], z).T, cmap="gray", origin="lower")
        for region, classes in REGIONS.items():
            for volume, style in ((ras(truth, z), "solid"), (ras(prediction, z), "dashed")):
                if volume is None:
                    continue
                mask = np.isin(volume, classes).T.astype(float)
                if mask.any():
                    ax.contour(mask, levels=[0.5], colors=colours[region], linestyles=style, linewidths=1.2)
        ax.invert_xaxis()  # radiological convention
        ax.set_title(f"axial slice {int(z) + case.offset[2]}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.text(0.02, 0.5, "R", transform=ax.transAxes, color="w", fontsize=9)
        ax.text(0.95, 0.5, "L", transform=ax.transAxes, color="w", fontsize=9)
    handles = [plt.Line2D([], [], color=c, label=r.upper()) for r, c in colours.items()]
    handles += [plt.Line2D([], [], color="k", linestyle="solid", label="truth"),
                plt.Line2D([], [], color="k", linestyle="dashed", label="prediction")]
    fig.legend(handles=handles, loc="lower center", ncol=5, fontsize=8, frameon=False)
    fig.suptitle(f"{case.name}: {channel_name.rstrip('*')} with tumour contours", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)
