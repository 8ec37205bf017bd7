"""BraTS-style case folders: one folder per case with one NIfTI volume per MR modality, a label volume and,
optionally, a brain mask, found by file-name patterns (`Flair*`, `T1c*`, `OTMultiClass*`, `brainmask*`).

A case is read once, checked (missing or ambiguous files, unreadable files, shapes and affines that disagree,
NaNs, unknown label values: each reported with the case and the file), cropped to the brain's bounding box plus a
margin, and z-scored per modality inside the brain. What is needed to write a prediction back in the file's own
grid (the crop offset, the full shape, the affine) travels with it.

Labels are held in the BRATS 2015 classes: 0 background, 1 necrosis, 2 oedema, 3 non-enhancing tumour,
4 enhancing tumour. Files in the later BraTS conventions are mapped to them on reading and back on writing.
"""
from __future__ import annotations

import fnmatch
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from sciml.errors import SciMLError

NIFTI_SUFFIXES = (".nii", ".nii.gz")

# file value -> BRATS 2015 class, per convention; and the value each class is written back as.
LABEL_CONVENTIONS = {
    # 1 necrosis, 2 oedema, 3 non-enhancing tumour, 4 enhancing tumour (BRATS 2012-2016)
    "brats2015": {"read": {0: 0, 1: 1, 2: 2, 3: 3, 4: 4}, "write": {0: 0, 1: 1, 2: 2, 3: 3, 4: 4}},
    # 1 necrotic and non-enhancing core, 2 oedema, 4 enhancing tumour (BraTS 2017-2021)
    "brats2017": {"read": {0: 0, 1: 1, 2: 2, 4: 4}, "write": {0: 0, 1: 1, 2: 2, 3: 1, 4: 4}},
    # 1 necrotic core, 2 oedema, 3 enhancing tumour (BraTS 2023 and later)
    "brats2023": {"read": {0: 0, 1: 1, 2: 2, 3: 4}, "write": {0: 0, 1: 1, 2: 2, 3: 1, 4: 3}},
}
REGIONS = {"wt": (1, 2, 3, 4), "tc": (1, 3, 4), "et": (4,)}


@dataclass
class CaseFiles:
    name: str
    folder: Path
    modalities: list[Path]
    label: Path | None
    mask: Path | None


@dataclass
class Case:
    """One case in memory, cropped to the brain.

    x: (C, X, Y, Z) float32, z-scored inside the brain, 0 outside; y: (X, Y, Z) uint8 BRATS 2015 classes or None;
    brain: (X, Y, Z) bool; offset: where the crop starts in the file's grid; shape, affine, spacing: the file's.
    """

    name: str
    files: CaseFiles
    x: np.ndarray
    y: np.ndarray | None
    brain: np.ndarray
    offset: tuple[int, int, int]
    shape: tuple[int, int, int]
    affine: np.ndarray
    spacing: tuple[float, float, float]
    header: nib.Nifti1Header = field(repr=False)

    def uncrop(self, labels: np.ndarray) -> np.ndarray:
        """A cropped (X, Y, Z) array placed back in the file's full grid, zeros around it."""
        full = np.zeros(self.shape, dtype=labels.dtype)
        full[tuple(slice(o, o + n) for o, n in zip(self.offset, labels.shape))] = labels
        return full


