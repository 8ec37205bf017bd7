"""Distributed training: the hybrid strategy (synchronous groups, averaging across groups) and communication
accounting.

`setup()` (called once by `python -m sciml` before Hydra starts; nothing happens at import) registers
`HybridStrategy` in Lightning's strategy registry, so that `Trainer(strategy="hybrid")` works (with its default
arguments; pass an instance for others), and installs the Hydra-aware launch of DDP ranks
(`sciml.distributed.launch`: the ranks Lightning starts run this job, not the sweep).
"""
from pytorch_lightning.strategies import StrategyRegistry

from sciml.distributed.comm import CROSS_KEY, INTRA_KEY, CommStats
from sciml.distributed.hybrid import HybridStrategy
from sciml.distributed.launch import install as _install_launch


def setup() -> None:
    """Register the hybrid strategy with Lightning and patch Lightning's DDP launcher for Hydra (idempotent)."""
    if HybridStrategy.strategy_name not in StrategyRegistry:
        HybridStrategy.register_strategies(StrategyRegistry)
    _install_launch()


__all__ = ["CROSS_KEY", "INTRA_KEY", "CommStats", "HybridStrategy", "setup"]
