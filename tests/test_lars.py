"""LARS against an independent float64 reference written out from the formulas, step by step."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from sciml.optim import LARS, lars_param_groups
import optim_helpers

STYLES = ("torch", "paper")
LRS = (0.5, 0.05, 0.3, 2.0, 0.1)  # changes every step, so the two momentum styles differ


def norm(t: torch.Tensor) -> float:
    return math.sqrt(sum(x * x for x in t.flatten().tolist()))


def reference_lars(weights, grads, lrs, cfgs, return_buffers=False):
    """Hand-written LARS: ``grads[t][i]`` is parameter i's gradient at step t (None: no step)."""
    ws = [w.clone() for w in weights]
    bufs = [torch.zeros_like(w) for w in ws]
    for t, lr in enumerate(lrs):
        for i, cfg in enumerate(cfgs):
            g = grads[t][i]
            if g is None:
                continue
            w, m = ws[i], cfg["momentum"]
            wd = 0.0 if cfg["exclude"] else cfg["weight_decay"]
            w_norm, g_norm = norm(w), norm(g)
            if cfg["exclude"] or w_norm == 0.0 or g_norm == 0.0:
                ratio = 1.0
            else:
                ratio = cfg["trust_coefficient"] * w_norm / (g_norm + wd * w_norm + cfg["eps"])
                if cfg["trust_clip"]:
                    ratio = min(ratio / lr, 1.0)
            if cfg["momentum_style"] == "torch":
                d = ratio * (g + wd * w)  # buffer in gradient units, LR applied on the way out
                bufs[i] = m * bufs[i] + d
                step = (d + m * bufs[i] if cfg["nesterov"] else bufs[i]) if m else d
                ws[i] = w - lr * step
            else:
                u = lr * ratio * (g + wd * w)  # buffer holds LR-scaled steps
                bufs[i] = m * bufs[i] + u
                step = (u + m * bufs[i] if cfg["nesterov"] else bufs[i]) if m else u
                ws[i] = w - step
    return (ws, bufs) if return_buffers else ws


