"""Communication accounting: a counting DDP gradient hook and the `CommStats` callback that logs the totals.

What is counted is the payload handed to each all-reduce (the tensor's bytes), measured where the collective is
issued. It is independent of the all-reduce algorithm (a ring moves about 2(n-1)/n times the payload per rank), so
runs with different strategies compare directly. Collectives over a single rank move nothing and count zero. The
one-off broadcasts that line up the replicas at setup (DDP's and the hybrid strategy's) are not training traffic
and are not counted.
"""
# No `from __future__ import annotations` here: DDP checks the hook's annotations at registration and wants the
# real dist.GradBucket / torch.futures.Future, not strings.
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.utilities.rank_zero import rank_zero_warn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

INTRA_KEY = "comm/intra_group_bytes"
CROSS_KEY = "comm/cross_group_bytes"


class GradientAllReduceCounter:
    """State of `counting_allreduce_hook`: the process group DDP reduces over and the bytes sent so far."""

    def __init__(self, process_group: dist.ProcessGroup | None):
        self.process_group = process_group  # None: the world
        self.counts = dist.get_world_size(process_group) > 1
        self.bytes = 0


def counting_allreduce_hook(
    state: GradientAllReduceCounter, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """DDP's default gradient averaging (`allreduce_hook`), plus a count of the bytes of each bucket reduced."""
    if state.counts:
        buffer = bucket.buffer()
        state.bytes += buffer.numel() * buffer.element_size()
    return default_hooks.allreduce_hook(state.process_group, bucket)


def count_gradient_allreduce(model: DistributedDataParallel) -> GradientAllReduceCounter:
    """Register the counting hook on a DDP module (before its first backward) and return its counter.

    Registered directly on the module it works on every device and backend (gloo on CPU included); it is only
    Lightning's `ddp_comm_hook` plumbing that skips non-CUDA devices.
    """
    counter = GradientAllReduceCounter(model.process_group)
    model.register_comm_hook(counter, counting_allreduce_hook)
    return counter


class CommStats(pl.Callback):
    """Logs `comm/intra_group_bytes` and `comm/cross_group_bytes` (per-rank totals of this fit) at each training
    epoch end.

    A strategy that counts its own traffic exposes `comm_stats()` (`HybridStrategy` does) and is read as is. For
    any other DDP-wrapped model (`strategy=ddp`, or `auto` on several devices) the callback registers the counting
    gradient hook itself at fit start and reports 0 cross-group bytes, so DDP and hybrid runs compare directly. A
    single-device run communicates nothing and reports zeros. If the DDP module already has a communication hook
    (e.g. a compression hook configured on CUDA) it cannot be counted without replacing it; intra-group bytes are
    then left out with a warning.
    """

    def __init__(self):
        self._source = None  # the strategy's own comm_stats, when it has one
        self._counter: GradientAllReduceCounter | None = None
        self._measures_intra = True

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After the strategy's setup (the model is wrapped) and before the first backward, as hooks require.
        strategy = trainer.strategy
        self._source, self._counter, self._measures_intra = None, None, True
        if callable(getattr(strategy, "comm_stats", None)):
            self._source = strategy.comm_stats
        elif isinstance(strategy.model, DistributedDataParallel):
            if strategy.model._comm_hooks:
                self._measures_intra = False
                rank_zero_warn("CommStats: the DDP module already has a communication hook; "
                               f"{INTRA_KEY} is not measured in this run.")
            else:
                self._counter = count_gradient_allreduce(strategy.model)

    def stats(self) -> dict[str, float]:
        if self._source is not None:
            return self._source()
        stats = {CROSS_KEY: 0.0}
        if self._measures_intra:
            stats[INTRA_KEY] = float(self._counter.bytes) if self._counter is not None else 0.0
        return stats

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for key, value in self.stats().items():
            # Per-rank totals, equal on every rank of these symmetric strategies: rank 0 reports, no reduction.
            pl_module.log(key, value, on_step=False, on_epoch=True, rank_zero_only=True)
