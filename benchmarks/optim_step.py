"""Step time of sciml's LARS and LAMB against torch.optim.SGD on a ResNet-50-shaped parameter set.

The parameter shapes are those of torchvision's ``resnet50()`` (161 tensors, 25,557,032 values), written
out by hand so that torchvision is not needed. Every optimizer gets its own copy of the parameters and a
fixed random gradient. After a warm-up the optimizers are stepped in turn, one step each per round, so
that load on the machine hits them alike; the median over the rounds is reported.

    PYTHONPATH=. python benchmarks/optim_step.py --reps 40 --out docs/optim-benchmark.md

With ``--out`` the table replaces the part of the file between the two marker lines below (the whole
file if it has none), so the prose around it survives re-runs.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from sciml.optim import LAMB, LARS

BEGIN, END = "<!-- optim_step:begin -->", "<!-- optim_step:end -->"
BASELINE = "SGD momentum=0.9 (baseline)"


def resnet50_shapes() -> list[tuple[int, ...]]:
    """Parameter shapes of torchvision's resnet50, in ``model.parameters()`` order."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]  # stem conv + BN
    inplanes = 64
    for planes, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            shapes += [(planes, inplanes, 1, 1), (planes,), (planes,),  # bottleneck: 1x1, 3x3, 1x1
                       (planes, planes, 3, 3), (planes,), (planes,),
                       (planes * 4, planes, 1, 1), (planes * 4,), (planes * 4,)]
            if b == 0:  # projection shortcut: 1x1 conv + BN
                shapes += [(planes * 4, inplanes, 1, 1), (planes * 4,), (planes * 4,)]
            inplanes = planes * 4
    return shapes + [(1000, 2048), (1000,)]  # fc


def make_params(shapes, seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.05)
        p.grad = torch.randn(shape, generator=gen) * 1e-3
        params.append(p)
    return params


def split_groups(params, weight_decay: float) -> list[dict]:
    """What lars_param_groups builds from a model: 1-d tensors excluded, the rest decayed."""
    return [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "lars_exclude": True},
    ]


def candidates(wd: float) -> dict[str, tuple[str, Callable[[list], torch.optim.Optimizer]]]:
    """name -> (the SGD row it is fairly compared with, optimizer factory)."""
    sgd_wd = f"SGD momentum=0.9, wd={wd:g}"
    excl = f"wd={wd:g}, 1-d tensors excluded"
    return {
        BASELINE: (BASELINE, lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=True)),
        sgd_wd: (sgd_wd, lambda ps: torch.optim.SGD(split_groups(ps, wd), lr=0.1, momentum=0.9, foreach=True)),
        "LARS foreach, wd=0": (BASELINE, lambda ps: LARS(ps, lr=0.1, foreach=True)),
        f"LARS foreach, {excl}": (sgd_wd, lambda ps: LARS(split_groups(ps, wd), lr=0.1, foreach=True)),
        f"LARS per-tensor, {excl}": (sgd_wd, lambda ps: LARS(split_groups(ps, wd), lr=0.1, foreach=False)),
        f"LAMB foreach, {excl}": (sgd_wd, lambda ps: LAMB(split_groups(ps, wd), lr=1e-3, foreach=True)),
        f"LAMB per-tensor, {excl}": (sgd_wd, lambda ps: LAMB(split_groups(ps, wd), lr=1e-3, foreach=False)),
    }


def measure(factories: dict[str, Callable], shapes, reps: int, warmup: int) -> dict[str, list[float]]:
    optimizers = {name: make(make_params(shapes)) for name, make in factories.items()}
    for opt in optimizers.values():
        for _ in range(warmup):
            opt.step()
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for _ in range(reps):
        for name, opt in optimizers.items():
            t0 = time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - t0)
    return times


def table(times: dict[str, list[float]], fair: dict[str, str]) -> str:
    med = {name: statistics.median(ts) for name, ts in times.items()}
    lines = ["| optimizer | median step (ms) | min (ms) | / SGD baseline | / SGD with the same wd |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name, ts in times.items():
        lines.append(f"| {name} | {med[name] * 1e3:.1f} | {min(ts) * 1e3:.1f} | "
                     f"{med[name] / med[BASELINE]:.2f}x | {med[name] / med[fair[name]]:.2f}x |")
    return "\n".join(lines)


def write_block(path: Path, block: str) -> None:
    block = f"{BEGIN}\n{block}\n{END}"
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=40, help="timed rounds (one step per optimizer each)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per optimizer first")
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                    help="torch threads (default: the cores this process may use)")
    ap.add_argument("--out", type=Path, default=None, help="also write the table into this Markdown file")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    shapes = resnet50_shapes()
    n_values = sum(torch.Size(s).numel() for s in shapes)
    assert len(shapes) == 161 and n_values == 25_557_032, (len(shapes), n_values)

    rows = candidates(args.weight_decay)
    times = measure({name: make for name, (_, make) in rows.items()}, shapes, args.reps, args.warmup)
    block = (f"ResNet-50 parameter set: {len(shapes)} tensors, {n_values:,} float32 values. "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs "
             f"({platform.machine()}); median of {args.reps} interleaved rounds after {args.warmup} "
             f"warm-up steps.\n\n" + table(times, {name: fair for name, (fair, _) in rows.items()}))
    print(block)
    if args.out:
        write_block(args.out, block)
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
