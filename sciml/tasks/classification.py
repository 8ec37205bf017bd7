"""Binary and multi-class classification with per-sample weights in the loss and the metrics."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAUROC

from sciml.metrics import MIN_BACKGROUND_EVENTS, WORKING_POINTS, WeightedBinaryClassification
from sciml.tasks.base import SciMLTask


class ClassificationTask(SciMLTask):
    """The network returns one logit per class. Binary problems (num_classes=2) get the weighted ROC metrics
    of `sciml.metrics` on the score of `signal_class` (AUC, accuracy; with `working_points: true` the HEP working
    points too); multi-class problems get weighted accuracy and macro AUC.

    At the end of the test: `plots/roc.png` (binary), `plots/score_distributions.png` (training vs test scores
    per class with a Kolmogorov-Smirnov p-value) and, with `bootstrap` > 0, confidence intervals of the binary
    metrics from resampled test events (`test/auc_ci_low`, `test/auc_ci_high`, ...).
    """

    def __init__(self, model, num_classes: int = 2, class_names: list[str] | None = None, signal_class: int = 1,
                 working_points: bool = False, optimizer=None, scheduler=None, bootstrap: int = 0,
                 bootstrap_seed: int = 0, confidence: float = 0.95):
        super().__init__(model, optimizer, scheduler, bootstrap, bootstrap_seed, confidence)
        if num_classes < 2:
            raise ValueError(f"task.num_classes must be >= 2, got {num_classes}")
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        self.signal_class = signal_class
        self.working_points = working_points

    def configure_metrics(self, stage):
        if self.num_classes == 2:
            return {"binary": WeightedBinaryClassification(working_points=self.working_points)}
        return {"acc": MeanMetric(), "auc": MulticlassAUROC(self.num_classes, average="macro")}

    def loss(self, logits, y, w):
        loss = F.cross_entropy(logits, y, reduction="none")
        return loss.mean() if w is None else (loss * w).sum() / w.sum()

    def training_step(self, batch, batch_idx):
        logits = self(batch["x"])
        loss = self.loss(logits, batch["y"], batch.get("w"))
        self.log_train_loss(loss, batch_size=len(logits))
        return loss

    def evaluate_batch(self, batch, stage):
        if "y" not in batch:  # unlabelled rows are predicted, not scored
            return None
        x, y, w = batch["x"], batch["y"], batch.get("w")
        logits = self(x)
        metrics = self.metrics[stage]
        metrics["loss"].update(self.loss(logits, y, w), weight=len(y) if w is None else w.sum())
        probs = logits.softmax(dim=1)
        if self.num_classes == 2:
            metrics["binary"].update(probs[:, self.signal_class], (y == self.signal_class).long(), w)
        else:
            correct = (probs.argmax(1) == y).float()
            metrics["acc"].update(correct, torch.ones_like(correct) if w is None else w)
            metrics["auc"].update(probs, y)
        return probs

    def log_epoch(self, stage):
        logged = super().log_epoch(stage)
        if stage == "test" and self.working_points:
            for name, eff in WORKING_POINTS.items():
                n = logged.get(f"test/bkg_events_at_bkg_eff_{name.rsplit('_', 1)[1]}")
                if n is not None and n < MIN_BACKGROUND_EVENTS:
                    self.warn(f"test/{name}", f"rests on {n:.1f} background events (< {MIN_BACKGROUND_EVENTS}) at "
                                              f"background efficiency {eff:g}: statistically meaningless")
        return logged

    def test_report(self):
        from sciml.plots import plot_roc

        if self.num_classes != 2:
            return
        metric = self.metrics["test"]["binary"]
        scores, labels, weights = metric.samples()  # a collective under DDP: every rank calls it
        ci = metric.bootstrap(self.bootstrap, self.bootstrap_seed, self.confidence) if self.bootstrap else {}
        self.log_intervals("test", ci)
        if not self.trainer.is_global_zero:
            return
        from sciml.metrics import weighted_roc

        fpr, tpr = weighted_roc(scores, labels, weights)
        names = {"signal": self.class_names[self.signal_class], "background": self.class_names[1 - self.signal_class]}
        plot_roc(fpr.numpy(), tpr.numpy(), self.plots_dir / "roc.png", **names, auc_interval=ci.get("auc"),
                 confidence=self.confidence)
        self.score_distributions(scores, labels, weights)

    def score_distributions(self, scores, labels, weights=None) -> None:
        """plots/score_distributions.png, the overtraining check: training scores (this model, eval mode) against
        the test scores per class, and `test/ks_pvalue_<class>`. Call on rank 0 only."""
        from sciml.plots import plot_score_distributions

        train = self.training_scores(len(scores))
        if train is None:
            return
        scores, labels = (torch.as_tensor(t).double().cpu().numpy() for t in (scores, labels))
        weights = np.ones_like(scores) if weights is None else torch.as_tensor(weights).double().cpu().numpy()
        names = {"signal": self.class_names[self.signal_class], "background": self.class_names[1 - self.signal_class]}
        pvalues = plot_score_distributions(train, (scores, labels, weights), self.plots_dir / "score_distributions.png",
                                           **names)
        for which, p in pvalues.items():
            self.log(f"test/ks_pvalue_{which}", p, rank_zero_only=True)

    def log_intervals(self, stage: str, ci: dict[str, tuple[float, float]]) -> None:
        """`<stage>/<name>_ci_low` and `_ci_high`, the bootstrap interval of each value."""
        for name, (low, high) in ci.items():
            for side, value in (("low", low), ("high", high)):
                if value == value:  # NaN: too few defined resamples, no interval
                    self.log(f"{stage}/{name}_ci_{side}", value)
                else:
                    self.warn(f"{stage}/{name}_ci_{side}", "undefined: most bootstrap resamples lack one class")

    def training_scores(self, rows: int):
        """Signal scores, labels and weights of up to `rows` training rows of this rank (as many as the test rows: a
        random subset from sciml data modules, not a pass over a training set of any size; otherwise the training
        loader), in eval mode, for the overtraining check; None without training rows."""
        datamodule = getattr(self.trainer, "datamodule", None)
        sample = getattr(datamodule, "train_sample_dataloader", None)
        if datamodule is None or not callable(sample or getattr(datamodule, "train_dataloader", None)):
            return None
        try:
            loader = sample(max(int(rows), 1)) if callable(sample) else datamodule.train_dataloader()
        except Exception:  # a test-only run may have no training split set up
            return None
        if loader is None:
            return None
        parts = []
        was_training = self.training
        self.eval()
        with torch.no_grad():
            for batch in loader:
                batch = self._to_device(batch, datamodule)
                if "y" not in batch:
                    continue
                probs = self(batch["x"]).softmax(dim=1)[:, self.signal_class]
                w = batch.get("w")
                parts.append((probs.double().cpu(), (batch["y"] == self.signal_class).long().cpu(),
                              torch.ones_like(probs, dtype=torch.float64).cpu() if w is None else w.double().cpu()))
        self.train(was_training)
        if not parts:
            return None
        return tuple(torch.cat(p).numpy() for p in zip(*parts))

    def _to_device(self, batch, datamodule):
        batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        hook = getattr(datamodule, "on_after_batch_transfer", None)  # e.g. per-channel scaling on the device
        return hook(batch, 0) if callable(hook) else batch

    def predict_step(self, batch, batch_idx):
        out = {"score": self(batch["x"]).softmax(dim=1)}
        # Labels and weights pass through for the plugins' writers when the file has them; unlabelled files are
        # predicted all the same.
        if "y" in batch:
            out["label"] = batch["y"]
        if "w" in batch:
            out["weight"] = batch["w"]
        if "index" in batch:
            out["index"] = batch["index"]
        return self.to_host(out)
