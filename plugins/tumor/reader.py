"""BraTS-style case folders: one folder per case with one NIfTI volume per MR modality, optionally a label volume
and a brain mask, found by file-name patterns (`Flair*`, `T1c*`, `OTMultiClass*`, `brainmask*`).

A row of the data contract is one case. `open` finds a case's files and checks their headers (missing or ambiguous
files, unreadable files, shapes and affines that disagree); `read` loads the case, checks the values (NaN, unknown
label values), crops it to the brain's bounding box plus a margin and z-scores each modality inside the brain;
`write` puts a predicted label map back in the case's own grid, affine and label convention. A case without a label
volume is predicted, not scored.

Labels are held in the BRATS 2015 classes: 0 background, 1 necrosis, 2 oedema, 3 non-enhancing tumour,
4 enhancing tumour. Files in the later BraTS conventions are mapped to them on reading and back on writing.
"""
from __future__ import annotations

import fnmatch
import glob
import os
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from sciml.data import FileInfo, Reader
from sciml.errors import SciMLError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
DEFAULT_PATH = Path(__file__).parent / "data" / "brats2015"

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
    label: Path | None  # None: no label volume (predicted, not scored)
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
        """A cropped (X, Y, Z[, K]) array placed back in the file's full grid, zeros around it."""
        full = np.zeros(self.shape + labels.shape[3:], dtype=labels.dtype)
        full[tuple(slice(o, o + n) for o, n in zip(self.offset, labels.shape))] = labels
        return full


def _matches(folder: Path, pattern: str) -> list[Path]:
    """NIfTI files in `folder` matching `pattern` (case-insensitive; `Flair*` matches `Flair_x.nii.gz`)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(NIFTI_SUFFIXES)
                  and fnmatch.fnmatch(p.name.lower(), pattern.lower()))


def case_files(folder: Path, name: str, modalities: list[str], label: str | None, mask: str | None) -> CaseFiles:
    """A case folder's files: each modality (and the mask, when `mask` is set) must match exactly one file; the
    label volume (when `label` is set) at most one."""

    def one(pattern: str, what: str, required: bool = True) -> Path | None:
        found = _matches(folder, pattern)
        if len(found) > 1:
            raise SciMLError(f"case {name}: {len(found)} files match '{pattern}' in {folder} "
                             f"({', '.join(p.name for p in found)}); make {what} more specific")
        if not found and required:
            raise SciMLError(f"case {name}: no NIfTI file matching '{pattern}' in {folder} ({what})")
        return found[0] if found else None

    return CaseFiles(name=name, folder=folder, modalities=[one(p, "data.modalities") for p in modalities],
                     label=one(label, "data.label", required=False) if label else None,
                     mask=one(mask, "data.mask") if mask else None)


def find_cases(root, modalities: list[str], label: str | None, mask: str | None,
               key: str = "data.path") -> list[CaseFiles]:
    """The case folders named by `root`: a folder of case folders (at any depth), one case folder, a glob of
    either, or a list of these. A folder is a case when it holds a file matching the first modality pattern.
    Cases are named by their folder; folders of the same name are named by their paths below a common parent."""
    if not modalities:
        raise SciMLError("data.modalities: give at least one file pattern, e.g. [Flair*, T1c*]")
    folders = list(dict.fromkeys(_case_folders(root, modalities[0], key)))
    names = [f.name for f in folders]
    for i, folder in enumerate(folders):
        same = [f for f in folders if f.name == folder.name]
        if len(same) > 1:
            below = folder.relative_to(os.path.commonpath(same))
            names[i] = str(below).replace(os.sep, "_") if below.parts else folder.name
    return [case_files(f, n, modalities, label, mask) for f, n in zip(folders, names)]


def _case_folders(root, first: str, key: str) -> list[Path]:
    if not isinstance(root, (str, Path)):  # a list (also Hydra's ListConfig)
        found = [f for r in root for f in _case_folders(r, first, key)]
        if not found:
            raise SciMLError(f"{key}: empty list of case folders")
        return found
    text = str(root)
    if any(c in text for c in "*?["):
        roots = sorted(Path(p) for p in glob.glob(text) if Path(p).is_dir())
        if not roots:
            raise SciMLError(f"{key}: no folders match '{text}'")
    elif Path(text).is_dir():
        roots = [Path(text)]
    else:
        raise SciMLError(f"{key}: no such folder '{text}' (expected a folder of BraTS case folders)")
    found = [folder.resolve() for r in roots for folder in [r, *sorted(p for p in r.rglob("*") if p.is_dir())]
             if _matches(folder, first)]
    if not found:
        raise SciMLError(f"{key}: no case folders in '{text}' (no file matching '{first}', the first of "
                         "data.modalities)")
    return found


def _load(path: Path, case: str) -> nib.Nifti1Image:
    try:
        image = nib.load(path)
        image.header.get_data_shape()
        return image
    except Exception as exc:  # nibabel raises several types for broken files
        raise SciMLError(f"case {case}: {path} is not a readable NIfTI file ({exc})") from None


def _shape(image: nib.Nifti1Image, path: Path, case: str) -> tuple[int, int, int]:
    shape = tuple(image.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise SciMLError(f"case {case}: {path} has shape {shape}, expected a 3-D volume")
    return shape


def check_grid(files: CaseFiles) -> tuple[nib.Nifti1Image, tuple[int, int, int]]:
    """Every volume of a case on the first modality's grid (same shape and affine), from the headers alone.
    Returns the first modality's image (not yet read) and its shape."""
    reference = _load(files.modalities[0], files.name)
    shape = _shape(reference, files.modalities[0], files.name)
    for path in [*files.modalities[1:], *(p for p in (files.label, files.mask) if p is not None)]:
        image = _load(path, files.name)
        if _shape(image, path, files.name) != shape:
            raise SciMLError(f"case {files.name}: {path.name} has shape {_shape(image, path, files.name)}, but "
                             f"{files.modalities[0].name} has {shape}")
        if not np.allclose(image.affine, reference.affine, atol=1e-3):
            raise SciMLError(f"case {files.name}: {path.name} has another affine than {files.modalities[0].name} "
                             "(the volumes are not on the same grid; resample them first)")
    return reference, shape


