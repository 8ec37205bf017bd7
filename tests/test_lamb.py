"""LAMB against an independent float64 reference written out from the formulas, step by step."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import sciml.optim.lamb as lamb_module
from sciml.optim import LAMB, lars_param_groups
import optim_helpers

LRS = (1e-2, 3e-3, 2e-2, 5e-3, 1e-2)


def norm(t: torch.Tensor) -> float:
    return math.sqrt(sum(x * x for x in t.flatten().tolist()))


def reference_lamb(weights, grads, lrs, cfgs, max_grad_norm=None):
    """Hand-written LAMB with per-parameter step counts; ``grads[t][i]`` None means no step."""
    ws = [w.clone() for w in weights]
    ms = [torch.zeros_like(w) for w in ws]
    vs = [torch.zeros_like(w) for w in ws]
    steps = [0] * len(ws)
    for t, lr in enumerate(lrs):
        gs = grads[t]
        clip = 1.0
        if max_grad_norm is not None:
            total = math.sqrt(sum(norm(g) ** 2 for g in gs if g is not None))
            clip = max(1.0, total / max_grad_norm)
        for i, cfg in enumerate(cfgs):
            if gs[i] is None:
                continue
            g = gs[i] / clip
            b1, b2 = cfg["betas"]
            steps[i] += 1
            ms[i] = b1 * ms[i] + ((1 - b1) * g if cfg["grad_averaging"] else g)
            vs[i] = b2 * vs[i] + (1 - b2) * g * g
            if cfg["bias_correction"]:
                m_hat, v_hat = ms[i] / (1 - b1 ** steps[i]), vs[i] / (1 - b2 ** steps[i])
            else:
                m_hat, v_hat = ms[i], vs[i]
            wd = 0.0 if cfg["exclude"] else cfg["weight_decay"]
            r = m_hat / (v_hat.sqrt() + cfg["eps"]) + wd * ws[i]
            w_norm, r_norm = norm(ws[i]), norm(r)
            if cfg["exclude"] or w_norm == 0.0 or r_norm == 0.0:
                ratio = 1.0
            else:
                ratio = w_norm / r_norm
                if cfg["trust_clip"]:
                    ratio = min(ratio, 1.0)
            ws[i] = ws[i] - lr * ratio * r
    return ws


def make_problem(dtype=torch.float64, steps=len(LRS), seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(4, 3), (2, 3, 2, 2), (3,), (5,)]
    weights = [torch.randn(s, generator=gen, dtype=dtype) * 0.1 ** k for k, s in enumerate(shapes)]
    grads = [[torch.randn(s, generator=gen, dtype=dtype) for s in shapes] for _ in range(steps)]
    return weights, grads


def run_optimizer(weights, grads, lrs, excluded_idx=(), **kwargs):
    return optim_helpers.run_optimizer(LAMB, weights, grads, lrs, excluded_idx, **kwargs)


def cfgs_for(n, excluded_idx, **kw):
    cfg = dict(betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, trust_clip=False, bias_correction=True,
               grad_averaging=True)
    cfg.update({k: v for k, v in kw.items() if k != "max_grad_norm"})
    return [dict(cfg, exclude=i in excluded_idx) for i in range(n)]


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("max_grad_norm", [None, 1.0])
@pytest.mark.parametrize("trust_clip", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("bias_correction, grad_averaging", [(True, True), (False, True), (True, False)])
def test_matches_reference(bias_correction, grad_averaging, weight_decay, trust_clip, max_grad_norm, foreach):
    weights, grads = make_problem()
    grads[1][0] = None  # parameter 0 skips a step: its own step count drives its bias correction
    kw = dict(betas=(0.8, 0.99), eps=1e-6, weight_decay=weight_decay, trust_clip=trust_clip,
              bias_correction=bias_correction, grad_averaging=grad_averaging, max_grad_norm=max_grad_norm)
    got, opt = run_optimizer(weights, grads, LRS, excluded_idx=(2, 3), foreach=foreach, **kw)
    want = reference_lamb(weights, grads, LRS, cfgs_for(4, (2, 3), **kw), max_grad_norm)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)
    assert [opt.state[p]["step"] for p in opt.param_groups[0]["params"]] == [len(LRS) - 1, len(LRS)]


def test_trust_clip_is_active_in_the_reference_problem():
    """Guards the parametrised test above: clipping must change the result for it to test anything."""
    weights, grads = make_problem()
    plain, _ = run_optimizer(weights, grads, LRS, weight_decay=0.1)
    clipped, _ = run_optimizer(weights, grads, LRS, weight_decay=0.1, trust_clip=True)
    assert any(not torch.allclose(a, b) for a, b in zip(plain, clipped))


def test_excluded_group_is_plain_adam():
    weights, grads = make_problem()
    params = [nn.Parameter(w.clone()) for w in weights]
    twins = [nn.Parameter(w.clone()) for w in weights]
    lamb = LAMB([{"params": params, "lars_exclude": True}], lr=1e-2, eps=1e-8, weight_decay=0.3)
    adam = torch.optim.Adam(twins, lr=1e-2, eps=1e-8)
    for t in range(len(LRS)):
        for p, q, g in zip(params, twins, grads[t]):
            p.grad, q.grad = g.clone(), g.clone()
        lamb.step()
        adam.step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cpu_chunk", [None, 20])
@pytest.mark.parametrize("trust_clip", [False, True])
@pytest.mark.parametrize("max_grad_norm", [None, 0.5])
def test_foreach_equals_per_tensor_float32(max_grad_norm, trust_clip, cpu_chunk, monkeypatch):
    """Also with the foreach calls cut into runs of at most 20 elements (one tensor is bigger)."""
    monkeypatch.setattr(lamb_module, "_CPU_CHUNK", cpu_chunk)
    weights, grads = make_problem(dtype=torch.float32, seed=1)
    kw = dict(weight_decay=0.01, max_grad_norm=max_grad_norm, trust_clip=trust_clip)
    single, _ = run_optimizer(weights, grads, LRS, excluded_idx=(3,), foreach=False, **kw)
    multi, _ = run_optimizer(weights, grads, LRS, excluded_idx=(3,), foreach=True, **kw)
    for s, m in zip(single, multi):
        torch.testing.assert_close(m, s)


@pytest.mark.parametrize("foreach", [False, True])
def test_zero_norms_give_ratio_one(foreach):
    lr, eps = 0.1, 1e-6
    w_zero = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    still = nn.Parameter(torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64))
    g = torch.tensor([0.3, 0.1, -0.2], dtype=torch.float64)
    w_zero.grad, still.grad = g.clone(), torch.zeros(3, dtype=torch.float64)
    LAMB([w_zero, still], lr=lr, eps=eps, foreach=foreach).step()
    # first step: m_hat = g, v_hat = g**2, so r = g / (|g| + eps); ||w|| = 0 gives ratio 1
    torch.testing.assert_close(w_zero.detach(), -lr * g / (g.abs() + eps))
    # g = 0 and no weight decay: r = 0, ratio 1, nothing moves (and no nan)
    torch.testing.assert_close(still.detach(), torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64))


@pytest.mark.parametrize("foreach", [False, True])
def test_max_grad_norm_leaves_grads_untouched(foreach):
    weights, grads = make_problem(steps=1)
    params = [nn.Parameter(w.clone()) for w in weights]
    for p, g in zip(params, grads[0]):
        p.grad = g.clone()
    LAMB(params, lr=1e-2, max_grad_norm=0.1, foreach=foreach).step()
    for p, g in zip(params, grads[0]):
        assert torch.equal(p.grad, g)


@pytest.mark.parametrize("foreach", [False, True])
def test_state_dict_round_trip_continues_identically(foreach):
    weights, grads = make_problem(steps=6)
    params = [nn.Parameter(w.clone()) for w in weights]
    groups = [{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:], "lars_exclude": True}]
    opt = LAMB(groups, lr=1e-2, max_grad_norm=2.0, foreach=foreach)

    def step(o, ps, t):
        for p, g in zip(ps, grads[t]):
            p.grad = g.clone()
        o.step()

    for t in range(3):
        step(opt, params, t)
    saved = copy.deepcopy(opt.state_dict())
    clones = [nn.Parameter(p.detach().clone()) for p in params]
    opt2 = LAMB([{"params": clones[:2]}, {"params": clones[2:]}], lr=1.0, max_grad_norm=2.0, foreach=foreach)
    opt2.load_state_dict(saved)
    for t in range(3, 6):
        step(opt, params, t)
        step(opt2, clones, t)
    for a, b in zip(params, clones):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=-1e-3), "lr"),
    (dict(betas=(1.0, 0.999)), "betas"),
    (dict(betas=(0.9, -0.1)), "betas"),
    (dict(eps=-1e-6), "eps"),
    (dict(weight_decay=-0.01), "weight_decay"),
    (dict(max_grad_norm=0.0), "max_grad_norm"),
])
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LAMB([nn.Parameter(torch.ones(2))], **kwargs)


def test_trains_with_param_groups_and_closure():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.LayerNorm(8), nn.Linear(8, 1))
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    opt = LAMB(lars_param_groups(model, 0.01), lr=1e-2)

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    first = opt.step(closure).item()
    for _ in range(20):
        last = opt.step(closure).item()
    assert last < first


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_norms_do_not_overflow(dtype):
    """||w|| = 1e5 exceeds float16's range: norms and ratios are taken in float32."""
    weights = [torch.full((100, 100), 1000.0, dtype=dtype), torch.ones(4, dtype=dtype)]
    grads = [[torch.full_like(w, 0.01) for w in weights] for _ in range(3)]
    kw = dict(weight_decay=1e-2, max_grad_norm=0.5)
    single, _ = run_optimizer(weights, grads, LRS[:3], foreach=False, **kw)
    multi, _ = run_optimizer(weights, grads, LRS[:3], foreach=True, **kw)
    want = reference_lamb([w.double() for w in weights], [[g.double() for g in s] for s in grads], LRS[:3],
                          cfgs_for(2, (), **kw), kw["max_grad_norm"])
    for s, m, w in zip(single, multi, want):
        assert s.dtype == m.dtype == dtype
        torch.testing.assert_close(m, s)
        torch.testing.assert_close(s.double(), w, rtol=1e-2, atol=1e-2)
