"""The end of a run, told to every logger: the resolved config as hyperparameters and the final metrics.

TensorBoard gets them in its HPARAMS tab (hyperparameters next to the final metrics, comparable across runs), the
CSV logger in `hparams.yaml`, MLflow as the run's parameters and metrics with the plots, `config.yaml` and
`metrics.json` as artifacts (`logger=mlflow`: a SQLite tracking store in the run directory, conf/logger/mlflow.yaml).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.core.saving import save_hparams_to_yaml
from pytorch_lightning.loggers import MLFlowLogger, TensorBoardLogger

log = logging.getLogger(__name__)


def hyperparameters(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config without the run's paths (they differ in every run and say nothing of the model)."""
    params = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    params.pop("paths", None)
    return params


def log_run(trainer: pl.Trainer, cfg: DictConfig, metrics: dict[str, float]) -> None:
    """Rank 0, after metrics.json is written. A logger that fails is reported, not fatal: the run's results are
    already on disk."""
    out = Path(cfg.paths.output_dir)
    params = hyperparameters(cfg)
    for logger in trainer.loggers:
        try:
            if isinstance(logger, MLFlowLogger):
                _mlflow(logger, params, metrics, out)
            elif isinstance(logger, TensorBoardLogger):
                # under final/: at step 0 the plain names would add a point to every training curve
                logger.log_hyperparams(params, metrics={f"final/{k}": v for k, v in metrics.items()})
                # its save() keeps the hparams.yaml of the start of fit (the task's settings only)
                save_hparams_to_yaml(Path(logger.log_dir) / "hparams.yaml", logger.hparams)
            else:
                logger.log_hyperparams(params)
            logger.save()
        except Exception as exc:  # noqa: BLE001 -- tracking is a copy of what the run directory holds
            log.warning("%s could not record the run's hyperparameters and metrics: %s", type(logger).__name__, exc)


def _mlflow(logger: MLFlowLogger, params: dict[str, Any], metrics: dict[str, float], out: Path) -> None:
    from lightning_fabric.utilities.logger import _flatten_dict

    client, run_id = logger.experiment, logger.run_id
    # MLflow parameters are write-once: keep those Lightning logged at the start of fit (the task's own).
    logged = set(client.get_run(run_id).data.params)
    flat = {k: v for k, v in _flatten_dict(params).items() if k not in logged}
    logger.log_hyperparams(flat)
    logger.log_metrics(metrics)
    for name in ("config.yaml", "metrics.json"):
        if (out / name).is_file():
            client.log_artifact(run_id, str(out / name))
    if (out / "plots").is_dir():
        client.log_artifacts(run_id, str(out / "plots"), artifact_path="plots")
    logger.finalize("success")