def _array(path: Path, case: str, shape: tuple[int, ...]) -> np.ndarray:
    try:
        values = np.asarray(_load(path, case).dataobj, dtype=np.float32).reshape(shape)
    except SciMLError:
        raise
    except Exception as exc:  # truncated or corrupt gzip streams fail here, not on nib.load
        raise SciMLError(f"case {case}: {path} is not a readable NIfTI file ({exc})") from None
    bad = int(np.count_nonzero(~np.isfinite(values)))
    if bad:
        raise SciMLError(f"case {case}: {path} has {bad} NaN or infinite values")
    return values


def read_case(files: CaseFiles, convention: str = "brats2015", margin: int = 4) -> Case:
    """Read, check, crop to the brain and normalise one case."""
    if convention not in LABEL_CONVENTIONS:
        raise SciMLError(f"data.label_convention: unknown '{convention}'; expected one of "
                         f"{', '.join(LABEL_CONVENTIONS)}")
    name = files.name
    reference, shape = check_grid(files)
    x = np.stack([_array(p, name, shape) for p in files.modalities])
    if files.mask is not None:
        brain = _array(files.mask, name, shape) > 0.5
    else:  # the background is constant (0 in raw scans, a negative constant after z-scoring): take its complement
        brain = (x != x[:, :1, :1, :1]).any(0)
    if not brain.any():
        raise SciMLError(f"case {name}: the brain mask is empty" + (f" ({files.mask})" if files.mask else ""))
    y = None
    if files.label is not None:
        raw = _array(files.label, name, shape)
        mapping = LABEL_CONVENTIONS[convention]["read"]
        unknown = [v for v in np.unique(raw).tolist() if v not in mapping]
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
                offset=tuple(int(v) for v in low), shape=tuple(int(v) for v in shape), affine=reference.affine,
                spacing=tuple(float(v) for v in reference.header.get_zooms()[:3]), header=reference.header)


def _save(image: nib.Nifti1Image, case: Case, path: Path) -> Path:
    """Saved with the case's qform/sform codes and units, through a temporary file: readers never see half a
    volume."""
    image.set_qform(case.affine, code=int(case.header["qform_code"]) or 1)
    image.set_sform(case.affine, code=int(case.header["sform_code"]) or 1)
    image.header.set_xyzt_units(*case.header.get_xyzt_units())
    tmp = path.with_name(f".{path.name.removesuffix('.nii.gz')}.tmp.nii.gz")
    nib.save(image, tmp)
    return tmp.replace(path)


