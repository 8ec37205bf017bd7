"""Networks of the hail plugin: the storm-patch CNN of Gagne et al. (2019) and an MLP for storm-object tables."""
from __future__ import annotations

import torch
from torch import nn


class GagneCNN(nn.Module):
    """Conv blocks of `kernel_size` filters (5x5: 32, 64, 128), each conv + leaky ReLU + 2x2 max-pool, then dropout
    and a dense output layer (Gagne et al. 2019, MWR 147:2827). The L2 penalty of the paper is the optimizer's
    weight decay. `batch_norm` (after each conv) is our addition: it makes the few-epoch default run converge.

    Args:
        in_channels: input fields (one per entry of `data.variables`).
        image_size: patch height = width (32).
        widths: filters per block; its length is the depth.
        kernel_size: odd conv kernel ("same" padding).
        dropout: before the output layer.
        negative_slope: of the leaky ReLU.
        batch_norm: batch normalisation after each conv.
        num_outputs: 2 logits (classification) or mean and log-variance (Gaussian regression).
    """

    def __init__(self, in_channels: int = 10, image_size: int = 32, widths: tuple[int, ...] = (32, 64, 128),
                 kernel_size: int = 5, dropout: float = 0.3, negative_slope: float = 0.2, batch_norm: bool = True,
                 num_outputs: int = 2):
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"model.kernel_size must be odd, got {kernel_size}")
        if image_size // 2 ** len(widths) < 1:
            raise ValueError(f"model.widths: {len(widths)} pooling blocks shrink a {image_size}x{image_size} "
                             "patch below one grid point")
        blocks, channels = [], in_channels
        for width in widths:
            blocks += [nn.Conv2d(channels, width, kernel_size, padding=kernel_size // 2, bias=not batch_norm),
                       *([nn.BatchNorm2d(width)] if batch_norm else []),
                       nn.LeakyReLU(negative_slope, inplace=True), nn.MaxPool2d(2)]
            channels = width
        self.features = nn.Sequential(*blocks)
        flat = channels * (image_size // 2 ** len(widths)) ** 2
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(flat, num_outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class StormMLP(nn.Module):
    """Fully connected network on per-storm statistics: Linear + leaky ReLU + dropout per hidden layer."""

    def __init__(self, in_features: int = 72, hidden: tuple[int, ...] = (64, 32), dropout: float = 0.2,
                 negative_slope: float = 0.2, num_outputs: int = 2):
        super().__init__()
        layers, width = [], in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.LeakyReLU(negative_slope, inplace=True), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, num_outputs))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
