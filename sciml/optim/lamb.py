"""LAMB: layer-wise adaptive moments (You et al. 2019, arXiv:1904.00962).

For each parameter tensor ``w`` with gradient ``g`` at its step ``t``::

    m     = beta1 * m + (1 - beta1) * g      # grad_averaging=False: m = beta1 * m + g
    v     = beta2 * v + (1 - beta2) * g**2
    m_hat = m / (1 - beta1**t),  v_hat = v / (1 - beta2**t)     # bias_correction=False: no division
                                             # (kept with grad_averaging=False, as in apex FusedLAMB)
    r     = m_hat / (sqrt(v_hat) + eps) + weight_decay * w
    ratio = ||w|| / ||r||                    # 1 where either norm is 0; trust_clip: min(ratio, 1)
    w    -= lr * ratio * r

A parameter group with ``lars_exclude=True`` gets ratio 1 and no weight decay, i.e. a plain Adam step
(see :func:`sciml.optim.lars_param_groups`).

``max_grad_norm`` clips the gradients of *all* groups together first, as NVIDIA's FusedLAMB and timm
do: ``g <- g / max(1, ||(g_1, ..., g_n)|| / max_grad_norm)``, with ``p.grad`` left untouched.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import reduce

import torch
from torch import Tensor
from torch.optim import Optimizer

from sciml.optim.lars import _buckets, _foreach_supported, _norm, _norms

__all__ = ["LAMB"]

# Elements per foreach call on CPU: LAMB chains ~12 ops with a temporary, which on CPU run markedly
# faster on cache-sized runs of tensors than on the whole model at once (see benchmarks/optim_step.py).
_CPU_CHUNK = 1 << 20


def _trust_ratio(w_norm: Tensor, r_norm: Tensor, trust_clip: bool) -> Tensor:
    """LAMB trust ratio of 0-d or 1-d (batched) norms, without reading tensor values on the host."""
    ratio = w_norm / r_norm
    if trust_clip:
        ratio = ratio.clamp(max=1.0)
    return torch.where((w_norm > 0) & (r_norm > 0), ratio, 1.0)


class LAMB(Optimizer):
    """LAMB with a per-tensor trust ratio; see the module docstring for the formulas.

    Args:
        params: parameters or parameter groups. A group may override every keyword below except
            ``max_grad_norm`` (global over all groups), and may set ``lars_exclude=True``.
        lr: learning rate (read from the param group each step, so LR schedulers work).
        betas: decay rates of the first and second moments.
        eps: added to ``sqrt(v_hat)``.
        weight_decay: decay added to the Adam direction before the trust ratio (as in the paper).
        trust_clip: clip the trust ratio to at most 1.
        bias_correction: divide the moments by ``1 - beta**t``.
        grad_averaging: weight the gradient by ``1 - beta1`` in the first moment.
        max_grad_norm: clip the global gradient norm to this value before the step; ``None`` = off.
        foreach: use the multi-tensor ``torch._foreach_*`` path; ``None`` picks it when every
            parameter is a dense floating-point tensor on a CPU/CUDA/XPU device.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        trust_clip: bool = False,
        bias_correction: bool = True,
        grad_averaging: bool = True,
        max_grad_norm: float | None = None,
        foreach: bool | None = None,
    ):
        if max_grad_norm is not None and not max_grad_norm > 0.0:
            raise ValueError(f"LAMB: max_grad_norm must be > 0 or None, got {max_grad_norm}")
        self.max_grad_norm = max_grad_norm
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, trust_clip=trust_clip,
            bias_correction=bias_correction, grad_averaging=grad_averaging, foreach=foreach,
            lars_exclude=False,
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

        clip = self._clip_divisor()
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LAMB does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                # A host-side int: bias corrections need no device read-back.
                state["step"] += 1
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                steps.append(state["step"])
            if not params:
                continue
            foreach = group["foreach"]
            if foreach is None:
                foreach = _foreach_supported(params)
            fn = _foreach_lamb if foreach else _single_tensor_lamb
            fn(params, grads, exp_avgs, exp_avg_sqs, steps, clip, group)
        return loss

    def _clip_divisor(self) -> Tensor | None:
        """max(1, global grad norm / max_grad_norm) as a 0-d tensor, or None when clipping is off."""
        if self.max_grad_norm is None:
            return None
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return None
        norms = [_norms([grads[i] for i in idx]) for idx in _buckets(grads)]
        dtype = reduce(torch.promote_types, (n.dtype for n in norms))
        device = grads[0].device
        total = torch.linalg.vector_norm(torch.cat([n.to(device, dtype) for n in norms]))
        return (total / self.max_grad_norm).clamp_(min=1.0)


