"""Input normalisation fitted once on the training rows and applied on the device.

A normaliser is an `nn.Module` whose buffers are its statistics: checkpoints carry them (through the datamodule's
state), a test-only or predict run applies them unchanged, and an exported network can include it. Statistics are
accumulated block by block (bounded memory) and summed or maximised across ranks, so each rank reads only its own
training shard.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn


class Normalizer(nn.Module):
    """Per-channel (axis 1) statistics. Subclasses declare `reductions` (statistic -> 'sum' or 'max'), compute
    them for one block in `partial`, and turn the totals into buffers in `finish`."""

    reductions: dict[str, str] = {}

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels

    @property
    def fitted(self) -> bool:
        return all(bool(torch.isfinite(b).all()) for b in self.buffers())

    def partial(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return {}

    def finish(self, totals: dict[str, np.ndarray]) -> None:
        pass

    def fit(self, blocks, reduce: Callable[[np.ndarray, str], np.ndarray] | None = None) -> None:
        """Accumulate over `blocks` (arrays (n, C, ...)), reduce across ranks with `reduce(value, op)`, finish."""
        totals: dict[str, np.ndarray] = {}
        for x in blocks:
            for key, value in self.partial(np.asarray(x, dtype=np.float64)).items():
                op = self.reductions[key]
                totals[key] = value if key not in totals else (
                    totals[key] + value if op == "sum" else np.maximum(totals[key], value))
        for key, op in self.reductions.items():
            value = totals.get(key, np.full(self.channels, -np.inf if op == "max" else 0.0))
            totals[key] = reduce(value, op) if reduce else value
        self.finish(totals)

    @staticmethod
    def _view(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return v.to(device=x.device, dtype=x.dtype).view(1, -1, *([1] * (x.ndim - 2)))


def _channel_axes(x: np.ndarray) -> tuple[int, ...]:
    return (0, *range(2, x.ndim))


class Identity(Normalizer):
    """No normalisation (`data.normalize: none`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class MaxScale(Normalizer):
    """Each channel divided by its training maximum (calorimeter energies: zero stays zero)."""

    reductions = {"max": "max"}

    def __init__(self, channels: int):
        super().__init__(channels)
        self.register_buffer("maximum", torch.full((channels,), float("nan")))

    def partial(self, x):
        return {"max": x.max(axis=_channel_axes(x))}

    def finish(self, totals):
        self.maximum.copy_(torch.as_tensor(totals["max"], dtype=torch.float32))

    def forward(self, x):
        scale = torch.where(self.maximum > 0, 1.0 / self.maximum, torch.ones_like(self.maximum))
        return x * self._view(x, scale)


class Standardize(Normalizer):
    """Each channel centred and scaled by its training mean and standard deviation (a constant channel is only
    centred)."""

    reductions = {"sum": "sum", "sumsq": "sum", "count": "sum"}

    def __init__(self, channels: int):
        super().__init__(channels)
        self.register_buffer("mean", torch.full((channels,), float("nan")))
        self.register_buffer("std", torch.full((channels,), float("nan")))

    def partial(self, x):
        axes = _channel_axes(x)
        count = np.full(x.shape[1], x.size // x.shape[1], dtype=np.float64)
        return {"sum": x.sum(axis=axes), "sumsq": (x ** 2).sum(axis=axes), "count": count}

    def finish(self, totals):
        count = np.maximum(totals["count"], 1)
        mean = totals["sum"] / count
        std = np.sqrt(np.maximum(totals["sumsq"] / count - mean ** 2, 0.0))
        self.mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.std.copy_(torch.as_tensor(np.where(std > 0, std, 1.0), dtype=torch.float32))

    def forward(self, x):
        return (x - self._view(x, self.mean)) / self._view(x, self.std)


NORMALIZERS: dict[str, type[Normalizer]] = {"none": Identity, "max": MaxScale, "standard": Standardize}
