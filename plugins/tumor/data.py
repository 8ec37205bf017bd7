"""Brain tumour segmentation data: the core's `DataModule` over BraTS case folders (rows = cases, `reader`), trained
on 2-D axial slices.

Training serves axial slices (all slices of this rank's training cases in one tensor, read once per fit), drawn
with a given share of slices that contain tumour, and augments them on the device as a whole batch (one random
affine per slice: crop, rotation, scale, left-right flip; intensity scale and shift per channel). Validation, test
and prediction serve one whole cropped volume per batch (the core's loaders), which the task segments slice by
slice through its inferer.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from sciml.data import DataModule, EpochLoader, EpochShuffle, TensorDictDataset, keep_batch
from sciml.errors import SciMLError


class TumourSampler(EpochShuffle):
    """`n` slices drawn with replacement with probability proportional to `weights`; the draw is a function of
    (seed, rank, epoch) only, so a resumed run replays the order of an uninterrupted one."""

    def __init__(self, weights: np.ndarray, n: int, seed: int, rank: int = 0):
        super().__init__(n, seed)
        self.p, self.rank = np.asarray(weights, dtype=np.float64) / np.sum(weights), rank

    def order(self) -> list[int]:
        rng = np.random.default_rng([self.seed, self.rank, self.epoch])
        return rng.choice(len(self.p), size=self.n, p=self.p).tolist()


class BraTSDataModule(DataModule):
    """The core's keys (`conf/data/core.yaml`), the reader's (`BraTSReader`), and:
        batch_size: training slices per batch (validation, test, prediction: one whole volume per batch).
        patch_size: side of the square training patches cut from the slices (0: whole slices).
        samples_per_epoch: training slices drawn per epoch (over all ranks); tumour_fraction of them contain tumour.
        augment: random affine (rotation_deg, scale, left-right flip, crop) and intensity jitter in training.
    """

    def __init__(self, patch_size: int = 128, samples_per_epoch: int = 512, tumour_fraction: float = 0.7,
                 augment: bool = True, rotation_deg: float = 15.0, scale: float = 0.1, intensity: float = 0.1,
                 **core):
        super().__init__(**core)
        if samples_per_epoch < 1:
            raise SciMLError(f"data.samples_per_epoch={samples_per_epoch}: must be >= 1")
        if not 0 <= tumour_fraction <= 1:
            raise SciMLError(f"data.tumour_fraction must be in [0, 1], got {tumour_fraction}")
        if patch_size < 0:
            raise SciMLError(f"data.patch_size={patch_size}: must be >= 0")
        self.patch_size, self.samples_per_epoch, self.tumour_fraction = patch_size, samples_per_epoch, tumour_fraction
        self.augment, self.rotation_deg, self.scale, self.intensity = augment, rotation_deg, scale, intensity
        self._slices: TensorDictDataset | None = None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """What the network is trained on: (modalities, patch, patch); -1 for whole slices of any size."""
        side = self.patch_size or -1
        return len(self.reader.modalities), side, side

    # -- training slices -------------------------------------------------------------------------------------
    def training_slices(self) -> TensorDictDataset:
        """Every axial slice of this rank's training cases as (N, C, H, W) tensors, centred in the largest slice
        size; built once per fit, one case at a time."""
        if self._slices is None:
            cases = [self.store.read(np.array([row])) for row in self.train_rows]
            height = max(c["x"].shape[2] for c in cases)
            width = max(c["x"].shape[3] for c in cases)
            xs, ys = [], []
            for case in cases:
                _, c, h, w, depth = case["x"].shape
                top, left = (height - h) // 2, (width - w) // 2
                x = np.zeros((depth, c, height, width), dtype=np.float32)
                y = np.zeros((depth, height, width), dtype=np.uint8)
                x[:, :, top:top + h, left:left + w] = np.moveaxis(case["x"][0], 3, 0)
                y[:, top:top + h, left:left + w] = np.moveaxis(case["y"][0], 2, 0)
                xs.append(x)
                ys.append(y)
            self._slices = TensorDictDataset(x=torch.from_numpy(np.concatenate(xs)),
                                             y=torch.from_numpy(np.concatenate(ys)))
        return self._slices

    def class_frequencies(self) -> np.ndarray:
        """Voxel counts of the classes inside the training brains (non-zero inputs: outside the brain the z-scored
        inputs are 0), summed over ranks."""
        slices = self.training_slices()
        brain = (slices.tensors["x"] != 0).any(1)
        counts = torch.bincount(slices.tensors["y"][brain].long(), minlength=5).double()
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            counts = trainer.strategy.reduce(counts.to(trainer.strategy.root_device), reduce_op="sum").cpu()
        return counts.numpy()

    def train_dataloader(self):
        slices = self.training_slices()
        tumour = (slices.tensors["y"] > 0).flatten(1).any(1).numpy()
        n_tumour = int(tumour.sum())
        if n_tumour in (0, len(tumour)):  # one kind of slice only: draw uniformly
            weights = np.ones(len(tumour))
        else:
            weights = np.where(tumour, self.tumour_fraction / n_tumour,
                               (1 - self.tumour_fraction) / (len(tumour) - n_tumour))
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        sampler = TumourSampler(weights, max(1, self.samples_per_epoch // world), self.seed, rank)
        workers, _ = self._workers()
        return EpochLoader(slices, batch_size=self.batch_size, sampler=sampler, collate_fn=keep_batch,
                           num_workers=workers, persistent_workers=workers > 0, position=self._position)

    # -- augmentation, on the device, one batch at a time ----------------------------------------------------------
    def on_after_batch_transfer(self, batch, dataloader_idx):
        batch = super().on_after_batch_transfer(batch, dataloader_idx)
        if "y" in batch:
            batch["y"] = batch["y"].long()
        trainer = self.trainer
        if trainer is not None and trainer.training:
            batch = self.augment_batch(batch) if self.augment else self.crop(batch)
        return batch

    def crop(self, batch):
        """Random patch_size crops without other changes (augment=false)."""
        return self.transform(batch, rotation=0.0, scale=0.0, flip=False, intensity=0.0)

    def augment_batch(self, batch):
        return self.transform(batch, self.rotation_deg, self.scale, True, self.intensity)

    def transform(self, batch, rotation: float, scale: float, flip: bool, intensity: float):
        """One random affine per slice (rotation up to `rotation` degrees, zoom 1 ± `scale`, optional left-right
        flip, random patch position) in one `affine_grid`/`grid_sample` call: bilinear for images, nearest for
        labels; then per-channel gain and shift up to ± `intensity` inside the brain."""
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