def _validate_group(group: dict) -> None:
    if not group["lr"] >= 0.0:
        raise ValueError(f"LAMB: lr must be >= 0, got {group['lr']}")
    betas = group["betas"]
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"LAMB: betas must be two values in [0, 1), got {betas}")
    if not group["eps"] >= 0.0:
        raise ValueError(f"LAMB: eps must be >= 0, got {group['eps']}")
    if not group["weight_decay"] >= 0.0:
        raise ValueError(f"LAMB: weight_decay must be >= 0, got {group['weight_decay']}")


def _bias_corrections(group: dict, step: int) -> tuple[float, float]:
    """(1 - beta1**t, sqrt(1 - beta2**t)), both 1 without bias correction."""
    if not group["bias_correction"]:
        return 1.0, 1.0
    beta1, beta2 = group["betas"]
    return 1.0 - beta1**step, (1.0 - beta2**step) ** 0.5


def _single_tensor_lamb(params, grads, exp_avgs, exp_avg_sqs, steps, clip, group) -> None:
    beta1, beta2 = group["betas"]
    weight_decay = 0.0 if group["lars_exclude"] else group["weight_decay"]
    for p, g, m, v, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        if clip is not None:
            g = g / clip.to(g.device)  # new tensor: p.grad stays untouched
        if group["grad_averaging"]:
            m.lerp_(g, 1.0 - beta1)
        else:
            m.mul_(beta1).add_(g)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        bc1, bc2_sqrt = _bias_corrections(group, step)
        # r = m_hat / (sqrt(v_hat) + eps), with the same op order as the foreach path.
        r = m.div(v.sqrt().div_(bc2_sqrt).add_(group["eps"])).div_(bc1)
        if group["lars_exclude"]:
            p.add_(r, alpha=-group["lr"])
            continue
        r.add_(p, alpha=weight_decay)
        ratio = _trust_ratio(_norm(p), _norm(r), group["trust_clip"])
        p.addcmul_(r, ratio, value=-group["lr"])


def _foreach_lamb(params, grads, exp_avgs, exp_avg_sqs, steps, clip, group) -> None:
    beta1, beta2 = group["betas"]
    weight_decay = 0.0 if group["lars_exclude"] else group["weight_decay"]
    for idx in _buckets(params, _CPU_CHUNK):
        ps = [params[i] for i in idx]
        gs = [grads[i] for i in idx]
        ms = [exp_avgs[i] for i in idx]
        vs = [exp_avg_sqs[i] for i in idx]
        bc1, bc2_sqrt = zip(*(_bias_corrections(group, steps[i]) for i in idx))
        if clip is not None:
            gs = list(torch._foreach_div(gs, clip.to(ps[0].device)))

        if group["grad_averaging"]:
            torch._foreach_lerp_(ms, gs, 1.0 - beta1)
        else:
            torch._foreach_mul_(ms, beta1)
            torch._foreach_add_(ms, gs)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, gs, gs, value=1.0 - beta2)

        # r = m / (sqrt(v) / sqrt(bc2) + eps) / bc1. A true division: 1 / denominator overflows
        # float16 where m / denominator does not.
        denom = torch._foreach_sqrt(vs)
        torch._foreach_div_(denom, list(bc2_sqrt))
        torch._foreach_add_(denom, group["eps"])
        r = torch._foreach_div(ms, denom)
        del denom
        torch._foreach_div_(r, list(bc1))
        if group["lars_exclude"]:
            torch._foreach_add_(ps, r, alpha=-group["lr"])
            continue
        if weight_decay != 0:
            torch._foreach_add_(r, ps, alpha=weight_decay)
        ratio = _trust_ratio(_norms(ps), _norms(r), group["trust_clip"])
        torch._foreach_addcmul_(ps, ratio.unbind(), r, value=-group["lr"])
