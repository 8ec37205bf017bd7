"""Drives an optimizer through given gradients and learning rates, as training with a scheduler does."""
from torch import nn


def run_optimizer(optimizer_cls, weights, grads, lrs, excluded_idx=(), **kwargs):
    """`optimizer_cls` on copies of `weights`; the LR is set to `lrs[t]` before step t. Parameters in
    `excluded_idx` go into a `lars_exclude=True` group."""
    params = [nn.Parameter(w.clone()) for w in weights]
    groups = [{"params": [p for i, p in enumerate(params) if i not in excluded_idx]}]
    if excluded_idx:
        groups.append({"params": [params[i] for i in excluded_idx], "lars_exclude": True})
    opt = optimizer_cls(groups, lr=lrs[0], **kwargs)
    for t, lr in enumerate(lrs):
        for p, g in zip(params, grads[t]):
            p.grad = None if g is None else g.clone()
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
    return [p.detach() for p in params], opt
