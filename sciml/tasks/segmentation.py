"""Semantic segmentation of 2-D fields or 3-D volumes.

Batches: `x` (B, C, *spatial) inputs, `y` (B, *spatial) class indices, and optionally `labeled` (B,) booleans
(semi-supervised: rows without labels feed only the reconstruction loss), `spacing` (B, n_spatial) voxel sizes
for the Hausdorff distance, `index` (B,) for the plugin's prediction writer.

The network returns logits (B, K, *spatial), or a dict with `logits` and, for semi-supervised training,
`reconstruction` (an auto-encoder output of `x` through the same encoder).
"""
from __future__ import annotations

import csv
import warnings
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from monai.losses import DiceLoss
from monai.metrics import compute_dice, compute_hausdorff_distance
from omegaconf import DictConfig, OmegaConf
from torchmetrics import Metric
from torchmetrics.classification import MulticlassJaccardIndex, MulticlassPrecision, MulticlassRecall
from torchmetrics.functional.classification import multiclass_confusion_matrix
from torchmetrics.utilities.data import dim_zero_cat

from sciml.errors import SciMLError
from sciml.tasks.base import SciMLTask

LOSSES = ("ce", "ce_dice", "ce_jaccard")


class RegionOverlap(Metric):
    """Dice and 95 % Hausdorff distance per case for evaluation regions, each a union of classes (BraTS scores the
    whole tumour, tumour core and enhancing tumour this way). MONAI computes the per-case values; torchmetrics keeps
    them, so they are gathered across ranks like any other metric.

    A region absent from both truth and prediction gives no value for that case (NaN, left out of the mean). A
    region present in only one of them has no defined Hausdorff distance (MONAI gives NaN); it is scored as the
    image diagonal, the largest distance possible, as the BraTS evaluation does.
    """

    full_state_update = False

    def __init__(self, regions: Mapping[str, list[int]], hd95: bool = True):
        super().__init__()
        self.names = list(regions)
        self.classes = [list(map(int, c)) for c in regions.values()]
        self.hd95 = hd95
        self.add_state("dice", default=[], dist_reduce_fx="cat")
        self.add_state("hausdorff", default=[], dist_reduce_fx="cat")

    def masks(self, labels: torch.Tensor) -> torch.Tensor:
        """(B, *spatial) class indices -> (B, R, *spatial) region masks."""
        return torch.stack([torch.isin(labels, labels.new_tensor(c)) for c in self.classes], dim=1)

    def update(self, pred: torch.Tensor, target: torch.Tensor, spacing: torch.Tensor | None = None) -> None:
        p, t = self.masks(pred).float(), self.masks(target).float()
        self.dice.append(compute_dice(p, t, include_background=True, ignore_empty=True).float())
        if self.hd95:
            per_case = []
            for i in range(len(p)):  # MONAI takes one spacing per batch; cases may differ
                sp = None if spacing is None else spacing[i].tolist()
                with warnings.catch_warnings():  # MONAI warns of empty masks (and of its own deprecations)
                    warnings.simplefilter("ignore")
                    d = compute_hausdorff_distance(p[i:i + 1], t[i:i + 1], include_background=True, percentile=95,
                                                   spacing=sp)[0]
                p_empty, t_empty = (p[i].flatten(1).sum(1) == 0).cpu(), (t[i].flatten(1).sum(1) == 0).cpu()
                size = torch.tensor(p.shape[2:], dtype=torch.float32) * (1 if sp is None else torch.tensor(sp))
                d = torch.where(p_empty ^ t_empty, size.norm(), d.float().cpu())
                per_case.append(torch.where(p_empty & t_empty, torch.nan, d))
            self.hausdorff.append(torch.stack(per_case).to(self.device))

    def per_case(self) -> dict[str, torch.Tensor]:
        # len(): after a DDP sync the states are one gathered tensor, no longer lists
        out = {f"dice_{n}": dim_zero_cat(self.dice)[:, i] for i, n in enumerate(self.names)} if len(self.dice) else {}
        if self.hd95 and len(self.hausdorff):
            out |= {f"hd95_{n}": dim_zero_cat(self.hausdorff)[:, i] for i, n in enumerate(self.names)}
        return out

    def compute(self) -> dict[str, torch.Tensor]:
        return {k: v.nanmean() for k, v in self.per_case().items()}

    def synced_per_case(self) -> dict[str, torch.Tensor]:
        """`per_case` over all ranks: a collective call under DDP."""
        with self.sync_context():
            return self.per_case()


