"""A U-Net-like encoder-decoder for climate fields, with an optional auto-encoder branch for semi-supervised
training (Racah et al. 2017; Kurth et al. 2017): the reconstruction decoder sees only the bottleneck, so the shared
encoder must learn features that describe the whole field, labelled or not.

Fully convolutional: any grid is accepted (a global field or a regional crop of another size). Inputs are padded to a
multiple of the network stride by edge replication and the outputs cropped back to the input grid.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def conv_block(c_in: int, c_out: int, dropout: float = 0.0) -> nn.Sequential:
    layers = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
              nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
    if dropout:
        layers.append(nn.Dropout2d(dropout))
    return nn.Sequential(*layers)


class ClimateUNet(nn.Module):
    """Encoder-decoder segmentation network.

    Args:
        input_shape: one row's shape (variables, lat, lon), handed over by sciml from the data; only the number of
            variables binds the network (any grid is segmented).
        num_classes: output classes (background, TC, AR: 3).
        widths: channels per resolution level; len(widths) - 1 down-samplings by 2.
        reconstruction: also return `reconstruction`, the input rebuilt from the bottleneck alone.
        dropout: spatial dropout after the bottleneck.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int = 3, widths: Sequence[int] = (16, 32, 64),
                 reconstruction: bool = False, dropout: float = 0.0):
        super().__init__()
        in_channels = int(input_shape[0])
        widths = list(widths)
        if len(widths) < 2:
            raise ValueError(f"model.widths needs at least two levels, got {widths}")
        self.stride = 2 ** (len(widths) - 1)
        self.encoder = nn.ModuleList([conv_block(in_channels, widths[0])] + [
            conv_block(a, b, dropout if i == len(widths) - 2 else 0.0) for i, (a, b) in
            enumerate(zip(widths[:-1], widths[1:]))])
        self.up = nn.ModuleList([nn.ConvTranspose2d(b, a, 2, stride=2) for a, b in zip(widths[:-1], widths[1:])])
        self.decoder = nn.ModuleList([conv_block(2 * a, a) for a in widths[:-1]])
        self.head = nn.Conv2d(widths[0], num_classes, 1)
        self.reconstruction = None
        if reconstruction:  # no skip connections: the bottleneck alone must describe the field
            rec = []
            for a, b in zip(reversed(widths[:-1]), reversed(widths[1:])):
                rec += [nn.ConvTranspose2d(b, a, 2, stride=2), nn.BatchNorm2d(a), nn.ReLU(inplace=True),
                        nn.Conv2d(a, a, 3, padding=1)]
            rec += [nn.ReLU(inplace=True), nn.Conv2d(widths[0], in_channels, 1)]
            self.reconstruction = nn.Sequential(*rec)

    def _pad(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        h, w = x.shape[-2:]
        ph, pw = -h % self.stride, -w % self.stride
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        return x, h, w

    def forward(self, x: torch.Tensor):
        x, h, w = self._pad(x)
        skips = []
        for i, block in enumerate(self.encoder):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        bottleneck = skips.pop()
        y = bottleneck
        for up, block in zip(reversed(self.up), reversed(self.decoder)):
            y = block(torch.cat([up(y), skips.pop()], dim=1))
        logits = self.head(y)[..., :h, :w]
        if self.reconstruction is None:
            return logits
        return {"logits": logits, "reconstruction": self.reconstruction(bottleneck)[..., :h, :w]}
