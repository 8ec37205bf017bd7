"""The tasks' public lifecycle: metrics configured per stage, batches evaluated, epochs logged and reset once in the
base class; settings saved in checkpoints; unlabelled batches predicted; degenerate splits named."""
from __future__ import annotations

import inspect
import json

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from sciml.data import TensorDictDataset, keep_batch
from sciml.errors import DegenerateDataError
from sciml.tasks import ClassificationTask, RegressionTask, SciMLTask, SegmentationTask

ADAM = OmegaConf.create({"_target_": "torch.optim.Adam", "lr": 0.02})


class Blobs(pl.LightningDataModule):
    """Two Gaussian classes; `val_labels` replaces the validation labels (e.g. one class only)."""

    batch_size = 32

    def __init__(self, n=256, val_labels=None, test_size=None):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        y = torch.arange(n) % 2
        x = torch.randn(n, 3, generator=g) + 2.0 * y[:, None]
        parts = {"train": slice(0, n // 2), "val": slice(n // 2, 3 * n // 4), "test": slice(3 * n // 4, n)}
        if test_size is not None:
            parts["test"] = slice(3 * n // 4, 3 * n // 4 + test_size)
        self.splits = {k: TensorDictDataset(x=x[p], y=y[p].clone(), index=torch.arange(n)[p]) for k, p in
                       parts.items()}
        if val_labels is not None:
            self.splits["val"].tensors["y"][:] = val_labels
        self.path = "blobs.h5"

    def _loader(self, split, shuffle=False):
        return DataLoader(self.splits[split], batch_size=self.batch_size, shuffle=shuffle, collate_fn=keep_batch)

    def train_dataloader(self):
        return self._loader("train", True)

    def val_dataloader(self):
        return self._loader("val")

    def test_dataloader(self):
        return self._loader("test")

    def predict_dataloader(self):
        return DataLoader(TensorDictDataset(x=self.splits["test"].tensors["x"]), batch_size=16,
                          collate_fn=keep_batch)


def trainer(tmp_path, **kw):
    return pl.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path, **kw)


def net():
    return torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


def test_lifecycle_checkpoint_intervals_and_unlabelled_prediction(tmp_path):
    pl.seed_everything(0)
    task = ClassificationTask(net(), class_names=["bkg", "sig"], optimizer=ADAM, bootstrap=50)
    data = Blobs()
    fit = trainer(tmp_path)
    fit.fit(task, datamodule=data)
    assert not any(m.update_called for stage in ("val", "test") for m in task.metrics[stage].values()), \
        "every stage's metrics are reset at the end of its epoch"
    metrics = fit.test(task, datamodule=data, verbose=False)[0]
    assert set(metrics) >= {"test/auc", "test/acc", "test/loss", "test/auc_ci_low", "test/auc_ci_high"}
    assert not any("bkg_eff" in k for k in metrics), "a generic binary problem gets no HEP working points"
    assert metrics["test/auc_ci_low"] <= metrics["test/auc"] <= metrics["test/auc_ci_high"]
    assert 0 <= metrics["test/ks_pvalue_sig"] <= 1
    for plot in ("roc.png", "score_distributions.png"):
        assert (tmp_path / "plots" / plot).read_bytes()[:4] == b"\x89PNG"

    ckpt = tmp_path / "task.ckpt"
    fit.save_checkpoint(ckpt)
    hparams = torch.load(ckpt, weights_only=False)["hyper_parameters"]
    assert hparams["class_names"] == ["bkg", "sig"] and hparams["bootstrap"] == 50 and "model" not in hparams

    predictions = fit.predict(task, datamodule=data)  # batches without `y`
    assert set(predictions[0]) == {"score"} and predictions[0]["score"].shape == (16, 2)


def test_working_points_opt_in_and_thin_ones_warned():
    task = ClassificationTask(net(), working_points=True)
    g = torch.Generator().manual_seed(1)
    y = (torch.arange(400) % 2)
    task.evaluate_batch({"x": torch.randn(400, 3, generator=g) + y[:, None], "y": y}, "test")
    task.log_dict = lambda *a, **k: None
    logged = task.log_epoch("test")
    assert logged["test/bkg_events_at_bkg_eff_1e-3"] == pytest.approx(0.2)
    assert "rests on 0.2 background events" in task.metric_warnings["warning/test/sig_eff_at_bkg_eff_1e-3"]
    assert "warning/test/sig_eff_at_bkg_eff_1e-2" in task.metric_warnings  # 2 events < 10


def test_one_class_validation_split_is_named_before_training(tmp_path):
    task = ClassificationTask(net(), optimizer=ADAM)
    data = Blobs(val_labels=1)  # 64 validation rows, all signal: the 2-batch sanity check sees them all
    fit = trainer(tmp_path, num_sanity_val_steps=2)
    with pytest.raises(DegenerateDataError, match="the validation split of blobs.h5: all 64 evaluated events are "
                                                  "signal"):
        fit.fit(task, datamodule=data)
    assert fit.global_step == 0, "no training step before the check"


def test_empty_test_split_is_named(tmp_path):
    task = ClassificationTask(net(), optimizer=ADAM)
    data = Blobs(test_size=0)
    with pytest.raises(DegenerateDataError, match="the test split of blobs.h5 is empty"):
        trainer(tmp_path).test(task, datamodule=data, verbose=False)


def test_undefined_metrics_become_warnings_not_values():
    task = SegmentationTask(torch.nn.Identity(), num_classes=3, class_names=["background", "tc", "ar"])
    y = torch.zeros(2, 8, 8, dtype=torch.long)
    logits = torch.zeros(2, 3, 8, 8)
    logits[:, 0] = 1  # predicts background everywhere, as the labels are
    task.evaluate_batch({"x": logits, "y": y}, "test")
    task.log_dict = lambda *a, **k: None
    logged = task.log_epoch("test")
    assert logged["test/miou"] == 1.0 and "test/iou_tc" not in logged
    warnings = task.metric_warnings
    assert "class tc is in neither the labels nor the predictions" in warnings["warning/test/iou_tc"]
    assert "contain only background" in warnings["warning/test/miou"]
    json.dumps(warnings, allow_nan=False)


def test_regression_tolerates_unlabelled_batches():
    task = RegressionTask(torch.nn.Linear(3, 1))
    assert task.evaluate_batch({"x": torch.zeros(4, 3)}, "val") is None
    out = task.predict_step({"x": torch.zeros(4, 3), "index": torch.arange(4)}, 0)
    assert set(out) == {"prediction", "index"}


def test_no_task_overrides_a_private_method():
    """Plugins extend tasks through the public hooks only."""
    from sciml_plugins.hail.tasks import HailClassificationTask, HailRegressionTask

    base_private = {name for cls in SciMLTask.__mro__ for name in vars(cls)
                    if name.startswith("_") and not name.startswith("__")}
    for cls in (ClassificationTask, RegressionTask, SegmentationTask, HailClassificationTask, HailRegressionTask):
        for klass in cls.__mro__[:cls.__mro__.index(SciMLTask)]:
            overridden = {n for n, v in vars(klass).items() if n in base_private and inspect.isfunction(v)}
            assert not overridden, f"{klass.__name__} overrides {overridden}"
