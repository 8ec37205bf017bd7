"""sciml against a raw PyTorch loop, per plugin: the same data, network, optimizer, schedule, batch and seed,
interleaved in one process (after Lightning's own `tests/parity_pytorch`).

The sciml side is what `python -m sciml +plugin=NAME` builds (`sciml.run`: the configured Trainer with all of
sciml's callbacks and loggers), fitted. The raw side is a plain loop in the style of Lightning's `vanilla_loop`:
the plugin's datamodule's DataLoaders, `batch.to(device)`, the datamodule's `on_after_batch_transfer`, the task's
`training_step` (its loss), `backward`, `optimizer.step`, `zero_grad`, `scheduler.step`; a validation pass each
epoch (forward only, untimed), as sciml's Trainer runs one, so both sides draw the same random numbers and see
the same batches. Losses of the first steps must agree; the training rate is training samples per second of the
training loop (first batch to last batch of each epoch, validation excluded), epochs after the first, summed, per
second of wall time and per second of this process's CPU time (on a shared machine the CPU-time ratio is the
steadier measure of the framework's own cost: other jobs' load moves wall time far more).
Rounds alternate which side goes first; the ratio is taken within each round (the machine's load drifts).

    PYTHONPATH=. python benchmarks/parity.py --plugins hep --rounds 3 --out docs/performance.md
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from types import SimpleNamespace
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from pytorch_lightning.utilities.data import extract_batch_size

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_bench import compose  # noqa: E402
from markers import replace_block  # noqa: E402

from sciml.allocator import keep_freed_memory  # noqa: E402
from sciml.optim.factory import build_optimizer, build_scheduler  # noqa: E402
from sciml.run import _strategy, hand_shapes_to_model  # noqa: E402
from sciml.threads import configure_threads  # noqa: E402

# Small per-plugin settings so that a round takes a minute or two on 2 cores; the network, optimizer and batch
# are the plugin's defaults.
SEED = 1234
SETTINGS = {"hep": [], "climate": [], "tumor": ["data.samples_per_epoch=256"], "hail": []}


class EpochClock(pl.Callback):
    """Training-loop time per epoch (first batch start to last batch end) and the first step losses."""

    def __init__(self, keep_losses: int):
        self.keep, self.losses, self.epochs = keep_losses, [], []

    def on_train_start(self, trainer, pl_module):
        torch.manual_seed(SEED)  # dropout draws from here on: the same on both sides

    def on_train_epoch_start(self, trainer, pl_module):
        self._start, self._cpu_start, self._samples = time.perf_counter(), time.process_time(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._samples += extract_batch_size(batch)
        self._end, self._cpu_end = time.perf_counter(), time.process_time()
        if len(self.losses) < self.keep:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.losses.append(float(loss))

    def on_train_epoch_end(self, trainer, pl_module):
        self.epochs.append((self._samples, self._end - self._start, self._cpu_end - self._cpu_start))


def fixed_order(datamodule, seed: int) -> None:
    """Both sides shuffle the training rows with their own generator seeded alike, so that they see the same batches
    whatever else draws from torch's global generator (Lightning creates its loader iterators at other moments than
    a plain loop does)."""
    make = datamodule.train_dataloader

    def train_dataloader():
        loader = make()
        return torch.utils.data.DataLoader(loader.dataset, batch_size=loader.batch_size, shuffle=True,
                                           collate_fn=loader.collate_fn, num_workers=loader.num_workers,
                                           persistent_workers=loader.persistent_workers,
                                           generator=torch.Generator().manual_seed(seed))

    datamodule.train_dataloader = train_dataloader


def sciml_run(plugin: str, overrides: list[str], epochs: int, batches: int, keep: int, out: Path):
    cfg = compose(plugin, [*SETTINGS[plugin], *overrides, f"trainer.max_epochs={epochs}",
                           f"+trainer.limit_train_batches={batches}", "+trainer.limit_val_batches=2",
                           f"hydra.run.dir={out}"])
    from omegaconf import open_dict

    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    pl.seed_everything(cfg.seed, workers=True)  # as sciml.run.run, in the same order
    datamodule = instantiate(cfg.data)
    fixed_order(datamodule, cfg.seed)
    hand_shapes_to_model(cfg, datamodule)  # as sciml.run: the data's row shape becomes model.input_shape
    model = instantiate(cfg.model)
    task = instantiate(cfg.task, model=model, optimizer=cfg.optimizer, scheduler=cfg.scheduler, _recursive_=False)
    clock = EpochClock(keep)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None] + [clock]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    sampler = {"use_distributed_sampler": False} if getattr(datamodule, "shards_by_rank", False) else {}
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                          strategy=_strategy(cfg.strategy), **sampler)
    trainer.fit(task, datamodule=datamodule)
    return clock.losses, clock.epochs


def raw_run(plugin: str, overrides: list[str], epochs: int, batches: int, keep: int):
    cfg = compose(plugin, [*SETTINGS[plugin], *overrides])
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    fixed_order(datamodule, cfg.seed)
    hand_shapes_to_model(cfg, datamodule)  # as sciml.run: the data's row shape becomes model.input_shape
    model = instantiate(cfg.model)
    task = instantiate(cfg.task, model=model, optimizer=cfg.optimizer, scheduler=cfg.scheduler, _recursive_=False)
    datamodule.setup("fit")
    if getattr(task, "auto_weights", False):  # what SegmentationTask.setup does from the trainer's datamodule
        from sciml.tasks.segmentation import inverse_sqrt_frequency

        task.class_weight.copy_(inverse_sqrt_frequency(torch.as_tensor(datamodule.class_frequencies(),
                                                                       dtype=torch.float32)))
    device = torch.device("cpu")
    task.to(device)
    train, val = datamodule.train_dataloader(), datamodule.val_dataloader()
    # the one trainer attribute a datamodule's batch hook reads: training (tumour slices are augmented only then)
    phase = datamodule.trainer = SimpleNamespace(training=False)
    steps_per_epoch = min(batches, len(train))
    optimizer = build_optimizer(cfg.optimizer, task.model, datamodule.batch_size)
    scheduler = build_scheduler(cfg.scheduler or {}, optimizer, steps_per_epoch * epochs, steps_per_epoch)

    def validate(limit):
        task.eval()
        with torch.no_grad():
            for i, batch in enumerate(val):
                if i == limit:
                    break
                batch = datamodule.on_after_batch_transfer({k: v.to(device) for k, v in batch.items()}, 0)
                task.evaluate_batch(batch, "val")  # as validation_step (volumes: a sliding window)
        task.train()

    validate(2)  # the Trainer's sanity check
    torch.manual_seed(SEED)
    losses, times = [], []
    for _ in range(epochs):
        phase.training = True
        start, cpu_start, samples = time.perf_counter(), time.process_time(), 0
        for i, batch in enumerate(train):
            if i == batches:
                break
            batch = datamodule.on_after_batch_transfer({k: v.to(device) for k, v in batch.items()}, 0)
            loss = task.training_step(batch, i)
            loss = loss["loss"] if isinstance(loss, dict) else loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            samples += extract_batch_size(batch)
            end, cpu_end = time.perf_counter(), time.process_time()
            if len(losses) < keep:
                losses.append(float(loss))
        times.append((samples, end - start, cpu_end - cpu_start))
        phase.training = False
        validate(2)
    # as the Trainer does: close the data files here, not whenever the garbage collector runs (netCDF-C is not
    # thread-safe, and a collection in another thread, such as the next run's progress-bar thread, crashed hail)
    datamodule.teardown("fit")
    return losses, times


def rate(epochs: list[tuple[int, float, float]], clock: int = 1) -> float:
    """Training samples per second of wall time (clock=1) or of this process's CPU time (clock=2), epochs after
    the first."""
    later = epochs[1:] or epochs
    return sum(e[0] for e in later) / sum(e[clock] for e in later)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plugins", nargs="+", default=["hep"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batches", type=int, default=30, help="training batches per epoch")
    parser.add_argument("--steps", type=int, default=10, help="first steps whose losses must agree")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--malloc-keep-mb", type=lambda v: None if v == "null" else int(v), default=1024,
                        help="sciml's malloc_keep_mb for the process (both sides share it); null: glibc's defaults")
    parser.add_argument("overrides", nargs="*", help="config overrides for both sides")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    threads = configure_threads("auto", 1)  # both sides share the process and its threads
    keep_freed_memory(args.malloc_keep_mb)  # and its allocator: as `python -m sciml` sets it up
    rows = []
    for plugin in args.plugins:
        ratios, cpu_ratios, sciml_rates, raw_rates, worst = [], [], [], [], 0.0
        for r in range(args.rounds):
            order = ("sciml", "raw") if r % 2 == 0 else ("raw", "sciml")
            result = {}
            for side in order:
                if side == "sciml":
                    with tempfile.TemporaryDirectory() as tmp:
                        result[side] = sciml_run(plugin, args.overrides, args.epochs, args.batches, args.steps,
                                                 Path(tmp))
                else:
                    result[side] = raw_run(plugin, args.overrides, args.epochs, args.batches, args.steps)
            (sl, se), (rl, re) = result["sciml"], result["raw"]
            worst = max(worst, max(abs(a - b) for a, b in zip(sl, rl)))
            sciml_rates.append(rate(se))
            raw_rates.append(rate(re))
            ratios.append(sciml_rates[-1] / raw_rates[-1])
            cpu_ratios.append(rate(se, 2) / rate(re, 2))
            print(f"{plugin} round {r + 1}: sciml {sciml_rates[-1]:.0f}, raw {raw_rates[-1]:.0f} samples/s, "
                  f"ratio {ratios[-1]:.3f}, CPU-time ratio {cpu_ratios[-1]:.3f}; first losses sciml {[round(x, 5) for x in sl[:4]]} "
                  f"raw {[round(x, 5) for x in rl[:4]]}", flush=True)
        rows.append((plugin, statistics.median(sciml_rates), statistics.median(raw_rates),
                     statistics.median(ratios), min(ratios), max(ratios), statistics.median(cpu_ratios),
                     min(cpu_ratios), max(cpu_ratios), worst))
    lines = ["| plugin | sciml samples/s | raw PyTorch samples/s | wall-time rate ratio (median, range) | "
             f"CPU-time rate ratio (median, range) | max abs. difference of the first {args.steps} losses |",
             "|---|---|---|---|---|---|"]
    for plugin, s, r, ratio, lo, hi, cpu, cpu_lo, cpu_hi, worst in rows:
        lines.append(f"| {plugin} | {s:.0f} | {r:.0f} | {ratio:.3f} ({lo:.3f}-{hi:.3f}) | {cpu:.3f} "
                     f"({cpu_lo:.3f}-{cpu_hi:.3f}) | {worst:.1e} |")
    lines.append("")
    lines.append(f"{args.rounds} interleaved rounds of {args.epochs} epochs x {args.batches} batches per side, "
                 f"epochs after the first timed, {threads} thread(s), load average {os.getloadavg()[0]:.1f} on "
                 f"{os.cpu_count()} CPUs. Command: `PYTHONPATH=. python benchmarks/parity.py --plugins "
                 f"{' '.join(args.plugins)} --rounds {args.rounds}`.")
    table = "\n".join(lines)
    print(table)
    if args.out:
        replace_block(args.out, "parity", table)
    if any(not math.isfinite(row[-1]) or row[-1] > 1e-4 for row in rows):
        sys.exit("losses differ between sciml and the raw loop")


if __name__ == "__main__":
    main()
