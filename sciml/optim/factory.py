"""Build the optimizer and the per-step LR schedule from the `optimizer` and `scheduler` configs.

The large-batch rule: the configured `lr` is the learning rate at `base_batch_size`; it is scaled to the global
batch (per-device batch x devices x nodes x gradient accumulation), linearly (Goyal et al. 2017) or by the square
root (Krizhevsky 2014; common for Adam-type optimizers).
"""
from __future__ import annotations

import logging
import math

import torch
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from sciml.errors import SciMLError
from sciml.optim.lars import lars_param_groups

log = logging.getLogger(__name__)

# Keys of the optimizer config that sciml consumes; the rest go to the optimizer's constructor.
_SCIML_KEYS = ("_target_", "base_batch_size", "lr_scaling", "exclude_from_decay")


def scaled_lr(lr: float, global_batch: int, base_batch_size: int | None, rule: str) -> float:
    """The large-batch rule: `lr` at `base_batch_size` scaled to `global_batch` (linear, sqrt or none)."""
    if not base_batch_size or rule == "none":
        return lr
    if rule not in ("linear", "sqrt"):
        raise SciMLError(f"optimizer.lr_scaling: '{rule}' is not one of linear, sqrt, none")
    ratio = global_batch / base_batch_size
    return lr * (ratio if rule == "linear" else math.sqrt(ratio))


def param_groups(model: torch.nn.Module, weight_decay: float, exclude_from_decay: bool) -> list[dict]:
    """One group, or the split of `lars_param_groups` (biases and normalisation parameters get no weight decay
    and, for LARS/LAMB, no trust ratio) without an empty group, which plain torch optimizers would reject."""
    if not exclude_from_decay:
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]
    return [g for g in lars_param_groups(model, weight_decay) if g["params"]]


def build_optimizer(cfg: DictConfig, model: torch.nn.Module, global_batch: int) -> torch.optim.Optimizer:
    """The optimizer of the `optimizer` config over `model`'s parameters, its LR scaled to `global_batch`."""
    options = OmegaConf.to_container(cfg, resolve=True)
    try:
        cls = get_class(options["_target_"])
    except Exception as exc:
        raise SciMLError(f"optimizer._target_: cannot import '{options.get('_target_')}' ({exc})") from None
    kwargs = {k: v for k, v in options.items() if k not in _SCIML_KEYS}
    kwargs["lr"] = scaled_lr(kwargs["lr"], global_batch, options.get("base_batch_size"),
                             options.get("lr_scaling", "none"))
    if kwargs["lr"] != options["lr"]:
        log.info("learning rate %.4g at batch %s scaled (%s) to %.4g at global batch %d", options["lr"],
                 options["base_batch_size"], options["lr_scaling"], kwargs["lr"], global_batch)
    groups = param_groups(model, kwargs.get("weight_decay", 0.0), options.get("exclude_from_decay", False))
    try:
        return cls(groups, **kwargs)
    except (TypeError, ValueError) as exc:
        raise SciMLError(f"optimizer ({options['_target_']}): {exc}") from None


def build_scheduler(cfg: DictConfig, optimizer: torch.optim.Optimizer, total_steps: int, steps_per_epoch: int):
    """A per-step LambdaLR, or None.

    Linear warm-up from 0 to each group's (scaled) lr over `warmup_epochs`, then a decay to the absolute floor
    `end_lr` (warmup_poly: (1 - progress) ** power) or `min_lr` (cosine).
    """
    name = cfg.get("name", "none")
    if name == "none":
        return None
    if name == "warmup_poly":
        power = float(cfg.get("power", 2.0))
        floor = float(cfg.get("end_lr", 0.0))

        def decay(progress):
            return (1.0 - progress) ** power
    elif name == "cosine":
        floor = float(cfg.get("min_lr", 0.0))

        def decay(progress):
            return 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise SciMLError(f"scheduler.name: '{name}' is not one of none, warmup_poly, cosine")
    warmup = int(round(float(cfg.get("warmup_epochs", 0.0)) * steps_per_epoch))
    total = max(int(total_steps), 1)

    def multiplier(base_lr):
        def factor(step):
            if step < warmup:
                return (step + 1) / warmup
            progress = min((step - warmup) / max(total - warmup, 1), 1.0)
            return (floor + (base_lr - floor) * decay(progress)) / base_lr if base_lr > 0 else 0.0
        return factor

    return torch.optim.lr_scheduler.LambdaLR(optimizer, [multiplier(g["lr"]) for g in optimizer.param_groups])
