"""One run: seed, build datamodule, model, task and trainer from the config; fit; test the best checkpoint;
predict; write the run directory (config.yaml, metrics.json, checkpoints/, plots/, predictions/).

A test-only run (`train=false ckpt_path=CKPT`, and `python -m sciml predict`) rebuilds data, model and task from
the config the checkpoint carries."""
from __future__ import annotations

import inspect
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
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from sciml import config_check, distributed, rundir, signals
from sciml.allocator import keep_freed_memory
from sciml.data import DataModule, PredictionWriter
from sciml.distributed import launch
from sciml.errors import SciMLError
from sciml.threads import configure_threads

log = logging.getLogger("sciml")


class JobFailed(CompactHydraException):
    """A failed multirun job: Hydra records it, runs the other jobs, and prints this one line at the end."""


def run_job(cfg: DictConfig) -> float | None:
    """Hydra's task function. Returns the configured objective so that sweepers can use it.

    Errors become one line naming what is wrong; the full traceback goes to `<run>/error.log` (and to the console
    with HYDRA_FULL_ERROR=1). In a multirun the failure is re-raised so that Hydra records the job as failed while
    the other jobs go on. A fit stopped by a signal exits with 128 + its number (sciml.signals).
    """
    # Idempotent; needed where the task function runs in a process that did not start as `python -m sciml` (a Ray
    # worker, a submitit job): DDP ranks re-launched by Lightning must run this job, and strategy=hybrid must exist.
    distributed.setup()
    try:
        with rundir.claim(cfg):  # lock, resume policy, error.log
            return run(cfg)
    except BaseException as exc:
        if signals.stopped_by_signal(exc):
            raise SystemExit(signals.exit_code()) from None
        if not isinstance(exc, Exception) or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        # a SciMLError raised while Hydra instantiates (e.g. in a datamodule's __init__) arrives wrapped: unwrap it
        cause = exc.__cause__ if isinstance(exc.__cause__, SciMLError) else exc
        message = str(cause) if isinstance(cause, SciMLError) else f"{type(exc).__name__}: {exc}"
        message = " ".join(message.split())
        if getattr(exc, "error_log", None) and not isinstance(cause, SciMLError):
            message += f" (details: {exc.error_log})"
        log.error(message)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise JobFailed(message) from None
        raise SystemExit(1) from None


def run(cfg: DictConfig) -> float | None:
    """One run of the composed config (see the module docstring); returns the objective's value."""
    for key in ("data", "model", "task"):
        if key not in cfg:
            raise SciMLError(f"the config has no '{key}': select a plugin with +plugin=NAME")
    config_check.check(cfg)  # keys and value types, before anything is built or read
    out = Path(cfg.paths.output_dir)
    configure_threads(cfg.get("threads", "auto"), cfg.trainer.get("devices"))  # before any torch work
    keep_freed_memory(cfg.get("malloc_keep_mb", 1024))
    cfg = with_checkpoint_config(cfg)
    pl.seed_everything(cfg.seed, workers=True)

    datamodule = instantiate(cfg.data)
    hand_shapes_to_model(cfg, datamodule)
    model = instantiate(cfg.model)
    task = instantiate(cfg.task, model=model, optimizer=cfg.optimizer, scheduler=cfg.scheduler, _recursive_=False)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    callbacks.append(ConfigInCheckpoint(cfg))
    if hasattr(datamodule, "write_predictions"):
        callbacks.append(PredictionWriter(out / "predictions"))
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    # sciml's datamodules give each rank its own shard: Lightning's DistributedSampler would shard the shards.
    sampler = {"use_distributed_sampler": False} if isinstance(datamodule, DataModule) else {}
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                      strategy=_strategy(cfg.strategy), plugins=[rundir.checkpoint_io()], **sampler)
    with launch.job_scope(trainer):  # ends this job's DDP processes and process group (multirun: before the next)
        return _fit_test_predict(cfg, trainer, task, datamodule, out)


# -- the config a checkpoint carries ----------------------------------------------------------------------------------
CHECKPOINT_KEY = "sciml"
DOMAIN_KEYS = ("data", "model", "task")  # what a checkpoint's own config decides when it is tested or predicts


class ConfigInCheckpoint(pl.Callback):
    """Every checkpoint carries the run's resolved config and its plugin, so that `python -m sciml predict CKPT`
    (and `train=false ckpt_path=CKPT`) rebuild the data, model and task with nothing else."""

    def __init__(self, cfg: DictConfig):
        choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
        self.record = {"plugin": choices.get("plugin"), "config": OmegaConf.to_container(cfg, resolve=True)}

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        checkpoint[CHECKPOINT_KEY] = self.record


def saved_config(path: str | Path) -> dict | None:
    """`{"plugin": name, "config": resolved config}` of a sciml checkpoint; None for checkpoints without one."""
    _check_file(str(path), "ckpt_path")
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as exc:
        raise SciMLError(f"ckpt_path: '{path}' is not a readable Lightning checkpoint ({type(exc).__name__}: {exc})") \
            from None
    return checkpoint.get(CHECKPOINT_KEY)


def with_checkpoint_config(cfg: DictConfig) -> DictConfig:
    """A test-only run (`train=false ckpt_path=...`) takes data, model and task from the checkpoint's own config;
    keys given on this command line (e.g. `data.test_path`, `data.batch_size`) still win."""
    if cfg.train or not cfg.ckpt_path:
        return cfg
    record = saved_config(cfg.ckpt_path)
    if record is None:
        log.warning("ckpt_path: %s carries no config (an older checkpoint): using this run's config", cfg.ckpt_path)
        return cfg
    given = set()
    if HydraConfig.initialized():
        given = {o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task}
    saved = record["config"]
    with open_dict(cfg):
        for section in DOMAIN_KEYS:
            merged = OmegaConf.create(saved[section])
            for key in sorted(k for k in given if k.startswith(f"{section}.")):
                OmegaConf.update(merged, key[len(section) + 1:], OmegaConf.select(cfg, key), force_add=True)
            cfg[section] = merged
    return cfg


