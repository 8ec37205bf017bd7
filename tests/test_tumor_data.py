"""The tumor data module on the core's DataModule: splits of cases, test_path, tumour-weighted slice sampling in an
order set by (seed, epoch), batched augmentation that keeps image and labels aligned, whole-volume batches, class
frequencies inside the brains, the network's input shape, and the island-removing inferer."""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from monai.inferers import SliceInferer
from test_tumor_reader import write_case, write_cases

from sciml.errors import SciMLError
from sciml_plugins.tumor.data import BraTSDataModule, TumourSampler
from sciml_plugins.tumor.inference import IslandRemovingInferer, small_islands
from sciml_plugins.tumor.model import SliceUNet
from sciml_plugins.tumor.reader import read_case


READER = "sciml_plugins.tumor.reader.BraTSReader"
# the plugin's split keys (conf/plugin/tumor.yaml)
SPLIT = dict(val_size=1, test_size=1, split_order="last", train_split="all")


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return write_cases(tmp_path_factory.mktemp("cases"), 4)


def module(path, stage="fit", **kwargs):
    dm = BraTSDataModule(reader=READER, path=str(path), **{"patch_size": 32, "batch_size": 8, **SPLIT, **kwargs})
    dm.setup(stage)
    return dm


def names(dm, split, store=None):
    store = store or dm.store
    return [store.infos[i].meta["files"].name for i in dm.rows[split]]


def test_splits_are_the_cores_on_cases(cases):
    module = functools.partial(globals()["module"], max_memory_gb=0)  # splits only: no case is read
    dm = module(cases)  # the plugin's defaults: train on all, validate on the one before the last, test the last
    assert names(dm, "train") == ["case00", "case01", "case02", "case03"]
    assert (names(dm, "val"), names(dm, "test")) == (["case02"], ["case03"])
    dm = module(cases, train_split="rest", test_size=2)
    assert (names(dm, "train"), names(dm, "val"), names(dm, "test")) == (["case00"], ["case01"], ["case02", "case03"])
    dm = module(cases, train_split="rest", group_by="case", test_groups=["case00", "case02"])
    assert (names(dm, "train"), names(dm, "val"), names(dm, "test")) == (["case01"], ["case03"], ["case00", "case02"])
    with pytest.raises(SciMLError, match="data.test_groups: case09 not in"):
        module(cases, group_by="case", test_groups=["case09"])
    with pytest.raises(SciMLError, match="data.test_size=7: a count between 0 and 4"):
        module(cases, test_size=7)
    with pytest.raises(SciMLError, match="no rows left for training"):
        module(cases, train_split="rest", val_size=2, test_size=2)
    with pytest.raises(SciMLError, match="data.patch_siz: unknown key for BraTSReader; data keys are .*patch_size"):
        BraTSDataModule(reader=READER, patch_siz=3)


def test_an_unlabelled_case_cannot_train(tmp_path):
    write_case(tmp_path / "cases" / "c0", skip=("label",))
    with pytest.raises(SciMLError, match="data.path: .*c0 has no labels; training needs them"):
        module(tmp_path / "cases")


def test_test_path_replaces_the_test_split_and_is_read_alone(cases, tmp_path):
    write_case(tmp_path / "unseen" / "new", seed=9)
    dm = BraTSDataModule(reader=READER, path=str(tmp_path / "nowhere"), test_path=str(tmp_path / "unseen"))
    dm.setup("test")  # test only: data.path is not even looked at
    assert names(dm, "test", dm.test_store) == ["new"] and dm.store is None
    batch = next(iter(dm.test_dataloader()))
    case = read_case(dm.test_store.infos[0].meta["files"])
    assert batch["x"].shape == (1, 2, *case.y.shape) and batch["y"].shape == (1, *case.y.shape)
    np.testing.assert_allclose(batch["spacing"].numpy(), [[1.2, 1.1, 2.0]])
    assert batch["index"].tolist() == [0]


def test_slices_are_sampled_toward_tumour_in_an_order_set_by_seed_and_epoch(cases):
    dm = module(cases, samples_per_epoch=4000, tumour_fraction=0.8, batch_size=500)
    slices = dm.training_slices()
    depths = [read_case(dm.store.infos[i].meta["files"]).x.shape[3] for i in dm.train_rows]
    assert slices.tensors["x"].shape[1:2] == (2,) and len(slices) == sum(depths)
    loader = dm.train_dataloader()
    has_tumour = [(batch["y"] > 0).flatten(1).any(1) for batch in loader]
    share = torch.cat(has_tumour).float().mean().item()
    natural = (slices.tensors["y"] > 0).flatten(1).any(1).float().mean().item()
    assert abs(share - 0.8) < 0.03 and abs(natural - 0.8) > 0.1
    # a resumed run replays the order: the draw depends on (seed, rank, epoch) only
    sampler = loader.sampler
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first
    again = TumourSampler(sampler.p, sampler.n, seed=dm.seed)
    again.set_epoch(0)
    assert list(again) == first


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
    out = dm.augment_batch({"x": x, "y": y})
    assert out["x"].shape == (64, 2, 32, 32) and out["y"].shape == (64, 32, 32) and out["y"].dtype == torch.long
    image_says, labels_say = out["x"][:, 0] > 0.5, out["y"] > 0
    agreement = (image_says == labels_say).float().mean().item()
    assert agreement > 0.98, agreement
    assert labels_say.any() and not torch.equal(out["x"][:, 0], x[:, 0, :32, :32])  # it did transform
    jittered = dm.transform({"x": x, "y": y}, 0.0, 0.0, False, 0.2)["x"][:, 1]
    inside = jittered[jittered != 0]
    assert 0.6 < inside.min() < inside.max() < 1.4 and inside.std() > 0.01


def test_class_frequencies_count_training_voxels_inside_the_brains(cases):
    dm = module(cases)
    counts = dm.class_frequencies()
    expected = 0
    for i in dm.train_rows:
        case = read_case(dm.store.infos[i].meta["files"])
        expected = expected + np.bincount(case.y[case.brain], minlength=5)
    np.testing.assert_array_equal(counts, expected)
    assert counts[1:].sum() > 0


def test_network_fits_the_data_and_any_slice_size(cases):
    dm = module(cases, patch_size=32)
    for downsample in (1, 2):
        net = SliceUNet(input_shape=dm.input_shape, num_classes=5, channels=(4, 8, 16), strides=(2, 2),
                        downsample=downsample)
        for shape in ((3, 2, 32, 32), (2, 2, 37, 45)):
            assert net(torch.zeros(shape)).shape == (shape[0], 5, *shape[2:])
    assert dm.input_shape == (2, 32, 32) and module(cases, patch_size=0).input_shape == (2, -1, -1)
    with pytest.raises(ValueError, match="model.strides"):
        SliceUNet((2, 32, 32), channels=(4, 8, 16), strides=(2,))


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
