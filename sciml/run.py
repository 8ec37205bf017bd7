"""One run: seed, build datamodule, model, task and trainer from the config; fit; test the best checkpoint;
predict; write the run directory (config.yaml, metrics.json, checkpoints/, plots/, predictions/)."""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from sciml.distributed import launch  # also registers strategy "hybrid" with Lightning
from sciml.errors import SciMLError
from sciml.threads import configure_threads

log = logging.getLogger("sciml")


class JobFailed(CompactHydraException):
    """A failed multirun job: Hydra records it, runs the other jobs, and prints this one line at the end."""


def run_job(cfg: DictConfig) -> float | None:
    """Hydra's task function. Returns the configured objective so that sweepers can use it.

    Errors become one line naming what is wrong; the full traceback is kept for HYDRA_FULL_ERROR=1. In a multirun
    the failure is re-raised so that Hydra records the job as failed while the other jobs go on.
    """
    try:
        return run(cfg)
    except Exception as exc:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        message = str(exc) if isinstance(exc, SciMLError) else f"{type(exc).__name__}: {exc}"
        message = " ".join(message.split())
        log.error(message)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise JobFailed(message) from None
        raise SystemExit(1) from None


def run(cfg: DictConfig) -> float | None:
    for key in ("data", "model", "task"):
        if key not in cfg:
            raise SciMLError(f"the config has no '{key}': select a plugin with +plugin=NAME")
    out = Path(cfg.paths.output_dir)
    configure_threads(cfg.get("threads", "auto"), cfg.trainer.get("devices"))  # before any torch work
    pl.seed_everything(cfg.seed, workers=True)

    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    task = instantiate(cfg.task, model=model, optimizer=cfg.optimizer, scheduler=cfg.scheduler, _recursive_=False)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    # A datamodule that gives each rank its own shard (`shards_by_rank = True`) must not get Lightning's
    # DistributedSampler on top, which would shard the shards.
    sampler = {"use_distributed_sampler": False} if getattr(datamodule, "shards_by_rank", False) else {}
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                      strategy=_strategy(cfg.strategy), **sampler)
    with launch.job_scope(trainer):  # ends this job's DDP processes and process group (multirun: before the next)
        return _fit_test_predict(cfg, trainer, task, datamodule, out)


def _fit_test_predict(cfg: DictConfig, trainer: pl.Trainer, task: pl.LightningModule,
                      datamodule: pl.LightningDataModule, out: Path) -> float | None:
    if trainer.is_global_zero:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))

    checkpoint = next((c for c in trainer.checkpoint_callbacks if c.monitor), None)  # the best-model one
    fit_metrics: dict[str, float] = {}
    if cfg.train:
        last = out / "checkpoints" / "last.ckpt"
        resume = cfg.ckpt_path or (str(last) if last.is_file() else None)
        if resume:
            if cfg.ckpt_path:
                _check_checkpoint(resume, task, "ckpt_path")
            else:
                _check_checkpoint(resume, task, f"run directory '{out}'", hint=", or a new run directory")
            log.info("resuming from %s", resume)
        trainer.fit(task, datamodule=datamodule, ckpt_path=resume)
        fit_metrics = _floats(trainer.callback_metrics)
        test_ckpt = checkpoint.best_model_path if checkpoint and checkpoint.best_model_path else None
        if checkpoint and checkpoint.best_model_score is not None:
            fit_metrics[f"{checkpoint.monitor}_best"] = float(checkpoint.best_model_score)
    else:
        if not cfg.ckpt_path:
            raise SciMLError("train=false needs ckpt_path=PATH (a checkpoint of a trained run)")
        test_ckpt = _check_checkpoint(cfg.ckpt_path, task, "ckpt_path")

    test_metrics = trainer.test(task, datamodule=datamodule, ckpt_path=test_ckpt)
    predictions = _gather_on_rank_zero(trainer, trainer.predict(task, datamodule=datamodule, ckpt_path=test_ckpt))

    metrics = {**fit_metrics, **(_floats(test_metrics[0]) if test_metrics else {})}
    # the network's size, an objective of architecture searches (sciml/sweepers)
    metrics["model/params"] = float(sum(p.numel() for p in task.model.parameters()))
    if trainer.is_global_zero:
        _save_predictions(datamodule, predictions, out / "predictions")
        tmp = out / ".metrics.json.tmp"  # written whole, then renamed: readers never see half a file
        tmp.write_text(json.dumps(dict(sorted(metrics.items())), indent=2, allow_nan=False))
        tmp.replace(out / "metrics.json")
        log.info("metrics: %s", json.dumps({k: round(v, 5) for k, v in sorted(metrics.items())}))
        log.info("run directory: %s", out)
    return _objective(metrics, cfg.objective)


