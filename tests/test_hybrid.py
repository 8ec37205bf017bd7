"""HybridStrategy on real gloo process groups: 2 and 4 CPU processes, a tiny model, a few optimizer steps.

The runs use Lightning's fork launcher (no re-import per process: a few seconds per run). Every rank records its
weights after each optimizer step; a recording subclass of the strategy also keeps the weights that went into
each exchange, so the averages are checked against the values actually averaged.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.strategies import DDPStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sciml.distributed import CROSS_KEY, INTRA_KEY, CommStats, HybridStrategy
from sciml.distributed.hybrid import CHECKPOINT_KEY, group_layout

pytestmark = pytest.mark.timeout(120)  # a hung collective must fail the test, not the CI job

BATCH = 4


# ---- helpers (also used by test_ddp.py) ---------------------------------------------------------------------------

class Tiny(pl.LightningModule):
    """Linear-BatchNorm-Tanh-Linear regression with SGD + momentum. The dataloader is not shuffled, so Lightning's
    DistributedSampler gives every rank its own fixed shard: groups see different data and drift apart between
    exchanges, and every run is reproducible."""

    def __init__(self, steps_per_epoch: int, world_size: int, rank_dependent_init: bool = False):
        super().__init__()
        self.steps_per_epoch, self.world_size = steps_per_epoch, world_size
        self.rank_dependent_init = rank_dependent_init
        self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1))

    def setup(self, stage):
        # Runs on every rank before the strategy wraps the model: lets a test start the ranks from different weights.
        if self.rank_dependent_init:
            with torch.no_grad():
                for p in self.parameters():
                    p.add_(0.1 * self.global_rank)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def train_dataloader(self):
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(self.steps_per_epoch * self.world_size * BATCH, 4, generator=generator)
        y = (x[:, :1] * x[:, 1:2] + x[:, 2:3]).tanh()
        return DataLoader(TensorDataset(x, y), batch_size=BATCH)


def param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def float_buffer_bytes(module: nn.Module) -> int:
    return sum(b.numel() * b.element_size() for b in module.buffers() if b.is_floating_point())


def params_of(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()]).clone()


def buffers_of(module: nn.Module) -> torch.Tensor:
    return torch.cat([b.detach().reshape(-1) for b in module.buffers() if b.is_floating_point()]).clone()


class RecordingHybrid(HybridStrategy):
    """Keeps the weights just before each exchange starts and before each async exchange is applied, keyed by
    optimizer step, so the tests compare the averages with the values that went in."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.before_exchange: dict[int, dict[str, torch.Tensor]] = {}
        self.before_apply: dict[int, dict[str, torch.Tensor]] = {}

    def _weights(self) -> dict[str, torch.Tensor]:
        return {"params": params_of(self.lightning_module), "buffers": buffers_of(self.lightning_module)}

    def _exchange(self) -> None:
        self.before_exchange[self._steps] = self._weights()
        super()._exchange()

    def finish_exchange(self) -> None:
        if self._pending is not None:
            self.before_apply[self._steps] = self._weights()
        super().finish_exchange()


