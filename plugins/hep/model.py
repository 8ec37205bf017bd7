"""The network of Kurth et al. 2017 / NERSC hep_cnn_benchmark: units of conv + ReLU + 2x2 max-pool, no batch
norm, dropout, a small fully connected head. Depth, widths, kernel size and dropout are configuration, so that
architecture searches can vary them."""
from __future__ import annotations

import torch
from torch import nn


class KurthCNN(nn.Module):
    """
    Args:
        in_channels: image channels (3: EM energy, hadronic energy, track multiplicity).
        image_size: height = width of the input images.
        widths: filters of each conv unit; its length is the depth.
        kernel_size: odd conv kernel size ("same" padding keeps the pooling arithmetic simple).
        hidden: width of the fully connected layer (0: none).
        dropout: before each fully connected layer.
        num_classes: output logits.
    """

    def __init__(self, in_channels: int = 3, image_size: int = 40, widths: tuple[int, ...] = (64, 128, 128),
                 kernel_size: int = 3, hidden: int = 128, dropout: float = 0.5, num_classes: int = 2):
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"model.kernel_size must be odd, got {kernel_size}")
        if image_size // 2 ** len(widths) < 1:
            raise ValueError(f"model.widths: {len(widths)} pooling units shrink a {image_size}x{image_size} "
                             "image below one pixel")
        units, channels = [], in_channels
        for width in widths:
            units += [nn.Conv2d(channels, width, kernel_size, padding=kernel_size // 2), nn.ReLU(inplace=True),
                      nn.MaxPool2d(2)]
            channels = width
        self.features = nn.Sequential(*units)
        flat = channels * (image_size // 2 ** len(widths)) ** 2
        head = [nn.Flatten(), nn.Dropout(dropout)]
        if hidden:
            head += [nn.Linear(flat, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout)]
        head.append(nn.Linear(hidden or flat, num_classes))
        self.head = nn.Sequential(*head)
        for m in self.modules():  # He initialisation, as in the reference
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