def _strategy(cfg: DictConfig):
    if "_target_" in cfg:
        return instantiate(cfg)
    return cfg.get("name", "auto")


def _check_file(path: str, key: str) -> str:
    if not Path(path).is_file():
        raise SciMLError(f"{key}: no such file '{path}'")
    return str(path)


def _check_checkpoint(path: str, task: pl.LightningModule, key: str, hint: str = "") -> str:
    """A checkpoint of another network (other widths, depth, channels) would fail deep in Lightning with a
    many-line state_dict error: name the checkpoint and the first differences in one line instead."""
    _check_file(path, key)
    try:
        saved = torch.load(path, map_location="cpu", mmap=True, weights_only=False)["state_dict"]
    except Exception as exc:
        raise SciMLError(f"{key}: '{path}' is not a readable Lightning checkpoint ({type(exc).__name__}: {exc})")
    # Only the network's tensors: tasks may add buffers (e.g. class weights) when they are set up.
    expected = {k: tuple(v.shape) for k, v in task.state_dict().items() if k.startswith("model.")}
    saved = {k: tuple(v.shape) for k, v in saved.items() if k.startswith("model.")}
    differences = [f"{k} missing" for k in expected if k not in saved]
    differences += [f"{k} unexpected" for k in saved if k not in expected]
    differences += [f"{k} is {saved[k]}, expected {expected[k]}" for k in expected
                    if k in saved and saved[k] != expected[k]]
    if differences:
        more = f" and {len(differences) - 3} more" if len(differences) > 3 else ""
        raise SciMLError(f"{key}: '{path}' was saved by a different model ({'; '.join(differences[:3])}{more}): "
                         f"use the model config it was trained with{hint}")
    return str(path)


def _floats(metrics) -> dict[str, float]:
    """Stage metrics (train/, val/, test/, comm/) as plain floats, epoch aggregates under their plain name; per-step
    values and the LR monitor's entries are left to the logger. Non-finite values are dropped with a warning."""
    clean = {}
    for key, value in metrics.items():
        if not key.startswith(("train/", "val/", "test/", "comm/")) or key.endswith("_step"):
            continue
        key = key.removesuffix("_epoch")
        value = float(value.item() if isinstance(value, torch.Tensor) else value)
        if math.isfinite(value):
            clean[key] = value
        else:
            log.warning("metric %s is %s; left out of metrics.json", key, value)
    return clean


def _objective(metrics: dict[str, float], name: str) -> float | None:
    if name not in metrics:
        log.warning("objective '%s' was not measured; metrics are: %s", name, ", ".join(sorted(metrics)))
        return None
    return metrics[name]


def _gather_on_rank_zero(trainer: pl.Trainer, batches: list | None) -> list | None:
    """Every rank's predict-step outputs on rank 0, in rank order (None on the other ranks).

    Under DDP `trainer.predict` returns the outputs of this rank's part of the data only (the datamodule's own shard,
    or Lightning's unpadded predict sampler): gathering them gives every row exactly once. Objects, not tensors, are
    gathered because the ranks may hold different numbers of rows.
    """
    if trainer.world_size == 1 or not torch.distributed.is_initialized():
        return batches
    gathered = [None] * trainer.world_size if trainer.is_global_zero else None
    torch.distributed.gather_object(batches or [], gathered, dst=0)
    return [batch for rank_batches in gathered for batch in rank_batches] if trainer.is_global_zero else None


def _save_predictions(datamodule, batches, directory: Path) -> None:
    """Concatenate the predict-step outputs and hand them to the plugin's writer (domain format).

    Each key becomes one array, or a list of per-sample arrays when samples differ in shape (whole volumes of
    different sizes)."""
    if not batches:
        return
    merged = {}
    for key in batches[0]:
        parts = [b[key] for b in batches]
        if len({p.shape[1:] for p in parts}) == 1:
            merged[key] = torch.cat(parts).numpy()
        else:
            merged[key] = [sample.numpy() for p in parts for sample in p]
    directory.mkdir(parents=True, exist_ok=True)
    writer = getattr(datamodule, "save_predictions", None)
    if writer is None:
        import numpy as np

        arrays = {}
        for key, value in merged.items():  # per-sample arrays as key_0, key_1, ...
            arrays |= {f"{key}_{i}": v for i, v in enumerate(value)} if isinstance(value, list) else {key: value}
        np.savez_compressed(directory / "predictions.npz", **arrays)
    else:
        writer(merged, directory)