class Recorder(pl.Callback):
    """Per rank: the weights after every optimizer step (exchange included) and whether an async exchange is then
    in flight; at the end the final weights, the momentum, the comm stats. Written to rank{R}.pt."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.start: torch.Tensor | None = None
        self.steps: list[dict] = []

    def on_train_start(self, trainer, pl_module):
        self.start = params_of(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append({"params": params_of(pl_module), "buffers": buffers_of(pl_module),
                           "pending": getattr(trainer.strategy, "_pending", None) is not None})

    def teardown(self, trainer, pl_module, stage):  # after the strategy's on_train_end
        strategy, optimizer = trainer.strategy, trainer.optimizers[0]
        record = {
            "start": self.start,
            "steps": self.steps,
            "final": params_of(pl_module),
            "momentum": torch.cat([optimizer.state[p]["momentum_buffer"].reshape(-1)
                                   for p in pl_module.parameters()]),
            "comm": strategy.comm_stats() if hasattr(strategy, "comm_stats") else None,
            "before_exchange": getattr(strategy, "before_exchange", {}),
            "before_apply": getattr(strategy, "before_apply", {}),
        }
        self.out.mkdir(parents=True, exist_ok=True)
        torch.save(record, self.out / f"rank{trainer.global_rank}.pt")


def fit(out: Path, strategy: DDPStrategy, devices: int, steps_per_epoch: int, epochs: int = 1,
        callbacks: tuple = (), ckpt_path: str | None = None, trainer_kwargs: dict | None = None,
        **model_kwargs) -> tuple[list[dict], pl.Trainer]:
    """Fit `Tiny` on `devices` gloo CPU processes; return each rank's record (in rank order) and the trainer."""
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, max_epochs=epochs, logger=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks), enable_progress_bar=False,
        enable_model_summary=False, callbacks=[Recorder(out), *callbacks], default_root_dir=out,
        **(trainer_kwargs or {}))
    trainer.fit(Tiny(steps_per_epoch, devices, **model_kwargs), ckpt_path=ckpt_path)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(devices)], trainer


def flat_params(state_dict: dict[str, torch.Tensor]) -> torch.Tensor:
    """The parameters of a Tiny state dict, in `parameters()` order (BatchNorm statistics left out)."""
    return torch.cat([t.reshape(-1) for k, t in state_dict.items() if k.endswith(("weight", "bias"))])


def hybrid(**kwargs) -> RecordingHybrid:
    return RecordingHybrid(start_method="fork", **kwargs)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=0, atol=1e-6)


MODEL = Tiny(1, 1)
EXCHANGED_BYTES = param_bytes(MODEL) + float_buffer_bytes(MODEL)  # parameters + BatchNorm running statistics


# ---- construction ---------------------------------------------------------------------------------------------

def test_group_layout():
    groups, cross = group_layout(8, 4)
    assert groups == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert cross == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert group_layout(4, 1) == ([[0], [1], [2], [3]], [[0, 1, 2, 3]])
    assert group_layout(4, 4) == ([[0, 1, 2, 3]], [[0], [1], [2], [3]])


def test_group_size_must_divide_the_world_size():
    with pytest.raises(ValueError, match="group_size=3 must be a positive divisor of the world size .4"):
        pl.Trainer(accelerator="cpu", devices=4, strategy=HybridStrategy(group_size=3), logger=False)


@pytest.mark.parametrize("kwargs, message", [
    ({"sync_period": 0}, "sync_period must be an integer >= 1"),
    ({"group_size": 0}, "group_size must be a positive integer"),
    ({"mode": "sometimes"}, "mode must be one of periodic, async"),
    ({"ddp_comm_hook": lambda state, bucket: None}, "ddp_comm_hook is not supported"),
])
def test_bad_arguments_fail_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HybridStrategy(**kwargs)


def test_registered_as_hybrid():
    from sciml import distributed

    distributed.setup()  # what `python -m sciml` does before Hydra starts
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="hybrid", logger=False)
    assert isinstance(trainer.strategy, HybridStrategy)
    assert (trainer.strategy.group_size, trainer.strategy.sync_period, trainer.strategy.mode) == (1, 4, "periodic")


def test_hybrid_config_instantiates():
    from sciml.run import _strategy

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="sciml.conf", version_base="1.3"):
        cfg = compose("config", overrides=["strategy=hybrid", "strategy.group_size=2", "strategy.mode=async"])
    strategy = _strategy(cfg.strategy)
    assert isinstance(strategy, HybridStrategy)
    assert (strategy.group_size, strategy.sync_period, strategy.mode) == (2, 4, "async")


# ---- multi-process runs ---------------------------------------------------------------------------------------

