"""Networks on jets as particle clouds, in plain torch: a Particle Flow Network (Deep Sets; Komiske, Metodiev, Thaler
2019) and ParticleNet (EdgeConv on k nearest neighbours; Qu & Gouskos 2020).

Both take rows (B, F + 1, P) from `sciml_plugins.hep.particles.JetParticles`: F features per particle and, last,
the mask (1 real, 0 padding). Masking is exact: padded particles never enter a sum, a mean, a neighbour list or a
batch-norm statistic, so a jet's output does not depend on how much padding it has, what the padding holds, or the
order of its particles.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mask = x[:, -1:] > 0.5  # (B, 1, P)
    return torch.where(mask, x[:, :-1], 0.0), mask.to(x.dtype)  # whatever padding holds (even NaN) is dropped


def _mlp(sizes: Sequence[int], first: int, dropout: float = 0.0) -> tuple[nn.Sequential, int]:
    layers: list[nn.Module] = []
    for size in sizes:
        layers += [nn.Linear(first, size), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        first = size
    return nn.Sequential(*layers), first


class ParticleFlowNetwork(nn.Module):
    """F(sum_i Phi(p_i)): a per-particle network Phi, a sum over the real particles, a jet-level network F.

    Args:
        input_shape: (F + 1, P) from the data (features and the mask; P may differ between files).
        phi_sizes: widths of Phi's layers; the last is the latent dimension l (Komiske et al.: 100, 100, 256).
        f_sizes: widths of F's layers (Komiske et al.: 100, 100, 100).
        dropout: after each of F's layers.
        pool: sum (the PFN: the sum carries the multiplicity) or mean.
        num_classes: output logits.
    """

    def __init__(self, input_shape: Sequence[int], phi_sizes: Sequence[int] = (100, 100, 128),
                 f_sizes: Sequence[int] = (100, 100), dropout: float = 0.0, pool: str = "sum", num_classes: int = 2):
        super().__init__()
        if len(input_shape) != 2 or input_shape[0] < 2:
            raise ValueError(f"model.input_shape must be (features + mask, particles), got {list(input_shape)}")
        if not phi_sizes or min(phi_sizes) < 1 or min(f_sizes, default=1) < 1:
            raise ValueError(f"model.phi_sizes and model.f_sizes must be positive widths, got {list(phi_sizes)}, "
                             f"{list(f_sizes)}")
        if pool not in ("sum", "mean"):
            raise ValueError(f"model.pool must be sum or mean, got '{pool}'")
        self.phi, latent = _mlp(phi_sizes, int(input_shape[0]) - 1)
        self.f, hidden = _mlp(f_sizes, latent, dropout)
        self.out = nn.Linear(hidden, num_classes)
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features, mask = _split(x)
        latent = self.phi(features.transpose(1, 2)) * mask.transpose(1, 2)  # (B, P, l), padding zeroed
        pooled = latent.sum(1)
        if self.pool == "mean":
            pooled = pooled / mask.sum((1, 2)).clamp_min(1.0)[:, None]
        return self.out(self.f(pooled))


def knn(points: torch.Tensor, valid: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest real neighbours of every particle (itself excluded) in `points` (B, P, D) with `valid` (B, P):
    indices (B, P, k) and whether each neighbour is real (B, P, k) — a jet with fewer than k + 1 real particles
    has fewer real neighbours."""
    # the direct formula: cdist's matrix-product shortcut rounds differently with the padding, and may flip ties
    distance = torch.cdist(points, points, compute_mode="donot_use_mm_for_euclid_dist")
    blocked = ~valid[:, None, :] | torch.eye(points.shape[1], dtype=torch.bool, device=points.device)[None]
    nearest, index = distance.masked_fill(blocked, float("inf")).topk(min(k, points.shape[1]), dim=-1,
                                                                       largest=False)
    return index, torch.isfinite(nearest)


