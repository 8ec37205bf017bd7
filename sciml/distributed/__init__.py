"""Distributed training: the hybrid strategy (synchronous groups, averaging across groups) and communication
accounting.

Importing this package registers `HybridStrategy` in Lightning's strategy registry, so that
`Trainer(strategy="hybrid")` works (with its default arguments; pass an instance for others).
"""
from pytorch_lightning.strategies import StrategyRegistry

from sciml.distributed.comm import CROSS_KEY, INTRA_KEY, CommStats
from sciml.distributed.hybrid import HybridStrategy

if HybridStrategy.strategy_name not in StrategyRegistry:
    HybridStrategy.register_strategies(StrategyRegistry)

__all__ = ["CROSS_KEY", "INTRA_KEY", "CommStats", "HybridStrategy"]
