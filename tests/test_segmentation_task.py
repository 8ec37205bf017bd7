"""The generic segmentation task against references written out independently (numpy, scipy, brute force)."""
from __future__ import annotations

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from monai.inferers import SliceInferer
from omegaconf import OmegaConf
from scipy.ndimage import binary_erosion
from torch.utils.data import DataLoader

from sciml.data import TensorDictDataset, keep_batch
from sciml.errors import SciMLError
from sciml.tasks.segmentation import RegionOverlap, SegmentationTask, inverse_sqrt_frequency


def softmax(z, axis=1):
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def reference_loss(logits, y, weights, jaccard):
    """Weighted cross-entropy (weighted mean over pixels) plus the soft Jaccard loss 1 - I / (P + G - I), averaged
    over batch rows and classes."""
    k = logits.shape[1]
    p = softmax(logits)
    onehot = np.moveaxis(np.eye(k)[y], -1, 1)
    logp = np.log(p)
    w = weights[y]
    ce = -(w * (onehot * logp).sum(1)).sum() / w.sum()
    if not jaccard:
        return ce
    axes = tuple(range(2, logits.ndim))
    inter = (p * onehot).sum(axes)
    union = p.sum(axes) + onehot.sum(axes) - inter
    return ce + (1 - inter / union).mean()


@pytest.mark.parametrize("loss", ["ce", "ce_jaccard"])
def test_loss_matches_reference(loss):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 4, 6, 5))
    y = rng.integers(0, 4, size=(3, 6, 5))
    weights = np.array([0.5, 1.0, 2.0, 4.0])
    task = SegmentationTask(torch.nn.Identity(), num_classes=4, class_weights=weights.tolist(), loss=loss)
    got = task.segmentation_loss(torch.tensor(logits), torch.tensor(y)).item()
    assert got == pytest.approx(reference_loss(logits, y, weights, loss == "ce_jaccard"), abs=1e-4)


def test_inverse_sqrt_frequency():
    f = torch.tensor([0.945, 0.005, 0.05, 0.0])
    w = inverse_sqrt_frequency(f)
    seen = f[:3] / f[:3].sum()
    expected = 1 / np.sqrt(seen.numpy())
    expected = expected / (expected * seen.numpy()).sum()
    np.testing.assert_allclose(w[:3].numpy(), expected, rtol=1e-5)
    assert w[3] == w[:3].max()  # an unseen class gets the largest seen weight
    with pytest.raises(SciMLError, match="all zero"):
        inverse_sqrt_frequency(torch.zeros(3))


def test_bad_options_are_named():
    with pytest.raises(SciMLError, match="task.loss"):
        SegmentationTask(torch.nn.Identity(), num_classes=3, loss="focal")
    with pytest.raises(SciMLError, match="task.class_weights"):
        SegmentationTask(torch.nn.Identity(), num_classes=3, class_weights=[1.0, 2.0])
    with pytest.raises(SciMLError, match="task.class_names"):
        SegmentationTask(torch.nn.Identity(), num_classes=3, class_names=["a", "b"])


def test_class_metrics_match_numpy():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, size=(4, 16, 16))
    pred = np.where(rng.random(y.shape) < 0.7, y, rng.integers(0, 3, size=y.shape))
    task = SegmentationTask(torch.nn.Identity(), num_classes=3, class_names=["background", "tc", "ar"])
    for name in ("iou", "precision", "recall", "confusion"):
        task.metrics["test"][name].update(torch.tensor(pred), torch.tensor(y))
    task.metrics["test"]["loss"].update(torch.tensor(1.0))
    values = task.epoch_metrics("test")
    ious = []
    for c, name in enumerate(["background", "tc", "ar"]):
        tp = np.sum((pred == c) & (y == c))
        fp = np.sum((pred == c) & (y != c))
        fn = np.sum((pred != c) & (y == c))
        ious.append(tp / (tp + fp + fn))
        assert values[f"iou_{name}"].item() == pytest.approx(ious[-1], rel=1e-5)
        if c:
            assert values[f"precision_{name}"].item() == pytest.approx(tp / (tp + fp), rel=1e-5)
            assert values[f"recall_{name}"].item() == pytest.approx(tp / (tp + fn), rel=1e-5)
    assert values["miou"].item() == pytest.approx(np.mean(ious), rel=1e-5)
    assert "precision_background" not in values


def brute_force_hd95(a, b):
    """Symmetric 95th-percentile surface distance by brute force: surface voxels are those removed by one erosion."""
    sa = np.argwhere(a & ~binary_erosion(a))
    sb = np.argwhere(b & ~binary_erosion(b))
    d = np.linalg.norm(sa[:, None, :] - sb[None, :, :], axis=-1)
    return max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95))


def test_region_dice_and_hd95_match_brute_force():
    # BraTS-style regions over labels 0..4: whole tumour {1,2,3,4}, core {1,3,4}, enhancing {4}
    truth = np.zeros((1, 20, 20, 12), dtype=np.int64)
    truth[0, 4:14, 5:15, 3:9] = 2
    truth[0, 6:11, 7:12, 4:8] = 1
    truth[0, 7:9, 8:10, 5:7] = 4
    pred = np.zeros_like(truth)
    pred[0, 5:15, 5:14, 3:10] = 2
    pred[0, 6:12, 8:12, 4:8] = 3
    metric = RegionOverlap({"wt": [1, 2, 3, 4], "tc": [1, 3, 4], "et": [4]}, hd95=True)
    metric.update(torch.tensor(pred), torch.tensor(truth))
    values = metric.compute()
    for name, classes in {"wt": [1, 2, 3, 4], "tc": [1, 3, 4]}.items():
        a, b = np.isin(pred[0], classes), np.isin(truth[0], classes)
        assert values[f"dice_{name}"].item() == pytest.approx(2 * (a & b).sum() / (a.sum() + b.sum()), rel=1e-5)
        assert values[f"hd95_{name}"].item() == pytest.approx(brute_force_hd95(a, b), rel=1e-4)
    # enhancing tumour present in truth, absent in the prediction: Dice 0, HD95 the image diagonal
    assert values["dice_et"].item() == 0
    assert values["hd95_et"].item() == pytest.approx(np.linalg.norm([20, 20, 12]), rel=1e-5)


