"""The tumor data module: splits, tumour-weighted slice sampling, batched augmentation that keeps image and
labels aligned, whole-volume batches, and the prediction writer (NIfTI in the input's grid, PNG overlays)."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.inferers import SliceInferer
from test_tumor_reader import AFFINE, write_case, write_cases

from sciml.errors import SciMLError
from sciml_plugins.tumor.data import BraTSDataModule
from sciml_plugins.tumor.inference import IslandRemovingInferer, small_islands
from sciml_plugins.tumor.model import SliceUNet


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return write_cases(tmp_path_factory.mktemp("cases"), 4)


def module(path, stage="fit", **kwargs):
    dm = BraTSDataModule(path=str(path), **{"patch_size": 32, "batch_size": 8, **kwargs})
    dm.setup(stage)
    return dm


def names(cases_):
    return [c.name for c in cases_]


def test_splits(cases):
    dm = module(cases)  # the defaults: train on all, validate on the last, test on all
    assert names(dm.splits["train"]) == ["case00", "case01", "case02", "case03"]
    assert names(dm.splits["val"]) == ["case03"]
    dm = module(cases, train_cases="rest", val_cases=1, test_cases=1)
    assert names(dm.splits["train"]) == ["case00", "case01"] and names(dm.splits["val"]) == ["case02"]
    dm.setup("test")
    assert names(dm.splits["test"]) == ["case03"]
    dm = module(cases, train_cases=["case01"], val_cases=["case00"], test_cases=["case02", "case03"])
    assert names(dm.splits["train"]) == ["case01"]
    with pytest.raises(SciMLError, match="data.val_cases: no case named case09; cases are case00, case01"):
        module(cases, val_cases=["case09"])
    with pytest.raises(SciMLError, match="data.test_cases=7: expected between 0 and 4"):
        module(cases, test_cases=7)
    with pytest.raises(SciMLError, match="data.train_cases: no training cases left"):
        module(cases, train_cases="rest", val_cases=2, test_cases=2)
    with pytest.raises(SciMLError, match="data.label_convention"):
        BraTSDataModule(label_convention="brats2000")


def test_test_path_replaces_the_test_split_and_is_read_alone(cases, tmp_path):
    write_case(tmp_path / "unseen" / "new", seed=9)
    dm = BraTSDataModule(path=str(tmp_path / "nowhere"), test_path=str(tmp_path / "unseen"))
    dm.setup("test")  # test only: data.path is not even looked at
    assert names(dm.splits["test"]) == ["new"] and "train" not in dm.splits
    batch = next(iter(dm.test_dataloader()))
    case = dm.splits["test"][0]
    assert batch["x"].shape == (1, 2, *case.y.shape) and batch["y"].shape == (1, *case.y.shape)
    np.testing.assert_allclose(batch["spacing"].numpy(), [[1.2, 1.1, 2.0]])
    assert batch["index"].tolist() == [0]


def test_slices_are_sampled_toward_tumour(cases):
    dm = module(cases, samples_per_epoch=4000, tumour_fraction=0.8, batch_size=500)
    slices = dm._training_slices()
    assert slices.tensors["x"].shape[1:2] == (2,) and len(slices) == sum(c.x.shape[3] for c in dm.splits["train"])
    has_tumour = []
    for batch in dm.train_dataloader():
        has_tumour.append((batch["y"] > 0).flatten(1).any(1))
    share = torch.cat(has_tumour).float().mean().item()
    natural = (slices.tensors["y"] > 0).flatten(1).any(1).float().mean().item()
    assert abs(share - 0.8) < 0.03 and abs(natural - 0.8) > 0.1


def test_augmentation_keeps_images_and_labels_aligned(cases):
    """Channel 0 is replaced by the tumour indicator itself: after crop, rotation, zoom and flip, the image and
    the labels must still mark the same pixels."""
    dm = module(cases, patch_size=32, rotation_deg=30, scale=0.2, intensity=0.0)
    x = torch.zeros(64, 2, 40, 44)
    y = torch.zeros(64, 40, 44, dtype=torch.long)
    rng = np.random.default_rng(0)
    for i in range(64):  # squares at random places, one per slice
        r, c = rng.integers(4, 26), rng.integers(4, 30)
        y[i, r:r + 10, c:c + 10] = 2
    x[:, 0] = (y > 0).float()
    x[:, 1] = 1.0
    torch.manual_seed(0)
    out = dm._augment({"x": x, "y": y})
    assert out["x"].shape == (64, 2, 32, 32) and out["y"].shape == (64, 32, 32) and out["y"].dtype == torch.long
    image_says, labels_say = out["x"][:, 0] > 0.5, out["y"] > 0
    agreement = (image_says == labels_say).float().mean().item()
    assert agreement > 0.98, agreement
    assert labels_say.any() and not torch.equal(out["x"][:, 0], x[:, 0, :32, :32])  # it did transform
    jittered = dm._transform({"x": x, "y": y}, 0.0, 0.0, False, 0.2)["x"][:, 1]
    inside = jittered[jittered != 0]
    assert 0.6 < inside.min() < inside.max() < 1.4 and inside.std() > 0.01


def test_class_frequencies_count_training_voxels(cases):
    dm = module(cases)
    counts = dm.class_frequencies()
    expected = sum(np.bincount(c.y[c.brain], minlength=5) for c in dm.splits["train"])
    np.testing.assert_array_equal(counts, expected)
    assert counts[1:].sum() > 0


@pytest.mark.parametrize("convention", ["brats2015", "brats2023"])
def test_predictions_are_nifti_in_the_input_grid_with_overlays(tmp_path, convention):
    truth = {}
    for i in range(2):
        truth[f"c{i}"] = write_case(tmp_path / "in" / f"c{i}", shape=(40 + 4 * i, 44, 16), seed=i,
                                    convention=convention)
    dm = BraTSDataModule(path=str(tmp_path / "in"), label_convention=convention)
    dm.setup("test")
    # the truth as prediction, in test order, as per-case arrays of different shapes (as sciml.run hands them)
    labels = [c.y for c in dm.splits["test"]]
    out = tmp_path / "run" / "predictions"
    out.mkdir(parents=True)
    dm.save_predictions({"label": labels[::-1], "index": np.array([1, 0])}, out)
    for name, t in truth.items():
        image = nib.load(out / f"{name}_seg.nii.gz")
        original = nib.load(tmp_path / "in" / name / "OTMultiClass.nii.gz")
        assert image.shape == original.shape
        np.testing.assert_allclose(image.affine, AFFINE)
        np.testing.assert_array_equal(np.asarray(image.dataobj), np.asarray(original.dataobj))
        png = tmp_path / "run" / "plots" / f"overlay_{name}.png"
        assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 5000


def test_network_fits_the_data_and_any_slice_size(cases):
    dm = module(cases, patch_size=32)
    for downsample in (1, 2):
        net = SliceUNet(in_channels=2, num_classes=5, channels=(4, 8, 16), strides=(2, 2), downsample=downsample)
        for shape in ((3, 2, 32, 32), (2, 2, 37, 45)):
            assert net(torch.zeros(shape)).shape == (shape[0], 5, *shape[2:])
    assert dm.input_shape == (2, 32, 32)
    with pytest.raises(ValueError, match="model.strides"):
        SliceUNet(channels=(4, 8, 16), strides=(2,))


def test_islands_below_a_fraction_of_the_largest_tumour_component_are_removed():
    mask = np.zeros((30, 30, 30), bool)
    mask[2:12, 2:12, 2:12] = True  # 1000 voxels
    mask[20:25, 20:25, 20:28] = True  # 200 voxels: kept at 10 %
    mask[20:22, 2:7, 2:7] = True  # 50 voxels: removed
    mask[12, 12, 12] = True  # touches the big cube at a corner only: part of it (26-connectivity)
    removed = small_islands(mask, 0.1)
    assert removed.sum() == 50 and removed[20:22, 2:7, 2:7].all() and not removed[12, 12, 12]

    def network(x):  # class 2 where channel 0 is set, background elsewhere
        return torch.stack([1 - x[:, 0], 0 * x[:, 0], 2 * x[:, 0], 0 * x[:, 0], 0 * x[:, 0]], 1)

    volume = torch.zeros(1, 2, 30, 30, 30)
    volume[0, 0] = torch.from_numpy(mask).float()
    inferer = IslandRemovingInferer(SliceInferer(roi_size=(-1, -1), spatial_dim=2, sw_batch_size=8),
                                    min_fraction=0.1)
    labels = inferer(volume, network).argmax(1)[0].numpy()
    np.testing.assert_array_equal(labels > 0, mask & ~removed)
    assert (labels[mask & ~removed] == 2).all()
    kept_all = IslandRemovingInferer(SliceInferer(roi_size=(-1, -1), spatial_dim=2), min_fraction=0)
    np.testing.assert_array_equal(kept_all(volume, network).argmax(1)[0].numpy() > 0, mask)