def make_problem(dtype=torch.float64, steps=len(LRS), seed=0):
    """Two multi-dimensional and two 1-d tensors, with gradient scales from 1e-2 to 10."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(4, 3), (2, 3, 2, 2), (3,), (5,)]
    weights = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=dtype) * 10.0 ** (k - 2) for k, s in enumerate(shapes)]
             for _ in range(steps)]
    return weights, grads


def run_optimizer(weights, grads, lrs, excluded_idx=(), **kwargs):
    return optim_helpers.run_optimizer(LARS, weights, grads, lrs, excluded_idx, **kwargs)


def cfgs_for(n, excluded_idx, **cfg):
    full = dict(momentum=0.9, weight_decay=0.0, trust_coefficient=0.001, eps=1e-8, trust_clip=False,
                nesterov=False, momentum_style="torch")
    full.update(cfg)
    return [dict(full, exclude=i in excluded_idx) for i in range(n)]


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("trust_clip", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("style", STYLES)
def test_matches_reference_under_changing_lr(style, nesterov, weight_decay, trust_clip, foreach):
    weights, grads = make_problem()
    hyper = dict(momentum=0.9, weight_decay=weight_decay, trust_coefficient=0.1, eps=1e-8,
                 trust_clip=trust_clip, nesterov=nesterov, momentum_style=style)
    got, _ = run_optimizer(weights, grads, LRS, excluded_idx=(2, 3), foreach=foreach, **hyper)
    want = reference_lars(weights, grads, LRS, cfgs_for(4, (2, 3), **hyper))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("style", STYLES)
def test_momentum_zero_keeps_no_buffer(style, foreach):
    weights, grads = make_problem()
    hyper = dict(momentum=0.0, weight_decay=0.05, trust_coefficient=0.1, momentum_style=style)
    got, opt = run_optimizer(weights, grads, LRS, excluded_idx=(3,), foreach=foreach, **hyper)
    want = reference_lars(weights, grads, LRS, cfgs_for(4, (3,), **hyper))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)
    assert all("momentum_buffer" not in s for s in opt.state.values())


def test_trust_clip_is_active_in_the_reference_problem():
    """Guards the parametrised test above: clipping must change the result for it to test anything."""
    weights, grads = make_problem()
    kw = dict(weight_decay=0.1, trust_coefficient=0.1)
    plain, _ = run_optimizer(weights, grads, LRS, **kw)
    clipped, _ = run_optimizer(weights, grads, LRS, trust_clip=True, **kw)
    assert not torch.allclose(plain[0], clipped[0]) and not torch.allclose(plain[1], clipped[1])


def test_styles_agree_at_constant_lr_and_differ_when_it_changes():
    weights, grads = make_problem()
    for nesterov in (False, True):
        kw = dict(weight_decay=0.1, trust_coefficient=0.1, nesterov=nesterov)
        const = [run_optimizer(weights, grads, [0.3] * 5, momentum_style=s, **kw)[0] for s in STYLES]
        for a, b in zip(*const):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        varying = [run_optimizer(weights, grads, LRS, momentum_style=s, **kw)[0] for s in STYLES]
        assert not torch.allclose(varying[0][0], varying[1][0])


def test_group_overrides_and_skipped_gradients():
    """Each group uses its own hyper-parameters; a parameter without a gradient is left alone."""
    weights, grads = make_problem()
    grads[1][1] = None  # parameter 1 skips step 1: its buffer does not decay that step
    a = dict(momentum=0.8, weight_decay=0.2, trust_coefficient=0.05, eps=1e-6, trust_clip=True,
             nesterov=True, momentum_style="paper")
    b = dict(momentum=0.5, weight_decay=0.01, trust_coefficient=0.2, eps=0.0, trust_clip=False,
             nesterov=False, momentum_style="torch")
    for foreach in (False, True):
        params = [nn.Parameter(w.clone()) for w in weights]
        opt = LARS([{"params": params[:2], **a}, {"params": params[2:], **b}], lr=1.0, foreach=foreach)
        for t, lr in enumerate(LRS):
            for p, g in zip(params, grads[t]):
                p.grad = None if g is None else g.clone()
            for group in opt.param_groups:
                group["lr"] = lr
            opt.step()
        cfgs = [dict(a, exclude=False)] * 2 + [dict(b, exclude=False)] * 2
        for p, w in zip(params, reference_lars(weights, grads, LRS, cfgs)):
            torch.testing.assert_close(p.detach(), w, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("momentum", [0.5, 0.9])
@pytest.mark.parametrize("nesterov", [False, True])
def test_long_run_and_saved_buffers_match_reference(nesterov, momentum):
    """Long enough for the foreach path to fold its scaled buffers back (every 10 steps at momentum
    0.5, once at 0.9); the buffers in state_dict() are the plain momentum buffers of the formulas."""
    steps = 120
    weights, grads = make_problem(steps=steps, seed=2)
    lrs = [0.1 + 0.05 * math.sin(t) for t in range(steps)]
    hyper = dict(momentum=momentum, weight_decay=0.01, trust_coefficient=0.1, nesterov=nesterov)
    want, want_bufs = reference_lars(weights, grads, lrs, cfgs_for(4, (3,), **hyper), return_buffers=True)
    for foreach in (False, True):
        got, opt = run_optimizer(weights, grads, lrs, excluded_idx=(3,), foreach=foreach, **hyper)
        saved = opt.state_dict()["state"]  # numbered group by group: here in parameter order
        for i, (g, w, b) in enumerate(zip(got, want, want_bufs)):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
            assert set(saved[i]) == {"momentum_buffer"}
            torch.testing.assert_close(saved[i]["momentum_buffer"], b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("trust_clip", [False, True])
@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("style", STYLES)
def test_foreach_equals_per_tensor_float32(style, nesterov, trust_clip):
    weights, grads = make_problem(dtype=torch.float32, seed=1)
    kw = dict(weight_decay=1e-3, trust_coefficient=0.02, trust_clip=trust_clip, nesterov=nesterov,
              momentum_style=style)
    single, _ = run_optimizer(weights, grads, LRS, excluded_idx=(3,), foreach=False, **kw)
    multi, _ = run_optimizer(weights, grads, LRS, excluded_idx=(3,), foreach=True, **kw)
    for s, m in zip(single, multi):
        torch.testing.assert_close(m, s)


def test_foreach_groups_tensors_by_dtype():
    """float32 and float64 parameters in one group go through separate foreach buckets."""
    weights, grads = make_problem()
    weights[1], weights[3] = weights[1].float(), weights[3].float()
    grads = [[g.to(w.dtype) for g, w in zip(step, weights)] for step in grads]
    kw = dict(weight_decay=0.1, trust_coefficient=0.1)
    single, _ = run_optimizer(weights, grads, LRS, foreach=False, **kw)
    multi, _ = run_optimizer(weights, grads, LRS, foreach=True, **kw)
    for s, m in zip(single, multi):
        assert m.dtype == s.dtype
        torch.testing.assert_close(m, s)


@pytest.mark.parametrize("trust_clip", [False, True])
@pytest.mark.parametrize("foreach", [False, True])
def test_zero_norms_give_ratio_one(foreach, trust_clip):
    """w = 0 (fresh layer) and g = 0 (unused layer) step at the plain LR: ratio 1, not 0 or nan."""
    lr, wd = 0.5, 0.1
    w_zero = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    w_some = nn.Parameter(torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64))
    g = torch.tensor([0.3, 0.1, -0.2], dtype=torch.float64)
    w_zero.grad, w_some.grad = g.clone(), torch.zeros(3, dtype=torch.float64)
    opt = LARS([w_zero, w_some], lr=lr, weight_decay=wd, trust_clip=trust_clip, foreach=foreach)
    opt.step()
    torch.testing.assert_close(w_zero.detach(), -lr * g)  # d = 1 * (g + wd * 0)
    torch.testing.assert_close(w_some.detach(), torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64) * (1 - lr * wd))


@pytest.mark.parametrize("foreach", [False, True])
def test_zero_lr_with_trust_clip_is_finite_no_op(foreach):
    weights, grads = make_problem(steps=2)
    got, _ = run_optimizer(weights, grads, [0.0, 0.0], foreach=foreach, trust_clip=True, weight_decay=0.1)
    for g, w in zip(got, weights):
        assert torch.equal(g, w)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("style", STYLES)
def test_update_invariant_to_loss_scale(style, foreach):
    """With weight_decay = 0 and eps = 0 the ratio cancels any gradient scale (here 1024, as under
    mixed-precision loss scaling). Holds only where the ratio is applied, so no excluded group."""
    weights, grads = make_problem()
    scaled = [[g * 1024.0 for g in step] for step in grads]
    kw = dict(weight_decay=0.0, eps=0.0, trust_coefficient=0.01, momentum_style=style, nesterov=True)
    plain, _ = run_optimizer(weights, grads, LRS, foreach=foreach, **kw)
    big, _ = run_optimizer(weights, scaled, LRS, foreach=foreach, **kw)
    for a, b in zip(plain, big):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=0.0)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("style", STYLES)
def test_state_dict_round_trip_continues_identically(style, foreach):
    weights, grads = make_problem(steps=6)
    params = [nn.Parameter(w.clone()) for w in weights]
    groups = [{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:], "lars_exclude": True}]
    opt = LARS(groups, lr=0.2, trust_coefficient=0.1, momentum_style=style, nesterov=True, foreach=foreach)

    def step(o, ps, t):
        for p, g in zip(ps, grads[t]):
            p.grad = g.clone()
        o.step()

    for t in range(3):
        step(opt, params, t)
    saved = copy.deepcopy(opt.state_dict())
    clones = [nn.Parameter(p.detach().clone()) for p in params]
    opt2 = LARS([{"params": clones[:2]}, {"params": clones[2:]}], lr=99.0, foreach=foreach)
    opt2.load_state_dict(saved)
    assert opt2.param_groups[1]["lars_exclude"] and opt2.param_groups[0]["lr"] == 0.2
    for t in range(3, 6):
        for o in (opt, opt2):
            o.param_groups[0]["lr"] = o.param_groups[1]["lr"] = LRS[t - 1]
        step(opt, params, t)
        step(opt2, clones, t)
    for a, b in zip(params, clones):
        assert torch.equal(a, b)


def test_lars_param_groups_excludes_biases_and_norms():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LayerNorm(4), nn.Linear(4, 2))
    model[0].bias.requires_grad_(False)
    decay, excluded = lars_param_groups(model, weight_decay=5e-4)
    assert decay["weight_decay"] == 5e-4 and not decay.get("lars_exclude", False)
    assert excluded["weight_decay"] == 0.0 and excluded["lars_exclude"] is True
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(decay["params"]) == ids([model[0].weight, model[4].weight])
    assert ids(excluded["params"]) == ids([model[1].weight, model[1].bias, model[3].weight, model[3].bias,
                                           model[4].bias])
    LARS(lars_param_groups(model, 5e-4), lr=1.0)  # accepted as is


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=-0.1), "lr"),
    (dict(lr=float("nan")), "lr"),
    (dict(lr=1.0, momentum=-0.5), "momentum"),
    (dict(lr=1.0, weight_decay=-1e-4), "weight_decay"),
    (dict(lr=1.0, trust_coefficient=0.0), "trust_coefficient"),
    (dict(lr=1.0, eps=-1.0), "eps"),
    (dict(lr=1.0, momentum_style="tf"), "momentum_style"),
    (dict(lr=1.0, momentum=0.0, nesterov=True), "nesterov"),
])
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LARS([nn.Parameter(torch.ones(2))], **kwargs)


def test_invalid_group_override():
    with pytest.raises(ValueError, match="momentum_style"):
        LARS([{"params": [nn.Parameter(torch.ones(2))], "momentum_style": "nope"}], lr=1.0)


def test_closure_scheduler_and_grad_scaler():
    """step(closure) returns the loss; an LR scheduler and torch.amp.GradScaler drive it like SGD."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    opt = LARS(lars_param_groups(model, 1e-4), lr=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    first = opt.step(closure)
    assert first is not None and first.requires_grad
    for _ in range(3):
        opt.zero_grad()
        scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
        scaler.step(opt)
        scaler.update()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 / 8)
    assert nn.functional.mse_loss(model(x), y) < first
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_trains_inside_lightning():
    pl = pytest.importorskip("pytorch_lightning")

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))

        def training_step(self, batch, _):
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            opt = LARS(lars_param_groups(self, 1e-4), lr=0.5)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.LinearLR(opt, 0.5, total_iters=3)}

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(32, 4), torch.randn(32, 1))
    model = Tiny()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", devices=1, enable_checkpointing=False, logger=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=8))
    assert trainer.global_step == 3
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_non_contiguous_parameters():
    weights, grads = make_problem()
    weights[0] = weights[0].t().contiguous().t()  # same values, transposed strides
    grads = [[g.t().contiguous().t() if i == 0 else g for i, g in enumerate(step)] for step in grads]
    assert not weights[0].is_contiguous()
    kw = dict(weight_decay=0.1, trust_coefficient=0.1)
    want = reference_lars(weights, grads, LRS, cfgs_for(4, (), **kw))
    for foreach in (False, True):
        got, _ = run_optimizer(weights, grads, LRS, foreach=foreach, **kw)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_norms_do_not_overflow(dtype):
    """||w|| = 1e5 exceeds float16's range: norms and ratios are taken in float32."""
    weights = [torch.full((100, 100), 1000.0, dtype=dtype), torch.ones(4, dtype=dtype)]
    grads = [[torch.full_like(w, 0.01) for w in weights] for _ in range(3)]
    kw = dict(weight_decay=1e-4, trust_coefficient=0.01)
    single, _ = run_optimizer(weights, grads, LRS[:3], foreach=False, **kw)
    multi, _ = run_optimizer(weights, grads, LRS[:3], foreach=True, **kw)
    want = reference_lars([w.double() for w in weights], [[g.double() for g in s] for s in grads], LRS[:3],
                          cfgs_for(2, (), **kw))
    for s, m, w in zip(single, multi, want):
        assert s.dtype == m.dtype == dtype
        torch.testing.assert_close(m, s)
        torch.testing.assert_close(s.double(), w, rtol=1e-2, atol=1e-2)