def write_labels(case: Case, labels: np.ndarray, path: Path, convention: str = "brats2015") -> Path:
    """A cropped (X, Y, Z) map of BRATS 2015 classes as a uint8 NIfTI label volume in `convention`, in the case's
    full grid with its affine."""
    mapping = LABEL_CONVENTIONS[convention]["write"]
    lookup = np.zeros(5, dtype=np.uint8)
    lookup[list(mapping)] = list(mapping.values())
    image = nib.Nifti1Image(case.uncrop(lookup[labels.astype(np.int64)]), case.affine)
    image.set_data_dtype(np.uint8)
    return _save(image, case, path)


@dataclass
class BraTSReader(Reader):
    """BraTS case folders (`data.` keys).

    modalities: file-name patterns of the input channels, in channel order (the first is shown in overlays).
    label: pattern of the label volume (a case without one is predicted, not scored); mask: of the brain mask
        (null: the voxels that differ from the constant background).
    label_convention: brats2015 (1 necrosis, 2 oedema, 3 non-enhancing, 4 enhancing), brats2017 (1, 2, 4) or
        brats2023 (1, 2, 3 = enhancing). Files are read and predictions written in this convention.
    margin: voxels kept around the brain when cropping.
    """

    modalities: list[str] = field(default_factory=lambda: ["Flair*", "T1c*"])
    label: str | None = "OTMultiClass*"
    mask: str | None = "brainmask*"
    label_convention: str = "brats2015"
    margin: int = 4

    def __post_init__(self):
        self.modalities = [str(m) for m in self.modalities]
        if self.label_convention not in LABEL_CONVENTIONS:
            raise SciMLError(f"data.label_convention: unknown '{self.label_convention}'; expected one of "
                             f"{', '.join(LABEL_CONVENTIONS)}")
        if self.margin < 0:
            raise SciMLError(f"data.margin={self.margin}: must be >= 0")

    def default_path(self) -> Path:
        return DEFAULT_PATH

    def find(self, path, key: str) -> list[Path]:
        """Case folders, not files; their names (unique among them) are kept for `open`."""
        cases = find_cases(path, self.modalities, self.label, self.mask, key)
        self.__dict__.setdefault("_cases", {}).update({c.folder: c for c in cases})
        return [c.folder for c in cases]

    def open(self, path: Path) -> FileInfo:
        files = self.__dict__.get("_cases", {}).get(path) or \
            case_files(path, path.name, self.modalities, self.label, self.mask)
        _, shape = check_grid(files)
        voxels = int(np.prod(shape))
        return FileInfo(path, rows=1, shape=None, labels=files.label is not None,
                        groups={"case": np.array([files.name])},
                        meta={"files": files, "row_bytes": voxels * (4 * len(files.modalities) + 1)})

    def read(self, info: FileInfo, rows: np.ndarray) -> dict[str, np.ndarray]:
        case = read_case(info.meta["files"], self.label_convention, self.margin)
        out = {"x": case.x[None], "spacing": np.array([case.spacing], dtype=np.float32)}
        if case.y is not None:
            out["y"] = case.y[None]
        return out

    def write(self, info: FileInfo, rows: np.ndarray, outputs: dict[str, np.ndarray], directory: Path
              ) -> list[Path]:
        """`<case>_seg.nii.gz` (uint8 labels in the input's grid, affine and label convention), with
        `probability`: `<case>_prob.nii.gz` (X, Y, Z, K float32); and `plots/overlay_<case>.png` beside the
        predictions folder."""
        from sciml_plugins.tumor.plots import overlay

        case = read_case(info.meta["files"], self.label_convention, self.margin)  # the crop, the image, the truth
        label = np.asarray(outputs["label"][0])
        if label.shape != case.x.shape[1:]:
            raise SciMLError(f"case {case.name}: a prediction of shape {label.shape} for a cropped volume of "
                             f"{case.x.shape[1:]}")
        written = [write_labels(case, label, directory / f"{case.name}_seg.nii.gz", self.label_convention)]
        if "probability" in outputs:
            probability = np.moveaxis(np.asarray(outputs["probability"][0], dtype=np.float32), 0, -1)
            written.append(_save(nib.Nifti1Image(case.uncrop(probability), case.affine), case,
                                 directory / f"{case.name}_prob.nii.gz"))
        plots = directory.parent / "plots"
        plots.mkdir(parents=True, exist_ok=True)
        overlay(case, label, plots / f"overlay_{case.name}.png", self.modalities[0])
        return written
