"""LARS: layer-wise adaptive rate scaling (You, Gitman & Ginsburg 2017, arXiv:1708.03888).

For each parameter tensor ``w`` with gradient ``g`` the trust ratio is

    ratio = trust_coefficient * ||w|| / (||g|| + weight_decay * ||w|| + eps)

taken as 1 where ``||w||`` or ``||g||`` is 0. With ``trust_clip=True`` (LARC's clip mode) the ratio of
tensors with non-zero norms becomes ``min(ratio / lr, 1)``, so that the layer's effective rate
``lr * ratio`` is ``min(trust_coefficient * ||w|| / (...), lr)``; zero-norm tensors keep ratio 1, as in
NVIDIA apex's LARC, which skips them.

``momentum_style="torch"`` (timm / torch.optim.SGD form; the buffer is in gradient units)::

    d   = ratio * (g + weight_decay * w)
    buf = momentum * buf + d
    w  -= lr * buf                      # nesterov: w -= lr * (d + momentum * buf)

``momentum_style="paper"`` (Algorithm 1 of the paper and the MLPerf ResNet reference; the buffer holds
steps that already include the LR in force when they were taken)::

    u   = lr * ratio * (g + weight_decay * w)
    buf = momentum * buf + u
    w  -= buf                           # nesterov: w -= u + momentum * buf

Both styles agree while the LR is constant. When the LR changes, the torch style applies the new LR to
the whole buffer at once, the paper style only to new contributions (old momentum decays at the old LR).
The paper-style Nesterov form is TensorFlow's ``use_nesterov`` momentum applied to the LR-scaled step,
which is what the MLPerf reference does; it equals the torch-style Nesterov update at constant LR.

A parameter group with ``lars_exclude=True`` gets ratio 1 and no weight decay (plain momentum SGD), the
MLPerf treatment of biases and normalisation parameters; :func:`lars_param_groups` builds such groups.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

__all__ = ["LARS", "lars_param_groups"]

_MOMENTUM_STYLES = ("torch", "paper")
# Device types whose torch._foreach_* kernels we rely on (on CPU they are per-tensor loops in C++,
# which still removes the Python overhead of the per-tensor path).
_FOREACH_DEVICES = ("cpu", "cuda", "xpu")
# State key of the foreach path's host-side buffer scale, and the scale below which it is folded.
_SCALE = "momentum_scale"
_MIN_SCALE = 1e-3


def _buckets(tensors: list[Tensor], cpu_chunk: int | None = None) -> list[list[int]]:
    """Indices of ``tensors`` grouped by (device, dtype), as foreach ops need.

    With ``cpu_chunk`` a CPU bucket is further cut into runs of about that many elements, so that
    a sequence of foreach ops works on data still in cache instead of streaming every tensor
    through memory once per op.
    """
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        groups[(t.device, t.dtype)].append(i)
    buckets = []
    for (device, _), idx in groups.items():
        if cpu_chunk is None or device.type != "cpu":
            buckets.append(idx)
            continue
        run: list[int] = []
        size = 0
        for i in idx:
            if run and size + tensors[i].numel() > cpu_chunk:
                buckets.append(run)
                run, size = [], 0
            run.append(i)
            size += tensors[i].numel()
        buckets.append(run)
    return buckets


def _norm(t: Tensor) -> Tensor:
    """L2 norm, in float32 at least (a float16 norm overflows from 65504 on)."""
    return torch.linalg.vector_norm(t, dtype=torch.promote_types(t.dtype, torch.float32))


def _norms(tensors: list[Tensor] | tuple[Tensor, ...]) -> Tensor:
    """L2 norms of same-device, same-dtype tensors as one 1-d tensor, without host synchronisation."""
    dtype = tensors[0].dtype
    if tensors[0].device.type == "cpu" and dtype in (torch.float32, torch.float64):
        # On CPU, _foreach_norm is a loop of single-threaded reductions that sum naively (relative
        # error ~4e-5 on ResNet-50's float32 tensors); BLAS dot is multi-threaded and more accurate.
        flat = [t.reshape(-1) for t in tensors]
        return torch.stack([torch.dot(f, f) for f in flat]).sqrt_()
    return torch.stack(torch._foreach_norm(tensors, dtype=torch.promote_types(dtype, torch.float32)))


def lars_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split ``model``'s trainable parameters into two LARS parameter groups.

    Tensors with ``ndim <= 1`` (biases, normalisation weights and biases) go into a group with
    ``lars_exclude=True`` and no weight decay; all others get ``weight_decay``. Parameters with
    ``requires_grad=False`` are skipped. The groups also suit :class:`sciml.optim.LAMB`.
    """
    decay: list[nn.Parameter] = []
    excluded: list[nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (excluded if p.ndim <= 1 else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": excluded, "weight_decay": 0.0, "lars_exclude": True},
    ]


def _trust_ratio(w_norm: Tensor, g_norm: Tensor, *, trust_coefficient: float, weight_decay: float,
                 eps: float, trust_clip: bool, lr: float) -> Tensor:
    """LARS trust ratio of 0-d or 1-d (batched) norms, without reading tensor values on the host."""
    ratio = trust_coefficient * w_norm / (g_norm + weight_decay * w_norm + eps)
    if trust_clip:
        # At lr == 0 nothing moves whatever the ratio; 1 avoids an inf/nan from ratio / 0.
        ratio = (ratio / lr).clamp_(max=1.0) if lr > 0 else torch.ones_like(ratio)
    # A zero weight (fresh layer) or zero gradient (unused layer) gets no adaptation; applied after
    # the clip so that such tensors always step at the plain LR.
    return torch.where((w_norm > 0) & (g_norm > 0), ratio, 1.0)


class LARS(Optimizer):
    """LARS momentum SGD with a per-tensor trust ratio; see the module docstring for the formulas.

    Args:
        params: parameters or parameter groups. A group may override every keyword below except
            ``lr``'s meaning, and may set ``lars_exclude=True`` (ratio 1, no weight decay).
        lr: learning rate (read from the param group each step, so LR schedulers work).
        momentum: momentum factor; 0 keeps no buffer.
        weight_decay: L2 penalty added to the gradient before the trust ratio is applied.
        trust_coefficient: ``eta`` of the paper.
        eps: added to the ratio's denominator.
        trust_clip: LARC clip mode, ``ratio = min(ratio / lr, 1)``.
        nesterov: Nesterov momentum (needs ``momentum > 0``).
        momentum_style: ``"torch"`` or ``"paper"``; differ only when the LR changes.
        foreach: use the multi-tensor ``torch._foreach_*`` path; ``None`` picks it when every
            parameter is a dense floating-point tensor on a CPU/CUDA/XPU device.

    The foreach path keeps a momentum buffer as ``state["momentum_buffer"] * state["momentum_scale"]``
    (see ``_foreach_lars``); ``state_dict()`` always holds the plain buffers, which both paths accept.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        eps: float = 1e-8,
        trust_clip: bool = False,
        nesterov: bool = False,
        momentum_style: str = "torch",
        foreach: bool | None = None,
    ):
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient,
            eps=eps, trust_clip=trust_clip, nesterov=nesterov, momentum_style=momentum_style,
            foreach=foreach, lars_exclude=False,
        )
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        _validate_group(self.param_groups[-1])

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Perform one optimisation step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            params, grads, states = [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LARS does not support sparse gradients")
                state = self.state[p]
                if group["momentum"] != 0 and "momentum_buffer" not in state:
                    # A zero buffer makes the first step buf = d, as torch.optim.SGD's clone does.
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                params.append(p)
                grads.append(p.grad)
                states.append(state)
            if not params:
                continue
            foreach = group["foreach"]
            if foreach is None:
                foreach = _foreach_supported(params)
            if foreach:
                _foreach_lars(params, grads, states, group)
            else:
                _single_tensor_lars(params, grads, states, group)
        return loss

    def state_dict(self) -> dict:
        # Saved buffers are always the true momentum buffers (see _foreach_lars).
        for state in self.state.values():
            _fold_scale(state)
        return super().state_dict()


def _validate_group(group: dict) -> None:
    lr = group["lr"]
    if not lr >= 0.0:
        raise ValueError(f"LARS: lr must be >= 0, got {lr}")
    if not group["momentum"] >= 0.0:
        raise ValueError(f"LARS: momentum must be >= 0, got {group['momentum']}")
    if not group["weight_decay"] >= 0.0:
        raise ValueError(f"LARS: weight_decay must be >= 0, got {group['weight_decay']}")
    if not group["trust_coefficient"] > 0.0:
        raise ValueError(f"LARS: trust_coefficient must be > 0, got {group['trust_coefficient']}")
    if not group["eps"] >= 0.0:
        raise ValueError(f"LARS: eps must be >= 0, got {group['eps']}")
    if group["momentum_style"] not in _MOMENTUM_STYLES:
        raise ValueError(f"LARS: momentum_style must be one of {_MOMENTUM_STYLES}, got {group['momentum_style']!r}")
    if group["nesterov"] and group["momentum"] == 0:
        raise ValueError("LARS: nesterov=True needs momentum > 0")


def _foreach_supported(params: list[Tensor]) -> bool:
    return all(
        p.device.type in _FOREACH_DEVICES and p.dtype.is_floating_point and not p.is_sparse
        for p in params
    )


def _hyper(group: dict) -> tuple[float, float, float]:
    """(weight decay, LR applied to the buffer ``lr_out``, LR folded into the step ``lr_in``).

    torch style: w -= lr * buf with buf built from ratio * (...); paper style: w -= buf with buf built
    from lr * ratio * (...). Writing ``s = lr_in * ratio`` lets both share one code path.
    """
    weight_decay = 0.0 if group["lars_exclude"] else group["weight_decay"]
    if group["momentum_style"] == "torch":
        return weight_decay, group["lr"], 1.0
    return weight_decay, 1.0, group["lr"]


def _ratio_kwargs(group: dict, weight_decay: float) -> dict:
    return dict(trust_coefficient=group["trust_coefficient"], weight_decay=weight_decay,
                eps=group["eps"], trust_clip=group["trust_clip"], lr=group["lr"])


def _fold_scale(state: dict) -> None:
    """Turn a foreach-path buffer stored as ``k * b`` back into the plain buffer."""
    k = state.pop(_SCALE, 1.0)
    if k != 1.0:
        state["momentum_buffer"].mul_(k)


def _single_tensor_lars(params: list[Tensor], grads: list[Tensor], states: list[dict], group: dict) -> None:
    weight_decay, lr_out, lr_in = _hyper(group)
    momentum, nesterov = group["momentum"], group["nesterov"]
    for p, g, state in zip(params, grads, states):
        scale: float | Tensor
        if group["lars_exclude"]:
            scale = lr_in
        else:
            ratio = _trust_ratio(_norm(p), _norm(g), **_ratio_kwargs(group, weight_decay))
            scale = lr_in * ratio
        d = g.add(p, alpha=weight_decay).mul_(scale)  # new tensor: p.grad stays untouched
        if momentum != 0:
            _fold_scale(state)
            buf = state["momentum_buffer"]
            buf.mul_(momentum).add_(d)
            d = d.add_(buf, alpha=momentum) if nesterov else buf
        p.add_(d, alpha=-lr_out)


def _foreach_lars(params: list[Tensor], grads: list[Tensor], states: list[dict], group: dict) -> None:
    weight_decay, lr_out, lr_in = _hyper(group)
    momentum, nesterov = group["momentum"], group["nesterov"]
    for idx in _buckets(params):
        ps = [params[i] for i in idx]
        gs = [grads[i] for i in idx]
        sts = [states[i] for i in idx]

        # Per-tensor step scales s = lr_in * ratio as one 1-d tensor, handed to the foreach ops as
        # 0-d views: no host synchronisation and no temporaries the size of the parameters. They go
        # first in addcmul, the position newer CUDA builds serve from the fused multi-tensor kernel.
        if group["lars_exclude"]:
            s = torch.full((len(ps),), lr_in, dtype=torch.promote_types(ps[0].dtype, torch.float32),
                           device=ps[0].device)
        else:
            s = lr_in * _trust_ratio(_norms(ps), _norms(gs), **_ratio_kwargs(group, weight_decay))

        if momentum != 0:
            # The buffer is kept as buf = k * b with a host-side float k per tensor, so that the
            # decay buf *= momentum is k *= momentum instead of a pass over memory:
            #   k_new = momentum * k,  b += (s / k_new) * (g + wd * w).
            # When k would drop below _MIN_SCALE (b grows as 1 / k) or differs between tensors
            # (some skipped a step), the decay is applied to b for real and k reset to 1: one plain
            # momentum pass every ~log(_MIN_SCALE) / log(momentum) steps. state_dict() folds k too.
            bs = [st["momentum_buffer"] for st in sts]
            ks = [st.get(_SCALE, 1.0) for st in sts]
            k_new = ks[0] * momentum
            if k_new < _MIN_SCALE or any(k != ks[0] for k in ks):
                torch._foreach_mul_(bs, [k * momentum for k in ks])
                k_new = 1.0
            torch._foreach_addcmul_(bs, (s / k_new).unbind(), gs)
            if weight_decay != 0:
                torch._foreach_addcmul_(bs, (s * (weight_decay / k_new)).unbind(), ps)
            for st in sts:
                st[_SCALE] = k_new
            if not nesterov:
                torch._foreach_add_(ps, bs, alpha=-lr_out * k_new)
                continue
        # Momentum-free and Nesterov steps both need lr_out * s * (g + wd * w): the decay part is
        # a per-tensor rescale of w, which saves a temporary for g + wd * w.
        if weight_decay != 0:
            torch._foreach_mul_(ps, (1.0 - (lr_out * weight_decay) * s).unbind())
        torch._foreach_addcmul_(ps, s.unbind(), gs, value=-lr_out)
        if nesterov:
            torch._foreach_add_(ps, bs, alpha=-lr_out * momentum * k_new)