def hand_shapes_to_model(cfg: DictConfig, datamodule) -> None:
    """The data's row shape becomes `model.input_shape` when the network takes one (no image sizes or channel
    counts to keep in sync by hand). Files are opened and validated here, before anything is built."""
    if not isinstance(datamodule, DataModule):
        return
    datamodule.prepare("fit" if cfg.train else "test")
    shape = datamodule.input_shape
    target = get_object(cfg.model._target_)
    if shape is None or "input_shape" not in inspect.signature(target).parameters:
        return
    given = cfg.model.get("input_shape")
    fixed = type(datamodule.reader).fixed_dims  # e.g. 1: a fully convolutional network takes any grid
    if given is not None and tuple(given)[:fixed] != tuple(shape)[:fixed]:
        raise SciMLError(f"model.input_shape={list(given)}, but the data's rows have shape {list(shape)}"
                         + (" (the checkpoint was trained on other data)" if not cfg.train else ""))
    if given is None or cfg.train:  # a checkpoint's network stays the one it was trained as
        with open_dict(cfg):
            cfg.model.input_shape = list(shape)


def _fit_test_predict(cfg: DictConfig, trainer: pl.Trainer, task: pl.LightningModule,
                      datamodule: pl.LightningDataModule, out: Path) -> float | None:
    if trainer.is_global_zero:
        out.mkdir(parents=True, exist_ok=True)
        rundir.write_text(out / rundir.CONFIG, OmegaConf.to_yaml(cfg, resolve=True))

    _DROPPED.clear()
    checkpoint = next((c for c in trainer.checkpoint_callbacks if c.monitor), None)  # the best-model one
    fit_metrics: dict[str, float] = {}
    if cfg.train:
        last = rundir.last_checkpoint(out)
        resume = cfg.ckpt_path or (str(last) if last.is_file() else None)
        if resume:
            if cfg.ckpt_path:
                _check_checkpoint(resume, task, "ckpt_path")
            else:
                _check_checkpoint(resume, task, f"run directory '{out}'", hint=", or a new run directory")
            log.info("resuming from %s", resume)
        rundir.continue_logs(trainer, resume)  # metrics.csv and TensorBoard keep the epochs before `resume`
        trainer.fit(task, datamodule=datamodule, ckpt_path=resume)
        fit_metrics = _floats(trainer.callback_metrics)
        test_ckpt = checkpoint.best_model_path if checkpoint and checkpoint.best_model_path else None
        if checkpoint and checkpoint.best_model_score is not None:
            fit_metrics[f"{checkpoint.monitor}_best"] = float(checkpoint.best_model_score)
    else:
        if not cfg.ckpt_path:
            raise SciMLError("train=false needs ckpt_path=PATH (a checkpoint of a trained run)")
        test_ckpt = _check_checkpoint(cfg.ckpt_path, task, "ckpt_path")

    scored = not isinstance(datamodule, DataModule) or datamodule.has_labels("test")
    test_metrics = trainer.test(task, datamodule=datamodule, ckpt_path=test_ckpt) if scored else []
    if not scored:
        log.info("the test files have no labels: predicted, not scored")
    if hasattr(datamodule, "write_predictions"):
        trainer.predict(task, datamodule=datamodule, ckpt_path=test_ckpt, return_predictions=False)

    metrics = {**fit_metrics, **(_floats(test_metrics[0]) if test_metrics else {})}
    # the network's size, an objective of architecture searches (sciml/sweepers)
    metrics["model/params"] = float(sum(p.numel() for p in task.model.parameters()))
    # warning/<metric>: why a value is missing (NaN) or weak; strings next to the float metrics
    warnings = {**_DROPPED, **getattr(task, "metric_warnings", {})}
    if trainer.is_global_zero:
        rundir.write_text(out / "metrics.json",
                          json.dumps(dict(sorted({**metrics, **warnings}.items())), indent=2, allow_nan=False))
        log.info("metrics: %s", json.dumps({k: round(v, 5) for k, v in sorted(metrics.items())}))
        _log_hyperparams(trainer, cfg, metrics)
        log.info("run directory: %s", out)
    return _objective(metrics, cfg.objective) if cfg.train else metrics.get(cfg.objective)


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
        raise SciMLError(f"{key}: '{path}' is not a readable Lightning checkpoint ({type(exc).__name__}: {exc})") \
            from None
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
            _DROPPED[f"warning/{key}"] = f"{value}: left out of the metrics"
    return clean


_DROPPED: dict[str, str] = {}  # non-finite metrics of this run, recorded as warning entries in metrics.json


def _log_hyperparams(trainer: pl.Trainer, cfg: DictConfig, metrics: dict[str, float]) -> None:
    """The run's resolved config and final metrics to every logger (TensorBoard's HPARAMS tab, MLflow params)."""
    from sciml.tracking import log_run

    log_run(trainer, cfg, metrics)


def _objective(metrics: dict[str, float], name: str) -> float | None:
    if name not in metrics:
        log.warning("objective '%s' was not measured; metrics are: %s", name, ", ".join(sorted(metrics)))
        return None
    return metrics[name]