def test_periodic_sync_inside_groups_every_step_and_across_groups_every_period(tmp_path):
    """4 ranks in 2 groups of 2, exchange every 3 steps, 6 steps."""
    ranks, _ = fit(tmp_path, hybrid(group_size=2, sync_period=3, mode="periodic"), devices=4, steps_per_epoch=6,
                   rank_dependent_init=True)
    # Every rank starts from rank 0's weights, not only the ranks of a group (which DDP itself lines up).
    assert all(torch.equal(r["start"], ranks[0]["start"]) for r in ranks)
    assert all(len(r["steps"]) == 6 for r in ranks)
    assert sorted(ranks[0]["before_exchange"]) == [3, 6]
    for step in range(1, 7):
        p = [r["steps"][step - 1]["params"] for r in ranks]
        # Inside a group: DDP over the group's process group keeps the replicas identical, every step.
        assert torch.equal(p[0], p[1]) and torch.equal(p[2], p[3]), step
        if step % 3:
            assert not close(p[0], p[2]), f"step {step}: groups should have trained apart between exchanges"
            continue
        assert all(torch.equal(p[0], q) for q in p[1:]), f"step {step}: exchange should make all ranks equal"
        for rank, record in enumerate(ranks):
            peers = [ranks[q]["before_exchange"][step] for q in (rank % 2, rank % 2 + 2)]  # its cross group
            after = record["steps"][step - 1]
            assert close(after["params"], (peers[0]["params"] + peers[1]["params"]) / 2)
            assert close(after["buffers"], (peers[0]["buffers"] + peers[1]["buffers"]) / 2)
            assert not close(after["params"], record["before_exchange"][step]["params"])
    # Momentum is not exchanged: equal inside a group, different across groups even right after an exchange.
    assert torch.equal(ranks[0]["momentum"], ranks[1]["momentum"])
    assert not close(ranks[0]["momentum"], ranks[2]["momentum"])
    for record in ranks:
        assert record["comm"] == {INTRA_KEY: 6.0 * param_bytes(MODEL), CROSS_KEY: 2.0 * EXCHANGED_BYTES}


def test_async_applies_the_exchange_one_step_late_keeping_the_local_update(tmp_path):
    """2 ranks, each its own group, async exchange every 2 steps, 6 steps (the last exchange is pending at the
    end and applied when training ends)."""
    ranks, _ = fit(tmp_path, hybrid(group_size=1, sync_period=2, mode="async"), devices=2, steps_per_epoch=6)
    assert sorted(ranks[0]["before_exchange"]) == [2, 4, 6]
    assert sorted(ranks[0]["before_apply"]) == [3, 5, 6]  # 6: applied when training ends
    for record in ranks:
        assert [s["pending"] for s in record["steps"]] == [False, True, False, True, False, True]
    for t in (2, 4):
        mean = sum(r["before_exchange"][t]["params"] for r in ranks) / 2
        for record in ranks:
            sent = record["before_exchange"][t]["params"]
            # Starting the exchange does not touch the weights...
            assert torch.equal(record["steps"][t - 1]["params"], sent)
            # ...one step later: w <- w_{t+1} + (mean of w_t - w_t).
            local = record["before_apply"][t + 1]["params"]
            assert not close(local, sent)  # step t+1 made a local update
            applied = record["steps"][t]["params"]
            assert close(applied, local + (mean - sent))
            assert not close(applied, mean)  # the local update of step t+1 is kept
    # The exchange started at the last step is applied when training ends, with no local step since: every rank
    # ends at the average.
    mean = sum(r["before_exchange"][6]["params"] for r in ranks) / 2
    for record in ranks:
        assert torch.equal(record["before_apply"][6]["params"], record["before_exchange"][6]["params"])
        assert close(record["final"], mean)
    for record in ranks:
        assert record["comm"] == {INTRA_KEY: 0.0, CROSS_KEY: 3.0 * EXCHANGED_BYTES}  # groups of 1: no intra traffic


def test_gradient_accumulation_counts_optimizer_steps_not_batches(tmp_path):
    """8 batches, 2 per optimizer step: 4 steps, so an exchange every 2 steps happens twice."""
    ranks, _ = fit(tmp_path, hybrid(group_size=2, sync_period=2), devices=4, steps_per_epoch=8,
                   trainer_kwargs={"accumulate_grad_batches": 2})
    assert sorted(ranks[0]["before_exchange"]) == [2, 4]
    # The group all-reduces gradients only at the optimizer steps (Lightning skips DDP's sync in between).
    assert ranks[0]["comm"] == {INTRA_KEY: 4.0 * param_bytes(MODEL), CROSS_KEY: 2.0 * EXCHANGED_BYTES}


