"""Brain tumour segmentation data: BraTS-style case folders (see `reader`) held in memory.

Training serves axial slices (all slices of all training cases in one tensor, read once), sampled with a given
share of slices that contain tumour, augmented on the device as a whole batch (one random affine per slice: crop,
rotation, scale, left-right flip; intensity scale and shift per channel). Validation, test and prediction serve one
whole cropped volume per batch, which the task segments slice by slice through its inferer.

Predictions are written as NIfTI label volumes in the input's own grid, affine and label convention, with PNG
overlays of truth and prediction contours on the FLAIR slices with the most tumour.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from sciml.data import TensorDictDataset, keep_batch
from sciml.errors import SciMLError
from sciml_plugins.tumor.reader import LABEL_CONVENTIONS, REGIONS, Case, find_cases, read_cases, write_labels

log = logging.getLogger(__name__)
DEFAULT_PATH = Path(__file__).parent / "data" / "brats2015"


class Volumes(Dataset):
    """Whole cases, one per item: `x` (C, X, Y, Z), `y` (X, Y, Z), `spacing` (3,) mm, `index`."""

    def __init__(self, cases: list[Case]):
        self.cases = cases

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        case = self.cases[i]
        if case.y is None:
            raise SciMLError(f"case {case.name}: no label volume to score against (data.label)")
        return {"x": torch.from_numpy(case.x), "y": torch.from_numpy(case.y), "index": torch.tensor(i),
                "spacing": torch.tensor(case.spacing, dtype=torch.float32)}


def _pick(spec, pool: list[str], names: list[str], key: str) -> list[str]:
    """`all`, a number n (the last n of `pool`), or a list of case names."""
    if spec == "all":
        return list(pool)
    if isinstance(spec, int) and not isinstance(spec, bool):
        if spec < 0 or spec > len(pool):
            raise SciMLError(f"{key}={spec}: expected between 0 and {len(pool)} cases")
        return pool[len(pool) - spec:]
    if isinstance(spec, str):
        spec = [spec]
    try:
        chosen = [str(s) for s in spec]
    except TypeError:
        raise SciMLError(f"{key}: expected 'all', a number of cases or a list of case names, got {spec!r}") from None
    missing = [s for s in chosen if s not in names]
    if missing:
        raise SciMLError(f"{key}: no case named {', '.join(missing)}; cases are {', '.join(names)}")
    return chosen


class BraTSDataModule(pl.LightningDataModule):
    """
    Args:
        path: folder of case folders; None = the four embedded BRATS 2015 cases.
        test_path: folder of case folders that replaces the test split.
        modalities: file-name patterns of the input channels, in channel order (the first is shown in overlays).
        label: file-name pattern of the label volume; mask: of the brain mask (null: the non-background voxels).
        label_convention: brats2015 (1 necrosis, 2 oedema, 3 non-enhancing, 4 enhancing), brats2017 (1, 2, 4) or
            brats2023 (1, 2, 3 = enhancing). Files are read and predictions written in this convention.
        train_cases: `all`, `rest` (the cases not in val or test) or a list of names.
        val_cases, test_cases: `all`, a number n (the last n cases in name order; validation cases are taken
            from those not in test when there are any), or a list of names.
        batch_size: training slices per batch (validation and test: one volume per batch).
        patch_size: side of the square training patches cut from the slices (0: whole slices).
        samples_per_epoch: training slices drawn per epoch; tumour_fraction of them contain tumour.
        augment: random affine (rotation_deg, scale, left-right flip, crop) and intensity jitter in training.
        margin: voxels kept around the brain when cropping.
    """

    def __init__(self, path: str | None = None, test_path: str | None = None,
                 modalities: list[str] = ("Flair*", "T1c*"), label: str | None = "OTMultiClass*",
                 mask: str | None = "brainmask*", label_convention: str = "brats2015",
                 train_cases="all", val_cases=1, test_cases="all", batch_size: int = 16, patch_size: int = 128,
                 samples_per_epoch: int = 512, tumour_fraction: float = 0.7, augment: bool = True,
                 rotation_deg: float = 15.0, scale: float = 0.1, intensity: float = 0.1, margin: int = 4,
                 num_workers: int = 0, seed: int = 0):
        super().__init__()
        if label_convention not in LABEL_CONVENTIONS:
            raise SciMLError(f"data.label_convention: unknown '{label_convention}'; expected one of "
                             f"{', '.join(LABEL_CONVENTIONS)}")
        if batch_size < 1 or samples_per_epoch < 1:
            raise SciMLError(f"data.batch_size={batch_size}, data.samples_per_epoch={samples_per_epoch}: "
                             "both must be >= 1")
        if not 0 <= tumour_fraction <= 1:
            raise SciMLError(f"data.tumour_fraction must be in [0, 1], got {tumour_fraction}")
        if patch_size < 0 or margin < 0:
            raise SciMLError(f"data.patch_size={patch_size}, data.margin={margin}: both must be >= 0")
        if train_cases not in ("all", "rest") and isinstance(train_cases, (str, int)):
            raise SciMLError(f"data.train_cases: expected 'all', 'rest' or a list of case names, got {train_cases!r}")
        self.path, self.test_path = path, test_path
        self.modalities, self.label, self.mask = list(modalities), label, mask
        self.label_convention = label_convention
        self.train_cases, self.val_cases, self.test_cases = train_cases, val_cases, test_cases
        self.batch_size, self.patch_size = batch_size, patch_size
        self.samples_per_epoch, self.tumour_fraction = samples_per_epoch, tumour_fraction
        self.augment, self.rotation_deg, self.scale, self.intensity = augment, rotation_deg, scale, intensity
        self.margin, self.num_workers, self.seed = margin, num_workers, seed
        self.splits: dict[str, list[Case]] = {}
        self._cache: dict[Path, Case] = {}
        self._slices: TensorDictDataset | None = None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        side = self.patch_size or 64
        return len(self.modalities), side, side

    # -- reading ----------------------------------------------------------------------------------------------
    def _read(self, files) -> list[Case]:
        todo = [f for f in files if f.folder not in self._cache]
        for case in read_cases(todo, self.label_convention, self.margin):
            self._cache[case.files.folder] = case
        return [self._cache[f.folder] for f in files]

    def setup(self, stage: str) -> None:
        """Find the cases, choose the splits, read what this stage needs (each case once per process)."""
        root = Path(self.path) if self.path else DEFAULT_PATH
        need_source = stage in ("fit", "validate") or not self.test_path
        found = find_cases(root, self.modalities, self.label, self.mask) if need_source else []
        by_name = {c.name: c for c in found}
        names = sorted(by_name)
        if self.test_path:
            test_files = find_cases(self.test_path, self.modalities, self.label, self.mask, key="data.test_path")
            test = []
        else:
            test = _pick(self.test_cases, names, names, "data.test_cases")
            test_files = [by_name[n] for n in test]
        rest = [n for n in names if n not in test]
        val = _pick(self.val_cases, rest or names, names, "data.val_cases") if need_source else []
        if self.train_cases == "all":
            train = names
        elif self.train_cases == "rest":
            train = [n for n in names if n not in test and n not in val]
        else:
            train = _pick(self.train_cases, names, names, "data.train_cases")
        if stage == "fit":
            if not train:
                raise SciMLError(f"data.train_cases: no training cases left in {root} (val: {val}, test: {test})")
            self.splits["train"] = self._read([by_name[n] for n in train])
            self.splits["val"] = self._read([by_name[n] for n in val])
            self._slices = None
            log.info("tumor cases: train %s; val %s; test %s", train, val,
                     [f.name for f in test_files])
        elif stage == "validate":
            self.splits["val"] = self._read([by_name[n] for n in val])
        else:
            self.splits["test"] = self._read(test_files)
        for split, cases in self.splits.items():
            missing = [c.name for c in cases if c.y is None]
            if missing:
                raise SciMLError(f"data.label: the {split} cases {', '.join(missing)} have no label volume")

    # -- training slices -------------------------------------------------------------------------------------
    def _training_slices(self) -> TensorDictDataset:
        """Every axial slice of the training cases as (N, C, H, W) tensors, centred in the largest slice size."""
        cases = self.splits["train"]
        height = max(c.x.shape[1] for c in cases)
        width = max(c.x.shape[2] for c in cases)
        xs, ys = [], []
        for case in cases:  # once per fit, one array operation per case
            c, h, w, _ = case.x.shape
            top, left = (height - h) // 2, (width - w) // 2
            x = np.zeros((case.x.shape[3], c, height, width), dtype=np.float32)
            y = np.zeros((case.x.shape[3], height, width), dtype=np.uint8)
            x[:, :, top:top + h, left:left + w] = np.moveaxis(case.x, 3, 0)
            y[:, top:top + h, left:left + w] = np.moveaxis(case.y, 2, 0)
            xs.append(x)
            ys.append(y)
        return TensorDictDataset(x=torch.from_numpy(np.concatenate(xs)), y=torch.from_numpy(np.concatenate(ys)))

    def class_frequencies(self) -> np.ndarray:
        """Voxel counts of the five classes inside the training brains."""
        counts = sum(np.bincount(c.y[c.brain], minlength=5) for c in self.splits["train"])
        return counts.astype(np.float64)

    def train_dataloader(self):
        if self._slices is None:
            self._slices = self._training_slices()
        tumour = (self._slices.tensors["y"] > 0).flatten(1).any(1)
        n_tumour = int(tumour.sum())
        if n_tumour == 0 or n_tumour == len(tumour):  # one kind of slice only: draw uniformly
            weights = torch.ones(len(tumour), dtype=torch.float64)
        else:
            weights = torch.where(tumour, self.tumour_fraction / n_tumour,
                                  (1 - self.tumour_fraction) / (len(tumour) - n_tumour)).double()
        generator = torch.Generator().manual_seed(self.seed + (self.trainer.current_epoch if self.trainer else 0))
        sampler = WeightedRandomSampler(weights, self.samples_per_epoch, replacement=True, generator=generator)
        return DataLoader(self._slices, batch_size=self.batch_size, sampler=sampler, collate_fn=keep_batch,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def _volumes(self, split: str) -> DataLoader:
        return DataLoader(Volumes(self.splits.get(split, [])), batch_size=1, shuffle=False,
                          num_workers=self.num_workers)

    def val_dataloader(self):
        return self._volumes("val")

    def test_dataloader(self):
        return self._volumes("test")

    def predict_dataloader(self):
        return self._volumes("test")

    # -- augmentation, on the device, one batch at a time ----------------------------------------------------------
    def on_after_batch_transfer(self, batch, dataloader_idx):
        batch["y"] = batch["y"].long()
        trainer = self.trainer
        if trainer is not None and trainer.training:
            batch = self._augment(batch) if self.augment else self._crop(batch)
        return batch

    def _crop(self, batch):
        """Random patch_size crops without other changes (augment=false)."""
        return self._transform(batch, rotation=0.0, scale=0.0, flip=False, intensity=0.0)

    def _augment(self, batch):
        return self._transform(batch, self.rotation_deg, self.scale, True, self.intensity)

    def _transform(self, batch, rotation: float, scale: float, flip: bool, intensity: float):
        x, y = batch["x"], batch["y"]
        n, _, h, w = x.shape
        side_h, side_w = (self.patch_size, self.patch_size) if self.patch_size else (h, w)
        device = x.device
        angle = (torch.rand(n, device=device) * 2 - 1) * math.radians(rotation)
        zoom = 1 + (torch.rand(n, device=device) * 2 - 1) * scale
        mirror = torch.where(torch.rand(n, device=device) < 0.5, -1.0, 1.0) if flip else torch.ones(n, device=device)
        # output pixel (normalised to [-1, 1] over the patch) -> input position (normalised over the slice)
        fy, fx = side_h / h, side_w / w
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.zeros(n, 2, 3, device=device)
        theta[:, 0, 0], theta[:, 0, 1] = cos * fx * mirror, -sin * fy
        theta[:, 1, 0], theta[:, 1, 1] = sin * fx * mirror, cos * fy
        # random patch position: the patch centre anywhere it stays inside the slice
        theta[:, 0, 2] = (torch.rand(n, device=device) * 2 - 1) * max(0.0, 1 - fx)
        theta[:, 1, 2] = (torch.rand(n, device=device) * 2 - 1) * max(0.0, 1 - fy)
        grid = F.affine_grid(theta, [n, 1, side_h, side_w], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        y = F.grid_sample(y[:, None].float(), grid, mode="nearest", padding_mode="zeros",
                          align_corners=False)[:, 0].long()
        if intensity:
            brain = (x != 0).any(1, keepdim=True)
            gain = 1 + (torch.rand(n, x.shape[1], 1, 1, device=device) * 2 - 1) * intensity
            shift = (torch.rand(n, x.shape[1], 1, 1, device=device) * 2 - 1) * intensity
            x = torch.where(brain, x * gain + shift, x)
        return {**batch, "x": x, "y": y}

    # -- outputs ------------------------------------------------------------------------------------------------
    def save_predictions(self, predictions: dict, directory: Path) -> None:
        """One `<case>_seg.nii.gz` per test case (the input's grid, affine and label convention) and
        `plots/overlay_<case>.png` beside the predictions folder."""
        cases = self.splits["test"]
        labels = predictions["label"]
        plots = directory.parent / "plots"
        plots.mkdir(parents=True, exist_ok=True)
        for position, index in enumerate(np.asarray(predictions["index"]).reshape(-1).tolist()):
            case = cases[int(index)]
            label = np.asarray(labels[position]).reshape(case.x.shape[1:])
            write_labels(case, label, directory / f"{case.name}_seg.nii.gz", self.label_convention)
            overlay(case, label, plots / f"overlay_{case.name}.png", self.modalities[0])


def overlay(case: Case, prediction: np.ndarray, path: Path, channel_name: str, n_slices: int = 3) -> None:
    """The axial slices with the most tumour (in truth, else in the prediction): the first modality in grey,
    contours of truth (solid) and prediction (dashed) for whole tumour, core and enhancing tumour. Shown in
    radiological convention (the patient's right on the image's left), anterior up."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import nibabel as nib

    # choose the slices in the file's own axial order, show them reoriented to RAS when axis 2 stays axial
    truth = case.y
    amount = ((truth if truth is not None else prediction) > 0).sum((0, 1))
    chosen = np.sort(np.argsort(amount, kind="stable")[::-1][:n_slices])
    to_ras = nib.orientations.ornt_transform(nib.orientations.io_orientation(case.affine),
                                             nib.orientations.axcodes2ornt("RAS"))
    if to_ras[2, 0] != 2:  # an oblique or non-axial third axis: show the array as it is
        to_ras = np.array([[0, 1], [1, 1], [2, 1]])

    def ras(volume, z):
        if volume is None:
            return None
        return nib.orientations.apply_orientation(volume[:, :, z:z + 1], to_ras)[:, :, 0]

    colours = {"wt": "#2ca02c", "tc": "#ff7f0e", "et": "#d62728"}
    fig, axes = plt.subplots(1, len(chosen), figsize=(4 * len(chosen), 4.6), squeeze=False)
    for ax, z in zip(axes[0], chosen):
        ax.imshow(ras(case.x[0], z).T, cmap="gray", origin="lower")
        for region, classes in REGIONS.items():
            for volume, style in ((ras(truth, z), "solid"), (ras(prediction, z), "dashed")):
                if volume is None:
                    continue
                mask = np.isin(volume, classes).T.astype(float)
                if mask.any():
                    ax.contour(mask, levels=[0.5], colors=colours[region], linestyles=style, linewidths=1.2)
        ax.invert_xaxis()  # radiological convention
        ax.set_title(f"axial slice {int(z) + case.offset[2]}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.text(0.02, 0.5, "R", transform=ax.transAxes, color="w", fontsize=9)
        ax.text(0.95, 0.5, "L", transform=ax.transAxes, color="w", fontsize=9)
    handles = [plt.Line2D([], [], color=c, label=r.upper()) for r, c in colours.items()]
    handles += [plt.Line2D([], [], color="k", linestyle="solid", label="truth"),
                plt.Line2D([], [], color="k", linestyle="dashed", label="prediction")]
    fig.legend(handles=handles, loc="lower center", ncol=5, fontsize=8, frameon=False)
    fig.suptitle(f"{case.name}: {channel_name.rstrip('*')} with tumour contours", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)