def test_region_absent_everywhere_is_left_out_of_the_mean():
    truth = np.zeros((2, 12, 12), dtype=np.int64)
    truth[0, 2:6, 2:6] = 1
    truth[1, 3:8, 3:8] = 1
    truth[1, 4:6, 4:6] = 2  # class 2 only in case 1
    pred = truth.copy()
    metric = RegionOverlap({"one": [1], "two": [2]}, hd95=True)
    metric.update(torch.tensor(pred), torch.tensor(truth))
    per_case = metric.per_case()
    assert torch.isnan(per_case["dice_two"][0]) and per_case["dice_two"][1] == 1
    assert metric.compute()["dice_two"] == 1 and metric.compute()["hd95_two"] == 0


def test_semi_supervised_loss_ignores_unlabelled_targets():
    class AutoEncoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.seg = torch.nn.Conv2d(2, 3, 1)
            self.rec = torch.nn.Conv2d(2, 2, 1)

        def forward(self, x):
            return {"logits": self.seg(x), "reconstruction": self.rec(x)}

    torch.manual_seed(0)
    task = SegmentationTask(AutoEncoder(), num_classes=3, reconstruction_weight=0.5)
    task.log = lambda *a, **k: None
    x = torch.randn(4, 2, 8, 8)
    y = torch.randint(0, 3, (4, 8, 8))
    labeled = torch.tensor([True, False, True, False])
    loss = task.training_step({"x": x, "y": y, "labeled": labeled}, 0)
    y2 = y.clone()
    y2[~labeled] = (y2[~labeled] + 1) % 3  # changing unlabelled targets must not change the loss
    assert task.training_step({"x": x, "y": y2, "labeled": labeled}, 0).item() == pytest.approx(loss.item())
    out = task.model(x)
    expected = task.segmentation_loss(out["logits"][labeled], y[labeled]) + 0.5 * torch.mean(
        (out["reconstruction"] - x) ** 2)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)

    plain = SegmentationTask(torch.nn.Conv2d(2, 3, 1), num_classes=3, reconstruction_weight=0.5)
    plain.log = lambda *a, **k: None
    with pytest.raises(SciMLError, match="reconstruction"):
        plain.training_step({"x": x, "y": y}, 0)


def test_slice_inferer_segments_volumes_with_a_2d_network():
    torch.manual_seed(0)
    net = torch.nn.Conv2d(2, 3, 3, padding=1)
    inferer = OmegaConf.create({"_target_": "monai.inferers.SliceInferer", "roi_size": [-1, -1],
                                "spatial_dim": 2, "sw_batch_size": 4})
    task = SegmentationTask(net, num_classes=3, inferer=inferer)
    assert isinstance(task.inferer, SliceInferer)
    volume = torch.randn(1, 2, 10, 12, 7)  # (B, C, H, W, D): axial slices along the last axis
    with torch.no_grad():
        got = task.segment(volume)
        expected = torch.stack([net(volume[..., k]) for k in range(volume.shape[-1])], dim=-1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


class ToyData(pl.LightningDataModule):
    """Two-channel fields; class 1 where channel 0 is high, class 2 where channel 1 is high."""

    batch_size = 8

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 2, 12, 12, generator=g)
        y = torch.zeros(64, 12, 12, dtype=torch.long)
        y[x[:, 0] > 1.0] = 1
        y[(x[:, 1] > 1.0) & (y == 0)] = 2
        self.data = TensorDictDataset(x=x, y=y, index=torch.arange(64))

    def class_frequencies(self):
        return torch.bincount(self.data.tensors["y"].flatten(), minlength=3).double()

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=8, shuffle=True, collate_fn=keep_batch)

    def val_dataloader(self):
        return DataLoader(self.data, batch_size=16, collate_fn=keep_batch)

    test_dataloader = predict_dataloader = val_dataloader


def test_training_learns_and_predicts(tmp_path):
    pl.seed_everything(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 16, 1), torch.nn.ReLU(), torch.nn.Conv2d(16, 3, 1))
    optimizer = OmegaConf.create({"_target_": "torch.optim.Adam", "lr": 0.05})
    task = SegmentationTask(net, num_classes=3, class_names=["background", "one", "two"],
                            class_weights="inverse_sqrt_frequency", loss="ce_jaccard",
                            regions={"any": [1, 2]}, optimizer=optimizer)
    trainer = pl.Trainer(max_epochs=15, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    data = ToyData()
    trainer.fit(task, datamodule=data)
    assert task.class_weight[1] > task.class_weight[0]  # the rare classes were up-weighted from the labels
    metrics = trainer.test(task, datamodule=data, verbose=False)[0]
    assert metrics["test/miou"] > 0.85 and metrics["test/dice_any"] > 0.9
    assert (tmp_path / "test_per_case.csv").read_text().count("\n") == 65  # header + one row per case
    out = trainer.predict(task, datamodule=data)
    assert out[0]["label"].dtype == torch.uint8 and out[0]["probability"].shape == (16, 3, 12, 12)
    torch.testing.assert_close(out[0]["probability"].sum(1), torch.ones(16, 12, 12))