class ConfusionPerSample(Metric):
    """The confusion matrix (truth x prediction) of every evaluated sample, kept per sample (gathered across ranks)
    so that intervals can resample samples; `compute` returns nothing to log."""

    full_state_update = False

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.add_state("matrices", default=[], dist_reduce_fx="cat")

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        self.matrices.append(torch.stack([multiclass_confusion_matrix(p.flatten(), t.flatten(), self.num_classes)
                                          for p, t in zip(pred, target)]))

    def compute(self) -> dict:
        return {}

    def total(self) -> torch.Tensor:
        """The summed matrix over all ranks (K, K) (collective under DDP)."""
        return self.per_sample().sum(0)

    def per_sample(self) -> torch.Tensor:
        """(samples, K, K) over all ranks: a collective call under DDP."""
        with self.sync_context():
            if not len(self.matrices):
                return torch.zeros(0, self.num_classes, self.num_classes, dtype=torch.long)
            return dim_zero_cat(self.matrices).cpu()


class SegmentationTask(SciMLTask):
    """Per-pixel (or per-voxel) classification into `num_classes` classes, class 0 the background.

    Loss: class-weighted cross-entropy (`loss=ce`), plus MONAI's soft Dice (`ce_dice`) or Jaccard (`ce_jaccard`)
    loss. `class_weights`: null, a list, or `inverse_sqrt_frequency` (from the datamodule's
    `class_frequencies()` on the training data, kept in the checkpoint).
    Metrics (torchmetrics): IoU per class and their mean (`miou`, background included, as ClimateNet reports it;
    a class in neither the labels nor the predictions has no IoU and is left out of the mean, as torchmetrics'
    macro average does), precision and recall per foreground class; with `regions`, Dice and (with `hd95`) the 95 %
    Hausdorff distance per region, averaged over cases. With `bootstrap` > 0, confidence intervals: IoU from
    resampled test rows (time steps, volumes), Dice and HD95 from resampled cases. `inferer` (e.g. MONAI's
    SliceInferer or SlidingWindowInferer) is used for validation, test and prediction, so whole volumes are
    segmented by a network trained on slices or patches.
    `reconstruction_weight` > 0 adds an auto-encoder loss on every row (semi-supervised).
    """

    def __init__(self, model, num_classes: int, class_names: list[str] | None = None,
                 class_weights: list[float] | str | None = None, loss: str = "ce",
                 include_background_in_overlap_loss: bool = True, regions: Mapping | None = None, hd95: bool = False,
                 inferer=None, reconstruction_weight: float = 0.0, save_probabilities: bool = True,
                 optimizer=None, scheduler=None, bootstrap: int = 0, bootstrap_seed: int = 0,
                 confidence: float = 0.95):
        super().__init__(model, optimizer, scheduler, bootstrap, bootstrap_seed, confidence)
        if num_classes < 2:
            raise SciMLError(f"task.num_classes must be >= 2, got {num_classes}")
        if loss not in LOSSES:
            raise SciMLError(f"task.loss: unknown loss '{loss}'; expected one of {', '.join(LOSSES)}")
        self.num_classes = num_classes
        self.class_names = [str(c).lower() for c in class_names] if class_names else [str(i) for i in
                                                                                       range(num_classes)]
        if len(self.class_names) != num_classes:
            raise SciMLError(f"task.class_names has {len(self.class_names)} names for {num_classes} classes")
        self.loss_name = loss
        self.auto_weights = class_weights == "inverse_sqrt_frequency"
        if isinstance(class_weights, str) and not self.auto_weights:
            raise SciMLError(f"task.class_weights: unknown rule '{class_weights}'; expected a list of "
                             f"{num_classes} numbers, null or inverse_sqrt_frequency")
        weights = torch.ones(num_classes) if class_weights is None or self.auto_weights else \
            torch.as_tensor(list(class_weights), dtype=torch.float32)
        if weights.shape != (num_classes,) or not torch.all(weights > 0):
            raise SciMLError(f"task.class_weights must be {num_classes} positive numbers, got {list(class_weights)}")
        self.register_buffer("class_weight", weights)
        self.overlap_loss = None if loss == "ce" else DiceLoss(
            include_background=include_background_in_overlap_loss, to_onehot_y=True, softmax=True,
            jaccard=loss == "ce_jaccard")
        self.reconstruction_weight = float(reconstruction_weight)
        self.save_probabilities = save_probabilities
        if isinstance(inferer, (DictConfig, dict)):
            inferer = instantiate(inferer)
        self.inferer = inferer
        self.regions = OmegaConf.to_container(regions) if isinstance(regions, DictConfig) else regions
        self.hd95 = hd95

    def configure_metrics(self, stage):
        k = self.num_classes
        metrics = {"iou": MulticlassJaccardIndex(k, average="none"),
                   "precision": MulticlassPrecision(k, average="none"),
                   "recall": MulticlassRecall(k, average="none"),
                   "confusion": ConfusionPerSample(k)}
        if self.regions:
            metrics["regions"] = RegionOverlap(self.regions, hd95=self.hd95 and stage == "test")
        return metrics

    # -- training -------------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and self.auto_weights:
            frequencies = getattr(self.trainer.datamodule, "class_frequencies", None)
            if frequencies is None:
                raise SciMLError("task.class_weights=inverse_sqrt_frequency needs a datamodule with "
                                 "class_frequencies()")
            self.class_weight.copy_(inverse_sqrt_frequency(torch.as_tensor(frequencies(), dtype=torch.float32)))

    @staticmethod
    def _split(out) -> tuple[torch.Tensor, torch.Tensor | None]:
        if isinstance(out, Mapping):
            return out["logits"], out.get("reconstruction")
        return out, None

    def segmentation_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(logits, y, weight=self.class_weight.to(logits.dtype))
        if self.overlap_loss is not None:
            loss = loss + self.overlap_loss(logits, y.unsqueeze(1))
        return loss

    def training_step(self, batch, batch_idx):
        x, y = batch["x"], batch["y"]
        logits, reconstruction = self._split(self.model(x))
        labeled = batch.get("labeled")
        if labeled is None:
            loss = self.segmentation_loss(logits, y)
        elif labeled.any():
            loss = self.segmentation_loss(logits[labeled], y[labeled])
        else:  # an unlabelled batch: only the reconstruction learns from it
            loss = logits.sum() * 0.0
        self.log("train/seg_loss", loss, on_step=False, on_epoch=True, batch_size=len(x))
        if self.reconstruction_weight > 0:
            if reconstruction is None:
                raise SciMLError(f"task.reconstruction_weight={self.reconstruction_weight} but the network "
                                 f"{type(self.model).__name__} returns no 'reconstruction'")
            recon_loss = F.mse_loss(reconstruction, x)
            self.log("train/reconstruction_loss", recon_loss, on_step=False, on_epoch=True, batch_size=len(x))
            loss = loss + self.reconstruction_weight * recon_loss
        self.log_train_loss(loss, batch_size=len(x))
        return loss

    # -- evaluation -----------------------------------------------------------------------------------------------
    def segment(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for whole inputs, through the inferer when one is configured."""
        if self.inferer is None:
            return self._split(self.model(x))[0]
        return self.inferer(x, lambda patch: self._split(self.model(patch))[0])

    def evaluate_batch(self, batch, stage: str) -> None:
        if "y" not in batch:  # an unlabelled file is predicted, not scored
            return
        x, y, spacing = batch["x"], batch["y"], batch.get("spacing")
        labeled = batch.get("labeled")
        if labeled is not None:  # unlabelled rows cannot be scored
            if not labeled.any():
                return
            x, y = x[labeled], y[labeled]
            spacing = None if spacing is None else spacing[labeled]
        logits = self.segment(x)
        metrics = self.metrics[stage]
        metrics["loss"].update(self.segmentation_loss(logits, y), weight=len(x))
        pred = logits.argmax(1)
        for name in ("iou", "precision", "recall", "confusion"):
            metrics[name].update(pred, y)
        if "regions" in metrics:
            metrics["regions"].update(pred, y, spacing)

    def epoch_metrics(self, stage: str) -> dict[str, torch.Tensor]:
        """IoU per class and their mean over the classes present in the labels or the predictions (a class absent
        from both has no IoU: NaN, with a warning entry), precision and recall per foreground class, the regions'
        Dice and HD95."""
        if not self.evaluated(stage):
            return {}
        metrics = self.metrics[stage]
        confusion = metrics["confusion"].total()
        present = (confusion.sum(0) + confusion.sum(1)) > 0  # in the labels or the predictions
        iou = metrics["iou"].compute().float()
        iou = torch.where(present.to(iou.device), iou, torch.nan)
        values = {"loss": metrics["loss"].compute().float(), "miou": iou.nanmean()}
        precision, recall = metrics["precision"].compute().float(), metrics["recall"].compute().float()
        for i, name in enumerate(self.class_names):
            values[f"iou_{name}"] = iou[i]
            if i > 0:
                # precision of a class never predicted stays torchmetrics' 0 (the convention); recall needs the class
                # in the labels
                values[f"precision_{name}"] = precision[i] if present[i] else torch.tensor(torch.nan)
                values[f"recall_{name}"] = recall[i] if confusion[i].sum() > 0 else torch.tensor(torch.nan)
        if "regions" in metrics:
            values |= {k: v.float() for k, v in metrics["regions"].compute().items()}
        if not self._sanity_checking() and confusion.sum() > 0 and confusion[1:].sum() == 0:
            self.warn(f"{stage}/miou", f"the labels of {self.split_description(stage)} contain only background "
                                       f"({self.class_names[0]}): the foreground scores say nothing")
        return values

    def undefined_reason(self, stage: str, name: str) -> str:
        cls = name.split("_", 1)[1] if "_" in name else name
        if name.startswith("recall_"):
            return f"class {cls} is not in the labels"
        if name.startswith(("iou_", "precision_")):
            return f"class {cls} is in neither the labels nor the predictions"
        if name.startswith(("dice_", "hd95_")):
            return f"region {cls} is in neither the labels nor the predictions of any case"
        return super().undefined_reason(stage, name)

    def test_report(self):
        metrics = self.metrics["test"]
        confusion = metrics["confusion"].per_sample()  # collectives under DDP: every rank calls them
        per_case = metrics["regions"].synced_per_case() if "regions" in metrics else {}
        if self.bootstrap:
            self._log_intervals(confusion, per_case)
        if self.trainer.is_global_zero and per_case:
            self._write_per_case(per_case)

    def _log_intervals(self, confusion: torch.Tensor, per_case: dict[str, torch.Tensor]) -> None:
        """Bootstrap intervals: IoU from resampled samples (time steps, slices or volumes: the rows of the test
        split), Dice and HD95 from resampled cases."""
        from sciml.bootstrap import intervals

        def iou_of(units):
            total = confusion[torch.as_tensor(units)].sum(0).double()
            tp = total.diagonal()
            union = total.sum(0) + total.sum(1) - tp
            iou = torch.where(union > 0, tp / union.clamp(min=1), torch.nan)
            return {"miou": float(iou.nanmean()), **{f"iou_{n}": float(iou[i]) for i, n in
                                                      enumerate(self.class_names)}}

        ci = intervals(iou_of, len(confusion), self.bootstrap, self.bootstrap_seed, self.confidence)
        if per_case:
            columns = {k: v.double().cpu() for k, v in per_case.items()}
            n = len(next(iter(columns.values())))
            ci |= intervals(lambda units: {k: float(v[torch.as_tensor(units)].nanmean()) for k, v in columns.items()},
                            n, self.bootstrap, self.bootstrap_seed, self.confidence)
        for name, (low, high) in ci.items():
            if low == low and high == high:
                self.log_dict({f"test/{name}_ci_low": low, f"test/{name}_ci_high": high})

    def _write_per_case(self, per_case: dict[str, torch.Tensor]) -> None:
        """test_per_case.csv in the run directory: one row per test case, in test order (rank order under DDP)."""
        path = self.plots_dir.parent / "test_per_case.csv"
        names = list(per_case)
        rows = torch.stack([per_case[n].cpu() for n in names], dim=1).tolist()
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["case", *names])
            writer.writerows([[i, *(f"{v:.6g}" for v in row)] for i, row in enumerate(rows)])

    def predict_step(self, batch, batch_idx):
        logits = self.segment(batch["x"])
        out = {"label": logits.argmax(1).to(torch.uint8)}
        if self.save_probabilities:
            out["probability"] = logits.softmax(1)
        if "index" in batch:
            out["index"] = batch["index"]
        return self.to_host(out)


def inverse_sqrt_frequency(frequencies: torch.Tensor) -> torch.Tensor:
    """Class weights 1/sqrt(f), scaled so that the pixel-weighted mean weight is 1 (the loss keeps the scale of
    plain cross-entropy). Rare classes (a tropical cyclone is ~0.5 % of the pixels) gain without the extreme
    weights of 1/f. A class never seen in training gets the largest weight of the seen ones."""
    f = frequencies.clamp(min=0) / frequencies.sum()
    seen = f > 0
    if not seen.any():
        raise SciMLError("class frequencies are all zero: the training labels are empty")
    w = torch.zeros_like(f)
    w[seen] = f[seen].rsqrt()
    w[~seen] = w[seen].max()
    return w / (w * f).sum()