def _matches(folder: Path, pattern: str) -> list[Path]:
    """NIfTI files in `folder` matching `pattern` (case-insensitive; `Flair*` matches `Flair_x.nii.gz`)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(NIFTI_SUFFIXES)
                  and fnmatch.fnmatch(p.name.lower(), pattern.lower()))


def find_cases(root: str | Path, modalities: list[str], label: str | None, mask: str | None,
               key: str = "data.path") -> list[CaseFiles]:
    """The case folders under `root` (a folder of case folders at any depth, or one case folder).

    A folder is a case when it holds a file matching the first modality pattern; each of its modalities, its label
    (when `label` is set) and its mask (when `mask` is set) must then match exactly one file.
    """
    root = Path(root)
    if not root.is_dir():
        raise SciMLError(f"{key}: no such folder '{root}' (expected a folder of BraTS case folders)")
    if not modalities:
        raise SciMLError("data.modalities: give at least one file pattern, e.g. [Flair*, T1c*]")
    folders = [root, *sorted(p for p in root.rglob("*") if p.is_dir())]
    cases = []
    for folder in folders:
        if not _matches(folder, modalities[0]):
            continue
        name = folder.name if folder != root else root.name

        def one(pattern: str, what: str) -> Path:
            found = _matches(folder, pattern)
            if not found:
                raise SciMLError(f"case {name}: no NIfTI file matching '{pattern}' in {folder} ({what})")
            if len(found) > 1:
                raise SciMLError(f"case {name}: {len(found)} files match '{pattern}' in {folder} "
                                 f"({', '.join(p.name for p in found)}); make {what} more specific")
            return found[0]

        cases.append(CaseFiles(name=name, folder=folder,
                               modalities=[one(p, "data.modalities") for p in modalities],
                               label=one(label, "data.label") if label else None,
                               mask=one(mask, "data.mask") if mask else None))
    if not cases:
        raise SciMLError(f"{key}: no case folders in '{root}' (no file matching '{modalities[0]}', "
                         "the first of data.modalities)")
    names = [c.name for c in cases]
    for c in cases:  # the same folder name at two places: name cases by their path under root
        if names.count(c.name) > 1:
            c.name = str(c.folder.relative_to(root)).replace("/", "_")
    return cases


def _load(path: Path, case: str) -> nib.Nifti1Image:
    try:
        image = nib.load(path)
        image.header.get_data_shape()
        return image
    except Exception as exc:  # nibabel raises several types for broken files
        raise SciMLError(f"case {case}: {path} is not a readable NIfTI file ({exc})") from None


def _array(image: nib.Nifti1Image, path: Path, case: str) -> np.ndarray:
    try:
        values = np.asarray(image.dataobj, dtype=np.float32)
    except Exception as exc:  # truncated or corrupt gzip streams fail here, not on nib.load
        raise SciMLError(f"case {case}: {path} is not a readable NIfTI file ({exc})") from None
    while values.ndim > 3 and values.shape[-1] == 1:
        values = values[..., 0]
    if values.ndim != 3:
        raise SciMLError(f"case {case}: {path} has shape {values.shape}, expected a 3-D volume")
    return values


def read_case(files: CaseFiles, convention: str = "brats2015", margin: int = 4) -> Case:
    """Read, check, crop to the brain and normalise one case."""
    if convention not in LABEL_CONVENTIONS:
        raise SciMLError(f"data.label_convention: unknown '{convention}'; expected one of "
                         f"{', '.join(LABEL_CONVENTIONS)}")
    name = files.name
    reference = _load(files.modalities[0], name)
    shape, affine = reference.shape[:3], reference.affine

    def checked(path: Path) -> np.ndarray:
        image = reference if path == files.modalities[0] else _load(path, name)
        values = _array(image, path, name)
        if values.shape != shape:
            raise SciMLError(f"case {name}: {path.name} has shape {values.shape}, but "
                             f"{files.modalities[0].name} has {shape}")
        if not np.allclose(image.affine, affine, atol=1e-3):
            raise SciMLError(f"case {name}: {path.name} has another affine than {files.modalities[0].name} "
                             "(the volumes are not on the same grid; resample them first)")
        bad = int(np.count_nonzero(~np.isfinite(values)))
        if bad:
            raise SciMLError(f"case {name}: {path} has {bad} NaN or infinite values")
        return values

    x = np.stack([checked(p) for p in files.modalities])
    if files.mask is not None:
        brain = checked(files.mask) > 0.5
    else:  # the background is constant (0 in raw scans, a negative constant after z-scoring): take its complement
        brain = (x != x[:, :1, :1, :1]).any(0)
    if not brain.any():
        raise SciMLError(f"case {name}: the brain mask is empty" + (f" ({files.mask})" if files.mask else ""))
    y = None
    if files.label is not None:
        raw = checked(files.label)
        mapping = LABEL_CONVENTIONS[convention]["read"]
        values = np.unique(raw)
        unknown = [v for v in values.tolist() if v not in mapping]
        if unknown:
            raise SciMLError(f"case {name}: {files.label} has label values {unknown[:6]} outside the "
                             f"{convention} convention {sorted(mapping)} (data.label_convention)")
        lookup = np.zeros(max(mapping) + 1, dtype=np.uint8)
        lookup[list(mapping)] = list(mapping.values())
        y = lookup[raw.astype(np.int64)]

    corner = np.argwhere(brain)
    low = np.maximum(corner.min(0) - margin, 0)
    high = np.minimum(corner.max(0) + margin + 1, shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(low, high))
    x, brain = x[(slice(None), *box)], brain[box]
    inside = x[:, brain]
    mean, std = inside.mean(1), inside.std(1)
    if (std == 0).any():
        flat = [files.modalities[i].name for i in np.flatnonzero(std == 0)]
        raise SciMLError(f"case {name}: {', '.join(flat)} is constant inside the brain")
    x = np.where(brain, (x - mean[:, None, None, None]) / std[:, None, None, None], 0).astype(np.float32)
    return Case(name=name, files=files, x=x, y=None if y is None else y[box], brain=brain,
                offset=tuple(int(v) for v in low), shape=tuple(int(v) for v in shape), affine=affine,
                spacing=tuple(float(v) for v in reference.header.get_zooms()[:3]), header=reference.header)


def read_cases(files: list[CaseFiles], convention: str, margin: int, threads: int = 4) -> list[Case]:
    """Cases read in parallel threads (gzip and nibabel release the GIL for most of the work)."""
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(files)))) as pool:
        return list(pool.map(lambda f: read_case(f, convention, margin), files))


def write_labels(case: Case, labels: np.ndarray, path: Path, convention: str = "brats2015") -> None:
    """A cropped (X, Y, Z) map of BRATS 2015 classes as a NIfTI label volume in `convention`, in the case's full
    grid with its affine. Written to a temporary file first: a reader never sees half a volume."""
    mapping = LABEL_CONVENTIONS[convention]["write"]
    lookup = np.zeros(5, dtype=np.uint8)
    lookup[list(mapping)] = list(mapping.values())
    full = case.uncrop(lookup[labels.astype(np.int64)])
    image = nib.Nifti1Image(full, case.affine)
    image.set_qform(case.affine, code=int(case.header["qform_code"]) or 1)
    image.set_sform(case.affine, code=int(case.header["sform_code"]) or 1)
    image.header.set_xyzt_units(*case.header.get_xyzt_units())
    image.set_data_dtype(np.uint8)
    tmp = path.with_name(f".{path.name.removesuffix('.nii.gz')}.tmp.nii.gz")
    nib.save(image, tmp)
    tmp.replace(path)
