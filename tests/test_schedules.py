"""The large-batch LR rule and the per-step schedules, against the formulas written out."""
import math

import pytest
import torch
from omegaconf import OmegaConf

from sciml.errors import SciMLError
from sciml.optim.factory import build_optimizer, build_scheduler, param_groups, scaled_lr


def test_scaled_lr_rules():
    assert scaled_lr(0.1, 4096, 256, "linear") == pytest.approx(1.6)
    assert scaled_lr(0.1, 4096, 256, "sqrt") == pytest.approx(0.4)
    assert scaled_lr(0.1, 4096, None, "linear") == 0.1
    assert scaled_lr(0.1, 4096, 256, "none") == 0.1
    with pytest.raises(SciMLError, match="lr_scaling"):
        scaled_lr(0.1, 4096, 256, "cubic")


def _lrs(cfg, steps=20, per_epoch=5, lr=2.0):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr)
    sched = build_scheduler(OmegaConf.create(cfg), opt, total_steps=steps, steps_per_epoch=per_epoch)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_warmup_poly():
    lrs = _lrs({"name": "warmup_poly", "warmup_epochs": 1, "power": 2, "end_lr": 0.1})
    assert lrs[:5] == pytest.approx([2.0 * (s + 1) / 5 for s in range(5)])
    for step in range(5, 20):
        progress = (step - 5) / 15
        assert lrs[step] == pytest.approx(0.1 + (2.0 - 0.1) * (1 - progress) ** 2)


def test_cosine():
    lrs = _lrs({"name": "cosine", "warmup_epochs": 0, "min_lr": 0.0})
    assert lrs == pytest.approx([2.0 * 0.5 * (1 + math.cos(math.pi * s / 20)) for s in range(20)])


def test_unknown_scheduler():
    with pytest.raises(SciMLError, match="scheduler.name"):
        _lrs({"name": "step"})


def test_build_optimizer_scales_and_excludes():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    cfg = OmegaConf.create({"_target_": "torch.optim.SGD", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4,
                            "base_batch_size": 256, "lr_scaling": "linear", "exclude_from_decay": True})
    opt = build_optimizer(cfg, model, global_batch=1024)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.4, 0.4])
    decayed, excluded = opt.param_groups
    assert [p.ndim for p in decayed["params"]] == [2] and decayed["weight_decay"] == 1e-4
    assert all(p.ndim == 1 for p in excluded["params"]) and excluded["weight_decay"] == 0.0
    assert excluded["lars_exclude"] is True
    assert len(param_groups(model, 1e-4, exclude_from_decay=False)) == 1


def test_bad_optimizer_option_is_named():
    cfg = OmegaConf.create({"_target_": "torch.optim.SGD", "lr": -1.0})
    with pytest.raises(SciMLError, match="optimizer"):
        build_optimizer(cfg, torch.nn.Linear(2, 2), global_batch=8)
