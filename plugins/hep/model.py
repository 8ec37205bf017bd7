"""The network of Kurth et al. 2017 / NERSC hep_cnn_benchmark: units of conv + ReLU + 2x2 max-pool, no batch
norm, dropout, a small fully connected head. The architecture is configuration, so that architecture searches
(docs/sweeps.md) can vary it: depth and widths (`widths`), kernel sizes (one, or one per unit), pooling kind, batch
norm, the hidden layer and dropout. The defaults build the reference network."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

_POOLS = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}


class KurthCNN(nn.Module):
    """
    Args:
        input_shape: (C, H, W) of one image, handed over from the data (3 channels in the embedded sample: EM
            energy, hadronic energy, track multiplicity).
        widths: filters of each conv unit; its length is the depth.
        kernel_size: odd conv kernel size, or one per unit ("same" padding keeps the pooling arithmetic simple).
        hidden: width of the fully connected layer (0: none).
        dropout: before each fully connected layer.
        num_classes: output logits.
        pool: 2x2 pooling after each unit, "max" (the reference) or "avg".
        batch_norm: batch norm after each conv (the reference has none).
    """

    def __init__(self, input_shape: Sequence[int], widths: Sequence[int] = (64, 128, 128),
                 kernel_size: int | Sequence[int] = 3, hidden: int = 128, dropout: float = 0.5,
                 num_classes: int = 2, pool: str = "max", batch_norm: bool = False):
        super().__init__()
        widths = list(widths)
        if not widths or min(widths) < 1:
            raise ValueError(f"model.widths must be a non-empty list of positive filter counts, got {widths}")
        kernels = [kernel_size] * len(widths) if isinstance(kernel_size, int) else list(kernel_size)
        if len(kernels) != len(widths):
            raise ValueError(f"model.kernel_size has {len(kernels)} entries for {len(widths)} units (model.widths)")
        if any(k % 2 == 0 or k < 1 for k in kernels):
            raise ValueError(f"model.kernel_size must be odd, got {kernel_size}")
        if pool not in _POOLS:
            raise ValueError(f"model.pool must be one of {', '.join(_POOLS)}, got '{pool}'")
        if len(input_shape) != 3:
            raise ValueError(f"model.input_shape must be (channels, height, width), got {list(input_shape)}")
        channels, height, width = (int(n) for n in input_shape)
        if min(height, width) // 2 ** len(widths) < 1:
            raise ValueError(f"model.widths: {len(widths)} pooling units shrink a {height}x{width} "
                             "image below one pixel")
        units = []
        for filters, kernel in zip(widths, kernels):
            units.append(nn.Conv2d(channels, filters, kernel, padding=kernel // 2, bias=not batch_norm))
            if batch_norm:
                units.append(nn.BatchNorm2d(filters))
            units += [nn.ReLU(inplace=True), _POOLS[pool](2)]
            channels = filters
        self.features = nn.Sequential(*units)
        flat = channels * (height // 2 ** len(widths)) * (width // 2 ** len(widths))
        head = [nn.Flatten(), nn.Dropout(dropout)]
        if hidden:
            head += [nn.Linear(flat, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout)]
        head.append(nn.Linear(hidden or flat, num_classes))
        self.head = nn.Sequential(*head)
        for m in self.modules():  # He initialisation, as in the reference
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
