"""Networks of the hail plugin: the storm-patch CNN of Gagne et al. (2019) and an MLP for storm-object tables."""
from __future__ import annotations

import torch
from torch import nn


class GagneCNN(nn.Module):
    """Conv blocks of `kernel_size` filters (5x5: 32, 64, 128), each conv + leaky ReLU + 2x2 max-pool, then dropout
    and a dense output layer (Gagne et al. 2019, MWR 147:2827). The L2 penalty of the paper is the optimizer's
    weight decay. `batch_norm` (after each conv) is our addition: it makes the few-epoch default run converge.

    Args:
        input_shape: (fields, rows, cols) of a patch, handed over from the data (one field per `data.variables`).
        widths: filters per block; its length is the depth.
        kernel_size: odd conv kernel ("same" padding).
        dropout: before the output layer.
        negative_slope: of the leaky ReLU.
        batch_norm: batch normalisation after each conv.
        num_outputs: 2 logits (classification) or mean and log-variance (Gaussian regression).
    """

    def __init__(self, input_shape: tuple[int, int, int] = (10, 32, 32), widths: tuple[int, ...] = (32, 64, 128),
                 kernel_size: int = 5, dropout: float = 0.3, negative_slope: float = 0.2, batch_norm: bool = True,
                 num_outputs: int = 2):
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"model.input_shape: expected (fields, rows, cols), got {tuple(input_shape)}")
        if kernel_size % 2 == 0:
            raise ValueError(f"model.kernel_size must be odd, got {kernel_size}")
        channels, height, width = (int(n) for n in input_shape)
        if min(height, width) // 2 ** len(widths) < 1:
            raise ValueError(f"model.widths: {len(widths)} pooling blocks shrink a {height}x{width} "
                             "patch below one grid point")
        blocks = []
        for filters in widths:
            blocks += [nn.Conv2d(channels, filters, kernel_size, padding=kernel_size // 2, bias=not batch_norm),
                       *([nn.BatchNorm2d(filters)] if batch_norm else []),
                       nn.LeakyReLU(negative_slope, inplace=True), nn.MaxPool2d(2)]
            channels = filters
        self.features = nn.Sequential(*blocks)
        flat = channels * (height // 2 ** len(widths)) * (width // 2 ** len(widths))
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(flat, num_outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class StormMLP(nn.Module):
    """Fully connected network on per-storm statistics: Linear + leaky ReLU + dropout per hidden layer.
    `input_shape`: (features,), handed over from the data (variables x statistics)."""

    def __init__(self, input_shape: tuple[int] = (36,), hidden: tuple[int, ...] = (64, 32), dropout: float = 0.2,
                 negative_slope: float = 0.2, num_outputs: int = 2):
        super().__init__()
        if len(input_shape) != 1:
            raise ValueError(f"model.input_shape: expected (features,), got {tuple(input_shape)}")
        layers, width = [], int(input_shape[0])
        for h in hidden:
            layers += [nn.Linear(width, h), nn.LeakyReLU(negative_slope, inplace=True), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, num_outputs))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
