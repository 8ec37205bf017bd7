"""What the hail plugin's two readers share (targets, forecast columns) and its one datamodule hook (climatology).

Targets: `target_mode: classification` gives `y` = 1 for hail >= `threshold_mm` (else 0); `regression` gives the
hail size in mm. Sizes are clipped at `max_size_mm` (radar MESH artefacts reach 680 mm). Files without the target
are predicted, not scored.

Splits, shards, normalisation and prediction writing are the core's (`sciml.data.DataModule`); the readers report
each row's run day (`groups["day"]`) so that whole days go to one split (`data.group_by: day`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from sciml.data import DataModule
from sciml.errors import SciMLError

log = logging.getLogger(__name__)
MODES = ("classification", "regression")


@dataclass(kw_only=True)
class HailTargets:
    """The reader options that turn a hail size (mm) into the training target."""

    target_mode: str = "classification"
    threshold_mm: float = 25.0
    max_size_mm: float | None = 150.0

    def __post_init__(self):
        if self.target_mode not in MODES:
            raise SciMLError(f"data.target_mode: '{self.target_mode}' is not one of {', '.join(MODES)}")

    def clip(self, size_mm: np.ndarray) -> np.ndarray:
        return np.minimum(size_mm, self.max_size_mm) if self.max_size_mm else size_mm

    def targets(self, size_mm: np.ndarray) -> np.ndarray:
        size = self.clip(size_mm)
        if self.target_mode == "classification":
            return (size >= self.threshold_mm).astype(np.int64)
        return size.astype(np.float32)

    def is_event(self, y: np.ndarray) -> np.ndarray:
        """Severe hail, from targets as `targets` makes them."""
        return y == 1 if self.target_mode == "classification" else y >= self.threshold_mm

    def forecast_columns(self, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Per row, from a hail task's predictions: the forecast probability of severe hail, and in regression the
        predicted size and its spread (mm)."""
        if "score" in outputs:  # classification: softmax over (no event, event)
            return {"probability_severe": outputs["score"][:, 1]}
        return {"probability_severe": outputs["probability"][:, 0], "predicted_size_mm": outputs["prediction"][:, 0],
                "predicted_size_std_mm": outputs["std"][:, 0]}

    def observed_name(self) -> str:
        return "observed_severe" if self.target_mode == "classification" else "observed_size_mm"


class HailDataModule(DataModule):
    """The core's datamodule plus the training climatology: the severe-hail frequency of the training rows, the
    reference forecast of the Brier skill score (read by the hail tasks). Measured once when training starts (each
    rank counts its part, the counts are summed) and kept in checkpoints, so that a test-only or predict run scores
    against the same reference."""

    climatology: float | None = None

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and self.climatology is None:
            y = self.store.read(np.sort(self.train_rows))["y"]
            counts = torch.tensor([float(self.reader.is_event(y).sum()), float(len(y))], dtype=torch.float64)
            trainer = self.trainer
            if trainer is not None and trainer.world_size > 1:  # every rank trains on its own shard
                counts = trainer.strategy.reduce(counts.to(trainer.strategy.root_device), reduce_op="sum").cpu()
            self.climatology = float(counts[0] / counts[1])
            log.info("severe-hail climatology of the training rows: %.4f", self.climatology)

    def state_dict(self):
        return {**super().state_dict(), "climatology": self.climatology}

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self.climatology = state_dict.get("climatology")


def data_module(*overrides: str) -> HailDataModule:
    """The datamodule exactly as `python -m sciml +plugin=hail OVERRIDES` builds it (for benchmarks, notebooks and
    tests), e.g. `data_module("hail/data=storms", "data.test_groups=[2015-05-21]")`."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    from sciml import searchpath

    searchpath.register(["hail"])
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="sciml.conf", version_base="1.3"):
        cfg = compose("config", overrides=["+plugin=hail", *overrides])
    return instantiate(cfg.data)