class Cloud:
    """A batch of jets as the packed list of its real particles (no padding anywhere in the computation, so padding
    cannot influence anything, batch-norm statistics included): `rows` are the real particles' positions in the
    padded (B * P) layout, `jet` the jet of each."""

    def __init__(self, valid: torch.Tensor):
        self.batch, self.particles = valid.shape
        self.rows = valid.reshape(-1).nonzero().squeeze(1)  # (V,)
        self.jet = torch.div(self.rows, self.particles, rounding_mode="floor")
        self.position = torch.full((valid.numel(),), -1, dtype=torch.long, device=valid.device)
        self.position[self.rows] = torch.arange(len(self.rows), device=valid.device)
        self.valid = valid

    def dense(self, packed: torch.Tensor) -> torch.Tensor:
        """(V, C) -> (B, P, C), zeros at padding."""
        out = packed.new_zeros(self.batch * self.particles, packed.shape[1])
        out[self.rows] = packed
        return out.view(self.batch, self.particles, -1)

    def edges(self, points: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(centre, neighbour) packed indices of the edges to each real particle's k nearest real neighbours."""
        index, real = knn(points, self.valid, k)
        index, real = index.reshape(-1, index.shape[-1])[self.rows], real.reshape(-1, real.shape[-1])[self.rows]
        neighbour = self.position[self.jet[:, None] * self.particles + index]  # (V, k)
        centre = torch.arange(len(self.rows), device=index.device)[:, None].expand_as(index)
        return centre[real], neighbour[real]

    def mean(self, packed: torch.Tensor) -> torch.Tensor:
        """(V, C) -> (B, C): the mean over each jet's real particles (0 for a jet without any)."""
        total = packed.new_zeros(self.batch, packed.shape[1]).index_add_(0, self.jet, packed)
        count = torch.bincount(self.jet, minlength=self.batch).clamp_min(1).to(packed.dtype)
        return total / count[:, None]


class EdgeConv(nn.Module):
    """h_i = ReLU(shortcut(x_i) + mean_j MLP(x_i, x_j - x_i)) over the k nearest real neighbours j of i, on packed
    real particles (V, C). The first layer, W [x_i, x_j - x_i], is computed per particle as (W_c - W_d) x_i + W_d x_j
    and summed on the edges: the same numbers without an (edges, 2C) tensor."""

    def __init__(self, k: int, channels_in: int, widths: Sequence[int]):
        super().__init__()
        self.k = k
        widths = list(widths)
        self.first = nn.Linear(2 * channels_in, widths[0], bias=False)  # bias-free: batch norm follows
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=False) for a, b in zip(widths[:-1], widths[1:]))
        self.norms = nn.ModuleList(nn.BatchNorm1d(w) for w in widths)
        self.shortcut = nn.Linear(channels_in, widths[-1], bias=False)
        self.shortcut_norm = nn.BatchNorm1d(widths[-1])
        self.channels_in, self.channels_out = channels_in, widths[-1]

    def forward(self, cloud: Cloud, points: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        centre, neighbour = cloud.edges(points, self.k)
        w_centre, w_diff = self.first.weight.split(self.channels_in, dim=1)
        own, other = features @ (w_centre - w_diff).t(), features @ w_diff.t()
        h = F.relu(self.norms[0](own[centre] + other[neighbour]))
        for layer, norm in zip(self.layers, self.norms[1:]):
            h = F.relu(norm(layer(h)))
        total = h.new_zeros(len(features), h.shape[1]).index_add_(0, centre, h)
        count = torch.bincount(centre, minlength=len(features)).clamp_min(1).to(h.dtype)
        return F.relu(self.shortcut_norm(self.shortcut(features)) + total / count[:, None])


class ParticleNet(nn.Module):
    """ParticleNet (Qu & Gouskos 2020): EdgeConv blocks on a dynamic k-nearest-neighbour graph — the first in
    (deta, dphi) (input channels 0, 1), the later ones in the previous block's features — then a global average
    over the real particles and a fully connected head. The defaults are ParticleNet-Lite; the full network is
    `k=16 edge_convs=[[64,64,64],[128,128,128],[256,256,256]] fusion=384 fc=[256] dropout=0.1`. Padded particles
    are dropped before the first layer (see `Cloud`).

    Args:
        input_shape: (F + 1, P) from the data.
        k: neighbours per particle.
        edge_convs: widths of each EdgeConv block's layers.
        fusion: concatenate all blocks' outputs and map them to `fusion` channels before pooling (0: none).
        fc: widths of the fully connected layers; dropout after each.
        num_classes: output logits.
    """

    def __init__(self, input_shape: Sequence[int], k: int = 7,
                 edge_convs: Sequence[Sequence[int]] = ((32, 32, 32), (64, 64, 64)), fusion: int = 0,
                 fc: Sequence[int] = (128,), dropout: float = 0.1, num_classes: int = 2):
        super().__init__()
        if len(input_shape) != 2 or input_shape[0] < 3:
            raise ValueError(f"model.input_shape must be (features + mask, particles) with deta, dphi first, got "
                             f"{list(input_shape)}")
        if k < 1 or not edge_convs or any(not widths or min(widths) < 1 for widths in edge_convs):
            raise ValueError(f"model.k must be >= 1 and model.edge_convs non-empty lists of widths, got k={k}, "
                             f"{[list(w) for w in edge_convs]}")
        channels = int(input_shape[0]) - 1
        self.input_norm = nn.BatchNorm1d(channels)
        self.blocks = nn.ModuleList()
        for widths in edge_convs:
            self.blocks.append(EdgeConv(k, channels, widths))
            channels = self.blocks[-1].channels_out
        if fusion:
            self.fusion = nn.Sequential(nn.Linear(sum(b.channels_out for b in self.blocks), fusion, bias=False),
                                        nn.BatchNorm1d(fusion), nn.ReLU())
            channels = fusion
        else:
            self.fusion = None
        head: list[nn.Module] = []
        for width in fc:
            head += [nn.Linear(channels, width), nn.ReLU(), nn.Dropout(dropout)]
            channels = width
        head.append(nn.Linear(channels, num_classes))
        self.head = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features, mask = _split(x)
        cloud = Cloud(mask[:, 0].bool())
        packed = features.transpose(1, 2).reshape(-1, features.shape[1])[cloud.rows]  # (V, F) real particles
        points = cloud.dense(packed[:, :2])  # (deta, dphi)
        h = self.input_norm(packed)
        outputs = []
        for i, block in enumerate(self.blocks):
            h = block(cloud, points if i == 0 else cloud.dense(h), h)
            outputs.append(h)
        if self.fusion is not None:
            h = self.fusion(torch.cat(outputs, dim=-1))
        return self.head(cloud.mean(h))
