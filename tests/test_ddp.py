"""Plain DDP (strategy=ddp) with communication accounting: the CommStats callback counts DDP's gradient all-reduce
on gloo CPU processes, so that DDP and hybrid runs compare on the same measure."""
from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from pytorch_lightning.strategies import DDPStrategy
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

from sciml.distributed import CROSS_KEY, INTRA_KEY, CommStats
from test_hybrid import MODEL, Tiny, fit, param_bytes

pytestmark = pytest.mark.timeout(120)


def test_ddp_config_instantiates():
    from sciml.run import _strategy

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="sciml.conf", version_base="1.3"):
        cfg = compose("config", overrides=["strategy=ddp"])
    strategy = _strategy(cfg.strategy)
    assert type(strategy) is DDPStrategy
    assert strategy._ddp_kwargs == {"find_unused_parameters": False}


def test_commstats_counts_the_gradient_allreduce_of_ddp(tmp_path):
    """Registered by the callback directly on the DDP module: works on CPU, where Lightning's comm-hook plumbing
    does nothing. Every step all-reduces every gradient once."""
    ranks, trainer = fit(tmp_path, DDPStrategy(start_method="fork"), devices=2, steps_per_epoch=5,
                         callbacks=(CommStats(),))
    assert float(trainer.callback_metrics[INTRA_KEY]) == 5 * param_bytes(MODEL)
    assert float(trainer.callback_metrics[CROSS_KEY]) == 0.0
    assert torch.equal(ranks[0]["final"], ranks[1]["final"])  # the counting hook still averages the gradients


class _UserHook(pl.Callback):
    """Stands in for a comm hook configured through Lightning on CUDA: registered before CommStats looks."""

    def on_fit_start(self, trainer, pl_module):
        trainer.strategy.model.register_comm_hook(None, default_hooks.allreduce_hook)


def test_commstats_leaves_out_intra_bytes_it_cannot_measure(tmp_path):
    _, trainer = fit(tmp_path, DDPStrategy(start_method="fork"), devices=2, steps_per_epoch=2,
                     callbacks=(_UserHook(), CommStats()))
    assert INTRA_KEY not in trainer.callback_metrics
    assert float(trainer.callback_metrics[CROSS_KEY]) == 0.0


def test_commstats_on_one_device_reports_no_traffic(tmp_path):
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[CommStats()],
                         default_root_dir=tmp_path)
    trainer.fit(Tiny(steps_per_epoch=2, world_size=1))
    assert float(trainer.callback_metrics[INTRA_KEY]) == 0.0
    assert float(trainer.callback_metrics[CROSS_KEY]) == 0.0
