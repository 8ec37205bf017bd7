"""BraTS case folders: discovery by pattern, checks named by case and file, crop and normalisation, label
conventions, and label volumes written back in the input's grid (read with nibabel, compared with numpy)."""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from sciml.errors import SciMLError
from sciml_plugins.tumor.reader import DEFAULT_PATH, LABEL_CONVENTIONS, BraTSReader, find_cases, read_case, write_labels

PATTERNS = dict(modalities=["Flair*", "T1c*"], label="OTMultiClass*", mask="brainmask*")
AFFINE = np.array([[-1.2, 0, 0, 30.0], [0, -1.1, 0, 60.0], [0, 0, 2.0, -10.0], [0, 0, 0, 1]])


def synthetic_case(shape=(40, 44, 16), seed=0):
    """A brain (ellipsoid) with a tumour: oedema around a core of necrosis, non-enhancing tumour and an enhancing
    rim. FLAIR is bright in the whole tumour, T1c in the enhancing rim; the background is a negative constant, as
    in z-scored BraTS data. Returns (flair, t1c, labels in BRATS 2015 classes, brain mask)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(float)
    centre = np.array(shape) / 2
    brain = (((grid - centre) / (np.array(shape) / 2 - [3, 3, 1])) ** 2).sum(-1) <= 1
    tumour_centre = centre + rng.uniform(-4, 4, 3) * [1, 1, 0.3]
    r = np.sqrt((((grid - tumour_centre) / [1, 1, 0.5]) ** 2).sum(-1))
    labels = np.zeros(shape, np.uint8)
    labels[r < 9] = 2
    labels[r < 6] = 4
    labels[r < 4.5] = 3
    labels[r < 3] = 1
    labels[~brain] = 0
    flair = np.where(brain, rng.normal(0, 0.3, shape) + 2.5 * (labels > 0), -2.0).astype(np.float32)
    t1c = np.where(brain, rng.normal(0, 0.3, shape) + 3.0 * (labels == 4), -1.5).astype(np.float32)
    return flair, t1c, labels, brain


def write_case(folder: Path, shape=(40, 44, 16), seed=0, convention="brats2015", affine=AFFINE, skip=(),
               **replace) -> dict:
    """A case folder in the DeepMedic layout. `replace` swaps one file's array (keys flair, t1c, label, mask),
    `skip` leaves files out."""
    flair, t1c, labels, brain = synthetic_case(shape, seed)
    mapping = LABEL_CONVENTIONS[convention]["write"]
    lookup = np.zeros(5, np.uint8)
    lookup[list(mapping)] = list(mapping.values())
    arrays = {"flair": flair, "t1c": t1c, "label": lookup[labels].astype(np.float32), "mask": brain.astype(np.uint8)}
    arrays.update(replace)
    names = {"flair": "Flair_subtrMeanDivStd.nii.gz", "t1c": "T1c_subtrMeanDivStd.nii.gz",
             "label": "OTMultiClass.nii.gz", "mask": "brainmask.nii.gz"}
    folder.mkdir(parents=True, exist_ok=True)
    for key, name in names.items():
        if key not in skip:
            nib.save(nib.Nifti1Image(arrays[key], affine), folder / name)
    return {"flair": flair, "t1c": t1c, "labels": labels, "brain": brain, "affine": affine}


def write_cases(root: Path, n: int, shape=(40, 44, 16), convention="brats2015", first_seed=0) -> Path:
    for i in range(n):
        write_case(root / f"case{i:02d}", shape=shape, seed=first_seed + i, convention=convention)
    return root


def test_read_case_crops_to_the_brain_and_normalises(tmp_path):
    truth = write_case(tmp_path / "c0")
    [files] = find_cases(tmp_path, **PATTERNS)
    case = read_case(files, margin=2)
    rows = np.argwhere(truth["brain"])
    low = np.maximum(rows.min(0) - 2, 0)
    high = np.minimum(rows.max(0) + 3, truth["brain"].shape)
    assert case.offset == tuple(low) and case.x.shape == (2, *(high - low)) and case.shape == (40, 44, 16)
    box = tuple(slice(a, b) for a, b in zip(low, high))
    np.testing.assert_array_equal(case.y, truth["labels"][box])
    np.testing.assert_array_equal(case.brain, truth["brain"][box])
    for channel, raw in enumerate((truth["flair"], truth["t1c"])):
        inside = raw[truth["brain"]]
        expected = (raw[box] - inside.mean()) / inside.std()
        np.testing.assert_allclose(case.x[channel][case.brain], expected[case.brain], rtol=1e-4, atol=1e-4)
        assert (case.x[channel][~case.brain] == 0).all()
    np.testing.assert_allclose(case.affine, AFFINE)
    assert case.spacing == pytest.approx((1.2, 1.1, 2.0))


def test_without_a_mask_the_constant_background_is_left_out(tmp_path):
    truth = write_case(tmp_path / "c0", skip=("mask",))
    [files] = find_cases(tmp_path, PATTERNS["modalities"], PATTERNS["label"], None)
    np.testing.assert_array_equal(read_case(files).uncrop(read_case(files).brain), truth["brain"])


@pytest.mark.parametrize("convention", ["brats2015", "brats2017", "brats2023"])
def test_label_conventions_round_trip(tmp_path, convention):
    truth = write_case(tmp_path / "c0", convention=convention)
    [files] = find_cases(tmp_path, **PATTERNS)
    case = read_case(files, convention)
    expected = truth["labels"].copy()
    if convention != "brats2015":  # the later conventions have no separate non-enhancing class: it is in 1
        expected[expected == 3] = 1
    np.testing.assert_array_equal(case.uncrop(case.y), expected)
    # a prediction written back is the input's label file, value for value, grid for grid
    out = tmp_path / "pred.nii.gz"
    write_labels(case, case.y, out, convention)
    written, original = nib.load(out), nib.load(tmp_path / "c0" / "OTMultiClass.nii.gz")
    assert written.shape == original.shape and written.get_data_dtype() == np.uint8
    np.testing.assert_allclose(written.affine, original.affine)
    np.testing.assert_array_equal(np.asarray(written.dataobj), np.asarray(original.dataobj).astype(np.uint8))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary file left behind"


def test_class_3_is_written_as_core_in_later_conventions(tmp_path):
    write_case(tmp_path / "c0")
    [files] = find_cases(tmp_path, **PATTERNS)
    case = read_case(files)
    prediction = np.arange(5, dtype=np.uint8)[np.arange(case.y.size) % 5].reshape(case.y.shape)
    for convention, expected in {"brats2015": [0, 1, 2, 3, 4], "brats2017": [0, 1, 2, 1, 4],
                                 "brats2023": [0, 1, 2, 1, 3]}.items():
        write_labels(case, prediction, tmp_path / f"{convention}.nii.gz", convention)
        back = np.asarray(nib.load(tmp_path / f"{convention}.nii.gz").dataobj)
        crop = back[tuple(slice(o, o + n) for o, n in zip(case.offset, case.y.shape))]
        np.testing.assert_array_equal(crop, np.array(expected, np.uint8)[prediction])
        assert back.sum() == crop.sum(), "outside the crop the prediction is background"


def test_cases_are_found_at_any_depth_with_unique_names(tmp_path):
    write_case(tmp_path / "train" / "a")
    write_case(tmp_path / "validation" / "b", seed=1)
    write_case(tmp_path / "test" / "a", seed=2)  # the same folder name twice
    names = sorted(c.name for c in find_cases(tmp_path, **PATTERNS))
    assert names == ["b", "test_a", "train_a"]
    # a case folder given directly is one case
    assert [c.name for c in find_cases(tmp_path / "validation" / "b", **PATTERNS)] == ["b"]
    cases = [read_case(c) for c in find_cases(tmp_path, **PATTERNS)]
    assert len(cases) == 3 and all(c.x.dtype == np.float32 for c in cases)
    # a glob, and a list of a case folder and a folder of case folders
    assert [c.name for c in find_cases(str(tmp_path / "t*"), **PATTERNS)] == ["test_a", "train_a"]
    listed = find_cases([tmp_path / "validation" / "b", tmp_path / "test"], **PATTERNS)
    assert [c.name for c in listed] == ["b", "a"]


@pytest.mark.parametrize("change, message", [
    (dict(skip=("t1c",)), "case c0: no NIfTI file matching 'T1c\\*' in .*c0 \\(data.modalities\\)"),
    (dict(t1c=np.zeros((40, 44, 15), np.float32)), "case c0: T1c_subtrMeanDivStd.nii.gz has shape \\(40, 44, 15\\), "
                                                    "but Flair_subtrMeanDivStd.nii.gz has \\(40, 44, 16\\)"),
    (dict(label=np.full((40, 44, 16), 7, np.float32)), "case c0: .*OTMultiClass.nii.gz has label values \\[7.0\\] "
                                                         "outside the brats2015 convention"),
    (dict(mask=np.zeros((40, 44, 16), np.uint8)), "case c0: the brain mask is empty"),
])
def test_bad_cases_are_named(tmp_path, change, message):
    write_case(tmp_path / "c0", **change)
    with pytest.raises(SciMLError, match=message):
        [read_case(c) for c in find_cases(tmp_path, **PATTERNS)]


def test_the_reader_opens_from_headers_reads_and_writes_in_the_input_grid(tmp_path):
    """open: one row, no fixed shape, labels when a label volume is there; read: the cropped, z-scored case;
    write: the labels back in the input's grid, affine and convention, and an overlay."""
    truth = write_case(tmp_path / "cases" / "c0", convention="brats2023")
    write_case(tmp_path / "cases" / "c1", skip=("label",), seed=1)
    reader = BraTSReader(label_convention="brats2023")
    folders = reader.find(tmp_path / "cases", "data.path")
    labelled, unlabelled = (reader.open(f) for f in folders)
    assert (labelled.rows, labelled.shape, labelled.labels, unlabelled.labels) == (1, None, True, False)
    assert list(labelled.groups["case"]) == ["c0"] and labelled.meta["row_bytes"] == 40 * 44 * 16 * 9
    rows = reader.read(labelled, np.array([0]))
    case = read_case(labelled.meta["files"], "brats2023")
    np.testing.assert_array_equal(rows["x"][0], case.x)
    np.testing.assert_array_equal(rows["y"][0], case.y)
    np.testing.assert_allclose(rows["spacing"], [[1.2, 1.1, 2.0]])
    assert "y" not in reader.read(unlabelled, np.array([0]))
    out = tmp_path / "run" / "predictions"
    out.mkdir(parents=True)
    [written] = reader.write(labelled, np.array([0]), {"label": case.y[None]}, out)
    assert written == out / "c0_seg.nii.gz"
    image, original = nib.load(written), nib.load(tmp_path / "cases" / "c0" / "OTMultiClass.nii.gz")
    np.testing.assert_allclose(image.affine, AFFINE)
    np.testing.assert_array_equal(np.asarray(image.dataobj), np.asarray(original.dataobj))
    assert set(np.unique(np.asarray(image.dataobj)).tolist()) <= {0, 1, 2, 3} and (truth["labels"] == 4).any()
    assert (tmp_path / "run" / "plots" / "overlay_c0.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SciMLError, match="data.label_convention: unknown 'brats2000'"):
        BraTSReader(label_convention="brats2000")


def test_open_checks_the_grid_from_the_headers(tmp_path):
    write_case(tmp_path / "c0", t1c=np.zeros((40, 44, 15), np.float32))
    with pytest.raises(SciMLError, match="case c0: T1c_subtrMeanDivStd.nii.gz has shape \\(40, 44, 15\\)"):
        BraTSReader().open(tmp_path / "c0")


def test_nan_affine_and_unreadable_files_are_named(tmp_path):
    flair = synthetic_case()[0].copy()
    flair[3, 4, 5] = np.nan
    write_case(tmp_path / "nan", flair=flair)
    with pytest.raises(SciMLError, match="case nan: .*Flair_subtrMeanDivStd.nii.gz has 1 NaN or infinite values"):
        read_case(find_cases(tmp_path / "nan", **PATTERNS)[0])

    write_case(tmp_path / "moved")
    shifted = AFFINE.copy()
    shifted[0, 3] += 5
    t1c = nib.load(tmp_path / "moved" / "T1c_subtrMeanDivStd.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(t1c.dataobj), shifted), tmp_path / "moved" / "T1c_subtrMeanDivStd.nii.gz")
    with pytest.raises(SciMLError, match="case moved: T1c_subtrMeanDivStd.nii.gz has another affine"):
        read_case(find_cases(tmp_path / "moved", **PATTERNS)[0])

    write_case(tmp_path / "broken")
    target = tmp_path / "broken" / "OTMultiClass.nii.gz"
    target.write_bytes(gzip.compress(b"not a nifti header" * 30))
    with pytest.raises(SciMLError, match="case broken: .*OTMultiClass.nii.gz is not a readable NIfTI file"):
        read_case(find_cases(tmp_path / "broken", **PATTERNS)[0])

    write_case(tmp_path / "truncated")
    target = tmp_path / "truncated" / "T1c_subtrMeanDivStd.nii.gz"
    target.write_bytes(target.read_bytes()[: os.path.getsize(target) // 2])
    with pytest.raises(SciMLError, match="case truncated: .*T1c_subtrMeanDivStd.nii.gz is not a readable NIfTI"):
        read_case(find_cases(tmp_path / "truncated", **PATTERNS)[0])


def test_bad_folders_and_patterns(tmp_path):
    with pytest.raises(SciMLError, match="data.path: no such folder"):
        find_cases(tmp_path / "nowhere", **PATTERNS)
    with pytest.raises(SciMLError, match="data.test_path: no case folders in"):
        find_cases(tmp_path, **PATTERNS, key="data.test_path")
    write_case(tmp_path / "c0")
    with pytest.raises(SciMLError, match="case c0: 2 files match '\\*_subtrMeanDivStd\\*'"):
        find_cases(tmp_path, ["Flair*", "*_subtrMeanDivStd*"], "OTMultiClass*", None)
    with pytest.raises(SciMLError, match="data.label_convention: unknown 'brats2099'"):
        read_case(find_cases(tmp_path, **PATTERNS)[0], "brats2099")


def test_embedded_cases_are_cropped_brats_volumes_with_their_provenance():
    """The embedded cases: 4 real BRATS 2015 cases, on the 1 mm grid of the originals (240 x 240 x 155, affine
    diag(-1, -1, 1) with origin (0, 239, 0)), cropped: the affine's origin is the crop offset in that grid."""
    cases = find_cases(DEFAULT_PATH, **PATTERNS)
    assert [c.name for c in cases] == [f"brats_2013_pat000{i}_1" for i in (3, 4, 5, 6)]
    total = sum(p.stat().st_size for p in DEFAULT_PATH.rglob("*") if p.is_file())
    assert total < 15e6
    assert (DEFAULT_PATH.parent / "PROVENANCE.md").is_file()
    for files in cases:
        assert (files.folder / "License_CC_BY_NC_SA_3.0.txt").is_file()
        image = nib.load(files.modalities[0])
        a = image.affine
        np.testing.assert_allclose(a[:3, :3], np.diag([-1.0, -1.0, 1.0]))
        offset = np.array([-a[0, 3], 239 - a[1, 3], a[2, 3]])
        assert np.allclose(offset, np.round(offset)) and (offset >= 0).all()
        assert (offset + image.shape <= [240, 240, 155]).all()
        label = np.asarray(nib.load(files.label).dataobj)
        assert set(np.unique(label).tolist()) <= {0, 1, 2, 3, 4} and (label > 0).sum() > 50_000


ORIGINALS = Path(__file__).resolve().parents[2] / "shared" / "data" / "tumor" / "brats2015_deepmedic"


@pytest.mark.skipif(not ORIGINALS.is_dir(), reason="the original BRATS files are not on this machine")
def test_embedded_voxels_equal_the_originals_at_the_affine_position():
    """Against the uncropped originals: every stored voxel sits where its affine says, with the original value."""
    for files in find_cases(DEFAULT_PATH, **PATTERNS)[:2]:
        original_folder = next(ORIGINALS.rglob(files.name))
        for path in [*files.modalities, files.label]:
            small, big = nib.load(path), nib.load(original_folder / path.name)
            corner = np.rint(np.linalg.solve(big.affine, small.affine @ [0, 0, 0, 1])[:3]).astype(int)
            box = tuple(slice(c, c + n) for c, n in zip(corner, small.shape))
            np.testing.assert_allclose(np.asarray(small.dataobj), np.asarray(big.dataobj)[box], atol=1e-4)