def test_one_group_is_plain_ddp(tmp_path):
    ddp, _ = fit(tmp_path / "ddp", DDPStrategy(start_method="fork"), devices=2, steps_per_epoch=4)
    one, _ = fit(tmp_path / "hybrid", hybrid(group_size=2, sync_period=1), devices=2, steps_per_epoch=4)
    for a, b in zip(ddp, one):
        assert torch.equal(a["final"], b["final"])
        assert torch.equal(a["momentum"], b["momentum"])
    assert not one[0]["before_exchange"]
    assert one[0]["comm"] == {INTRA_KEY: 4.0 * param_bytes(MODEL), CROSS_KEY: 0.0}


def test_cross_group_bytes_are_one_over_sync_period_of_a_per_step_exchange(tmp_path):
    every, _ = fit(tmp_path / "p1", hybrid(group_size=1, sync_period=1), devices=2, steps_per_epoch=8)
    fourth, trainer = fit(tmp_path / "p4", hybrid(group_size=1, sync_period=4), devices=2, steps_per_epoch=8,
                          callbacks=(CommStats(),))
    assert every[0]["comm"][CROSS_KEY] == 8 * EXCHANGED_BYTES
    assert fourth[0]["comm"][CROSS_KEY] == every[0]["comm"][CROSS_KEY] / 4
    # CommStats logs what the strategy counted.
    assert {key: float(trainer.callback_metrics[key]) for key in (INTRA_KEY, CROSS_KEY)} == fourth[0]["comm"]


def test_resume_from_checkpoint_continues_exactly(tmp_path):
    """Async, exchange every 2 steps, 3 steps per epoch: the epoch-1 checkpoint lies between exchanges (the step
    counter must be restored), the epoch-2 checkpoint is written while an exchange is in flight (it must be
    applied first)."""
    def checkpoint(name):
        return ModelCheckpoint(dirpath=tmp_path / name, filename="last", monitor=None, enable_version_counter=False)

    def strategy():
        return hybrid(group_size=1, sync_period=2, mode="async")

    straight, _ = fit(tmp_path / "a", strategy(), devices=2, steps_per_epoch=3, epochs=2,
                      callbacks=(checkpoint("ckpt_a"),))
    fit(tmp_path / "b", strategy(), devices=2, steps_per_epoch=3, epochs=1, callbacks=(checkpoint("ckpt_b"),))
    first = torch.load(tmp_path / "ckpt_b" / "last.ckpt", weights_only=False)
    assert first[CHECKPOINT_KEY]["steps"] == 3
    # Between exchanges the two groups differ: the checkpoint keeps group 1's replica beside group 0's.
    (group1,) = first[CHECKPOINT_KEY]["groups"]
    assert not close(flat_params(group1["state_dict"]), flat_params(first["state_dict"]))
    assert group1["optimizer_states"][0]["state"]  # its momentum
    resumed, _ = fit(tmp_path / "c", strategy(), devices=2, steps_per_epoch=3, epochs=2,
                     callbacks=(checkpoint("ckpt_c"),), ckpt_path=str(tmp_path / "ckpt_b" / "last.ckpt"))
    assert sorted(resumed[0]["before_exchange"]) == [4, 6]  # the schedule continues from step 3
    for a, c in zip(straight, resumed):
        assert torch.equal(a["final"], c["final"])
        assert torch.equal(a["momentum"], c["momentum"])
    # The last checkpoint holds the applied exchange of step 6: the average of what the ranks sent.
    last = torch.load(tmp_path / "ckpt_a" / "last.ckpt", weights_only=False)
    mean = sum(r["before_exchange"][6]["params"] for r in straight) / 2
    assert close(flat_params(last["state_dict"]), mean)
    assert close(flat_params(last[CHECKPOINT_KEY]["groups"][0]["state_dict"]), mean)
    assert last[CHECKPOINT_KEY]["steps"] == 6
