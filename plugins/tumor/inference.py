"""Whole-volume inference with the post-processing BraTS pipelines commonly use: small islands removed.

A glioma is one lesion (occasionally a few large ones); isolated specks of predicted tumour far from it are
false positives, most often in anatomy that a small training set covers thinly (skull base, cerebellum). After the
wrapped MONAI inferer has segmented the volume, connected components of the whole tumour (26-connectivity)
smaller than `min_fraction` of the largest are set to background: 1 keeps the largest component only (the plugin's
default), 0.1 also keeps satellites of at least a tenth of its size, 0 keeps everything. The change is made to the logits, so that
metrics, loss and the written predictions all see the same segmentation.
"""
from __future__ import annotations

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from scipy import ndimage


class IslandRemovingInferer:
    """
    Args:
        inferer: a MONAI inferer (or its config), e.g. SliceInferer for a 2-D network on 3-D volumes.
        min_fraction: components of the whole tumour smaller than this share of the largest are removed
            (0: keep everything).
    """

    def __init__(self, inferer, min_fraction: float = 1.0):
        if not 0 <= min_fraction <= 1:
            raise ValueError(f"task.inferer.min_fraction must be in [0, 1], got {min_fraction}")
        self.inferer = instantiate(inferer) if isinstance(inferer, (DictConfig, dict)) else inferer
        self.min_fraction = min_fraction

    def __call__(self, inputs: torch.Tensor, network) -> torch.Tensor:
        logits = self.inferer(inputs, network)
        if self.min_fraction <= 0:
            return logits
        tumour = (logits.argmax(1) > 0).cpu().numpy()
        remove = np.zeros_like(tumour)
        for i, volume in enumerate(tumour):  # one case per batch row
            remove[i] = small_islands(volume, self.min_fraction)
        if remove.any():
            drop = torch.from_numpy(remove).to(logits.device)
            logits = logits.clone()
            background = logits[:, 0]
            background[drop] = logits.amax(1)[drop] + 1.0  # background becomes the argmax there
        return logits


def small_islands(mask: np.ndarray, min_fraction: float) -> np.ndarray:
    """Voxels of the connected components of `mask` smaller than `min_fraction` of the largest one."""
    labels, n = ndimage.label(mask, structure=np.ones((3,) * mask.ndim))
    if n <= 1:
        return np.zeros_like(mask, dtype=bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    small = sizes < min_fraction * sizes.max()
    small[0] = False
    return small[labels]
