"""Hybrid data parallelism: synchronous inside groups of ranks, periodic or asynchronous averaging across groups.

After Kurth et al., "Deep Learning at 15PF" (SC17): the ranks are split into groups of `group_size` consecutive
ranks (group k holds ranks k*g ... k*g+g-1; with one group per node or per few nodes, the fast links carry the
per-step traffic).

* **Inside a group** every step is plain synchronous data parallelism: the model is wrapped in DDP over the
  group's process group, so the gradients are averaged in DDP's bucketed all-reduce, overlapped with backward.
  All ranks of a group therefore hold the same parameters after every step.
* **Across groups** the groups train independently and exchange every `sync_period` optimizer steps. The
  exchange averages the trainable parameters and the floating-point buffers (e.g. BatchNorm statistics) over the
  *cross group* of the rank: the ranks with the same index in every group ({j, j+g, j+2g, ...}). Since the ranks
  of a group agree, this gives the same parameters as averaging over the whole world, while each rank talks to
  only world/g peers and the g cross groups run side by side. (Buffers keep DDP's semantics: inside a group the
  group's first rank is authoritative at the next forward.) Integer buffers, such as BatchNorm's batch counter,
  are counters equal on all ranks and are left alone.

  - `mode="periodic"`: at step t (t a multiple of `sync_period`) the all-reduce blocks and every rank continues
    from the average: w <- mean over groups of w_t.
  - `mode="async"`: at step t the all-reduce of a flat copy of w_t is started with `async_op=True` and training
    goes on. At the end of the next optimizer step, t+1, the result is waited for and applied, keeping the local
    update of step t+1:

        w <- w_{t+1} + (mean over groups of w_t - w_t)

    i.e. the step-t snapshot is replaced by its cross-group average and the progress made since is kept. The
    exchange is applied exactly one step late, never earlier, so that a run does not depend on timing and is
    reproducible. A pending exchange is also applied (with the same rule, at the current weights) before a
    checkpoint is written and when training ends, so a checkpoint never holds half an exchange.

* **Optimizer state stays local.** Momentum and Adam moments are not averaged, as in post-local SGD (Lin et al.
  2020, PyTorch's `PeriodicModelAverager`): they are already averages of the group's gradients, averaging them
  would double or triple the exchanged bytes, and each group's momentum describes the trajectory that group is
  on. Within a group they agree anyway, since the group's ranks see the same averaged gradients.

**Checkpoints** hold the step counter (so the exchange schedule continues) and, since the groups differ between
exchanges, one replica of the model and optimizer state per group: Lightning's own state is group 0's, the others
are gathered from the groups' first ranks. On resume every rank loads its group's replica, so a resumed run
continues exactly as the uninterrupted run would have. (Like any Lightning checkpoint, it must be written by all
ranks together, as `ModelCheckpoint` does.)

With `group_size == world_size` there is one group, DDP runs over the world and nothing else happens: the
strategy is plain DDP. The exchanges are done by the strategy itself after each real optimizer step
(`optimizer_step`, which Lightning calls once per accumulated step), not through Lightning's DDP comm-hook
arguments, which Lightning 2.6 ignores on CPU. Communicated bytes are counted where they are sent
(`comm_stats()`, see `sciml.distributed.comm`).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning_utilities.core.apply_func import apply_to_collection
from pytorch_lightning.overrides.distributed import _sync_module_states
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from sciml.distributed.comm import CROSS_KEY, INTRA_KEY, GradientAllReduceCounter, count_gradient_allreduce

MODES = ("periodic", "async")
CHECKPOINT_KEY = "hybrid_strategy"


def group_layout(world_size: int, group_size: int) -> tuple[list[list[int]], list[list[int]]]:
    """The synchronous groups (consecutive ranks) and the cross groups (same index in every group)."""
    if group_size < 1 or world_size % group_size:
        raise ValueError(f"HybridStrategy: group_size={group_size} must be a positive divisor of the world size "
                         f"({world_size} processes = num_nodes x devices)")
    groups = [list(range(start, start + group_size)) for start in range(0, world_size, group_size)]
    cross = [list(range(index, world_size, group_size)) for index in range(group_size)]
    return groups, cross


@dataclass
class _PendingExchange:
    """An asynchronous cross-group all-reduce in flight: one flat tensor per dtype."""

    works: list[dist.Work]
    snapshots: list[Tensor]  # w_t, flattened
    sums: list[Tensor]  # becomes the sum over the cross group of w_t once the works complete


class HybridStrategy(DDPStrategy):
    """DDP inside groups of `group_size` ranks, model averaging across groups every `sync_period` optimizer steps
    (`mode` "periodic": blocking; "async": overlapped with the next step). See the module docstring for the exact
    rules. Other keyword arguments are DDPStrategy's (`process_group_backend`, `find_unused_parameters`, ...)."""

    strategy_name = "hybrid"

    def __init__(self, group_size: int = 1, sync_period: int = 4, mode: Literal["periodic", "async"] = "periodic",
                 **kwargs: Any):
        for unsupported in ("ddp_comm_state", "ddp_comm_hook", "ddp_comm_wrapper", "model_averaging_period",
                            "process_group"):
            if kwargs.get(unsupported) is not None:
                raise ValueError(f"HybridStrategy: {unsupported} is not supported; the strategy owns the DDP "
                                 "process group, the gradient hook and the model averaging")
        if not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"HybridStrategy: group_size must be a positive integer, got {group_size!r}")
        if not isinstance(sync_period, int) or sync_period < 1:
            raise ValueError(f"HybridStrategy: sync_period must be an integer >= 1, got {sync_period!r}")
        if mode not in MODES:
            raise ValueError(f"HybridStrategy: mode must be one of {', '.join(MODES)}, got {mode!r}")
        super().__init__(**kwargs)
        self.group_size = group_size
        self.sync_period = sync_period
        self.mode = mode
        self._intra_group: dist.ProcessGroup | None = None  # None: the world
        self._cross_group: dist.ProcessGroup | None = None  # None: no other group to exchange with
        self._groups_ready = False
        self._replicas_restored = False  # set by load_checkpoint: every group loaded its own weights
        self._num_groups = 1
        self._steps = 0  # optimizer steps taken; an exchange follows every sync_period-th
        self._pending: _PendingExchange | None = None
        self._intra_counter: GradientAllReduceCounter | None = None
        self._cross_bytes = 0

    @classmethod
    def register_strategies(cls, strategy_registry) -> None:
        strategy_registry.register(cls.strategy_name, cls, description="DDP inside groups of ranks, periodic or "
                                   "asynchronous model averaging across groups (sciml)")

    # ---- setup ------------------------------------------------------------------------------------------------

    def _configure_launcher(self) -> None:
        # Runs in the launching process when the Trainer is built: a bad group size fails before any spawn.
        group_layout(self.num_nodes * self.num_processes, self.group_size)
        super()._configure_launcher()

    def setup_distributed(self) -> None:
        super().setup_distributed()
        if self._groups_ready:  # fit, test and predict of one Trainer share the groups
            return
        world = dist.get_world_size()
        groups, cross = group_layout(world, self.group_size)
        self._num_groups = len(groups)
        # Every rank must take part in creating every group, in the same order. A group of all ranks is the world.
        self._intra_group = self._subgroup(groups)
        self._cross_group = self._subgroup(cross) if self._num_groups > 1 else None
        self._groups_ready = True

    @staticmethod
    def _subgroup(layout: list[list[int]]) -> dist.ProcessGroup | None:
        rank, mine = dist.get_rank(), None
        for ranks in layout:
            group = None if len(ranks) == dist.get_world_size() else dist.new_group(ranks)
            if rank in ranks:
                mine = group
        return mine

    def _setup_model(self, model: torch.nn.Module) -> DistributedDataParallel:
        if self._num_groups > 1 and not self._replicas_restored:
            # DDP lines up the replicas of a group only; start every group from rank 0's weights (unless each group
            # has just loaded its own replica from a checkpoint).
            _sync_module_states(model)
        self._replicas_restored = False
        self._ddp_kwargs["process_group"] = self._intra_group
        return super()._setup_model(model)

    def configure_ddp(self) -> None:
        super().configure_ddp()
        self._intra_counter = count_gradient_allreduce(self.model)

    # ---- the exchange -----------------------------------------------------------------------------------------

    def optimizer_step(self, optimizer: torch.optim.Optimizer, closure: Callable[[], Any],
                       model=None, **kwargs: Any) -> Any:
        """The optimizer step (Lightning calls this once per real step, after gradient accumulation), then the
        cross-group work due at this step: apply the exchange started one step ago, start this step's."""
        output = super().optimizer_step(optimizer, closure, model, **kwargs)
        self._steps += 1
        if self._num_groups > 1:
            self.finish_exchange()
            if self._steps % self.sync_period == 0:
                self._exchange()
        return output

    def _exchange(self) -> None:
        tensors = self._exchanged_tensors()
        flats = [_flatten(group) for group in tensors]
        self._cross_bytes += sum(flat.numel() * flat.element_size() for flat in flats)
        if self.mode == "periodic":
            for flat in flats:
                dist.all_reduce(flat, group=self._cross_group)
            for group, flat in zip(tensors, flats):
                _unflatten_into(flat.div_(self._num_groups), group)
        else:
            sums = [flat.clone() for flat in flats]
            works = [dist.all_reduce(total, group=self._cross_group, async_op=True) for total in sums]
            self._pending = _PendingExchange(works, flats, sums)

    def finish_exchange(self) -> None:
        """Wait for a pending asynchronous exchange and apply it: w <- w + (mean of the snapshots - snapshot)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        for work in pending.works:
            work.wait()
        for group, snapshot, total in zip(self._exchanged_tensors(), pending.snapshots, pending.sums):
            current = _flatten(group)
            _unflatten_into(current.add_(total.div_(self._num_groups).sub_(snapshot)), group)

    def _exchanged_tensors(self) -> list[list[Tensor]]:
        """Trainable parameters and floating-point buffers, grouped by dtype (one flat all-reduce per dtype)."""
        module = self.lightning_module
        tensors = [p for p in module.parameters() if p.requires_grad]
        tensors += [b for b in module.buffers() if b.is_floating_point()]
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for tensor in tensors:
            by_dtype.setdefault(tensor.dtype, []).append(tensor)
        return list(by_dtype.values())

    def comm_stats(self) -> dict[str, float]:
        """Bytes this rank handed to all-reduces in this fit: DDP's gradient buckets inside the group, and the
        flat parameter/buffer tensors of the cross-group exchanges."""
        intra = self._intra_counter.bytes if self._intra_counter is not None else 0
        return {INTRA_KEY: float(intra), CROSS_KEY: float(self._cross_bytes)}

    # ---- lifecycle and checkpoints ----------------------------------------------------------------------------

    def on_train_end(self) -> None:
        self.finish_exchange()  # the trained weights include the last exchange
        super().on_train_end()

    def lightning_module_state_dict(self) -> dict[str, Any]:
        # The first thing a checkpoint takes, on every rank: apply a pending exchange so that the checkpoint holds
        # finished weights and no communication state has to be saved.
        self.finish_exchange()
        return super().lightning_module_state_dict()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        """Called on every rank. Between exchanges the groups hold different weights and optimizer states, and
        Lightning writes only rank 0's (group 0's): the other groups' replicas are gathered from their first ranks
        and stored beside it, so that a resumed run continues every group exactly."""
        state: dict[str, Any] = {"steps": self._steps}
        replicas = self._gather_group_replicas(checkpoint)
        if replicas is not None:
            state["groups"] = replicas[1:]  # group 0's replica is the checkpoint's own state
        checkpoint[CHECKPOINT_KEY] = state
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    def _gather_group_replicas(self, checkpoint: dict[str, Any]) -> list[dict[str, Any]] | None:
        """On rank 0: every group's model and optimizer state, in group order. None elsewhere or with one group."""
        if self._num_groups == 1 or self.global_rank % self.group_size:
            return None
        # The first ranks of the groups form cross group 0, which holds rank 0.
        mine = apply_to_collection({"state_dict": checkpoint["state_dict"],
                                    "optimizer_states": checkpoint.get("optimizer_states")}, Tensor, Tensor.cpu)
        replicas = [None] * self._num_groups if self.global_rank == 0 else None
        dist.gather_object(mine, replicas, dst=0, group=self._cross_group)
        return replicas

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        """Every rank reads the file (before the strategy's setup): it resumes the exchange schedule and takes its
        own group's replica of the model and optimizer state."""
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is None:  # e.g. a DDP checkpoint: every rank starts from the same weights
            return checkpoint
        self._steps = int(state["steps"])
        others = state.get("groups")
        if others is None:
            return checkpoint
        if len(others) + 1 != self._num_groups:
            rank_zero_warn(f"HybridStrategy: the checkpoint holds {len(others) + 1} group replicas but this run has "
                           f"{self._num_groups} groups; every group resumes from group 0's replica")
            return checkpoint
        group = self.global_rank // self.group_size
        if group > 0:
            replica = others[group - 1]
            checkpoint["state_dict"] = replica["state_dict"]
            if replica["optimizer_states"] is not None:
                checkpoint["optimizer_states"] = replica["optimizer_states"]
        trainer = self.lightning_module._trainer if self.lightning_module is not None else None
        self._replicas_restored = trainer is not None and trainer.state.fn == TrainerFn.FITTING
        return checkpoint

    def teardown(self) -> None:
        # After an exception a peer may never complete the exchange: drop it rather than wait.
        self._pending = None
        super().teardown()


def _flatten(tensors: list[Tensor]) -> Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


@torch.no_grad()
def _unflatten_into(flat: Tensor, tensors: list[Tensor]) -> None:
    offset = 0
    for tensor in tensors:
        tensor.copy_(flat[offset:offset + tensor.numel()].view_as(tensor))
        offset += tensor.numel()
