"""Binary and multi-class classification with per-sample weights in the loss and the metrics."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAUROC

from sciml.metrics import WeightedBinaryClassification
from sciml.tasks.base import SciMLTask


class ClassificationTask(SciMLTask):
    """The network returns one logit per class. Binary problems (num_classes=2) get the weighted ROC metrics
    of `sciml.metrics` on the score of `signal_class`; multi-class problems get weighted accuracy and macro AUC.
    """

    def __init__(self, model, num_classes: int = 2, class_names: list[str] | None = None, signal_class: int = 1,
                 optimizer=None, scheduler=None):
        super().__init__(model, optimizer, scheduler)
        if num_classes < 2:
            raise ValueError(f"task.num_classes must be >= 2, got {num_classes}")
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        self.signal_class = signal_class
        self.metrics = torch.nn.ModuleDict({stage: self._make_metrics() for stage in ("val", "test")})
        self.losses = torch.nn.ModuleDict({stage: MeanMetric() for stage in ("val", "test")})

    def _make_metrics(self):
        if self.num_classes == 2:
            return WeightedBinaryClassification()
        return MetricCollection({"acc": MeanMetric(), "auc": MulticlassAUROC(self.num_classes, average="macro")})

    def _loss(self, logits, y, w):
        loss = F.cross_entropy(logits, y, reduction="none")
        return loss.mean() if w is None else (loss * w).sum() / w.sum()

    def training_step(self, batch, batch_idx):
        logits = self(batch["x"])
        loss = self._loss(logits, batch["y"], batch.get("w"))
        self.log_train_loss(loss, batch_size=len(logits))
        return loss

    def _evaluate(self, batch, stage):
        x, y, w = batch["x"], batch["y"], batch.get("w")
        logits = self(x)
        self.losses[stage].update(self._loss(logits, y, w), weight=len(y) if w is None else w.sum())
        probs = logits.softmax(dim=1)
        metrics = self.metrics[stage]
        if self.num_classes == 2:
            metrics.update(probs[:, self.signal_class], (y == self.signal_class).long(), w)
        else:
            correct = (probs.argmax(1) == y).float()
            metrics["acc"].update(correct, torch.ones_like(correct) if w is None else w)
            metrics["auc"].update(probs, y)

    def _log_epoch(self, stage):
        values = {"loss": self.losses[stage].compute(), **self.metrics[stage].compute()}
        self.log_dict({f"{stage}/{k}": v.float() for k, v in values.items()}, prog_bar=stage == "val")
        self.losses[stage].reset()

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val")

    def on_validation_epoch_end(self):
        self._log_epoch("val")
        self.metrics["val"].reset()

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, "test")

    def on_test_epoch_end(self):
        self._log_epoch("test")
        if self.num_classes == 2:
            from sciml.plots import plot_roc

            fpr, tpr = self.metrics["test"].curve()  # a collective under DDP: every rank calls it
            if self.trainer.is_global_zero:
                plot_roc(fpr.cpu().numpy(), tpr.cpu().numpy(), self.plots_dir / "roc.png",
                         signal=self.class_names[self.signal_class],
                         background=self.class_names[1 - self.signal_class])
        self.metrics["test"].reset()

    def predict_step(self, batch, batch_idx):
        out = {"score": self(batch["x"]).softmax(dim=1), "label": batch["y"]}
        if "w" in batch:
            out["weight"] = batch["w"]
        if "index" in batch:
            out["index"] = batch["index"]
        return self.to_host(out)
