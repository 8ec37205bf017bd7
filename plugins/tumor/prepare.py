"""Make the embedded default cases: BraTS case folders cropped to the brain, stored compactly, still NIfTI.

    python -m sciml_plugins.tumor.prepare SOURCE OUT [--margin 4] [--below-tumour 20]

Every case folder under SOURCE (found by its label file) is cropped to the bounding box of its brain mask plus
`margin` voxels; axially, slices more than `below_tumour` slices below the tumour are dropped as well (they are
the skull base and cerebellum, the bulk of the bytes, and carry no tumour). The crop offset is folded into the
affine (nibabel's `slicer`), so every voxel keeps its position in scanner space.

The z-scored intensities of DeepMedic's copy are integer MR intensities shifted and scaled, so they take values on
a regular grid; they are stored as int16 with the NIfTI scale slope and intercept, which restores them to within
1e-4 (checked for every volume; a volume that is not on a grid is kept as float32). Labels and brain masks are
stored as uint8. Licence files are copied.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np

from sciml.errors import SciMLError


def grid_int16(values: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, float, float] | None:
    """`values` as int16 codes with slope and intercept, or None when they are not on a regular grid."""
    levels = np.unique(values[mask])
    if len(levels) < 2:
        return None
    step = float(np.median(np.diff(levels)))
    low = float(values.min())
    codes = np.round((values - low) / step)
    if codes.max() > np.iinfo(np.int16).max or np.abs(low + codes * step - values).max() > 1e-4:
        return None
    return codes.astype(np.int16), step, low


def prepare_case(folder: Path, out: Path, label_name: str, mask_name: str, margin: int, below_tumour: int) -> int:
    mask_img = nib.load(folder / mask_name)
    mask = np.asarray(mask_img.dataobj) > 0.5
    label = np.asarray(nib.load(folder / label_name).dataobj)
    brain = np.argwhere(mask)
    low = np.maximum(brain.min(0) - margin, 0)
    high = np.minimum(brain.max(0) + margin + 1, mask.shape)
    tumour = np.argwhere(label > 0)
    if len(tumour):
        low[2] = max(low[2], tumour[:, 2].min() - below_tumour)
    box = tuple(slice(int(a), int(b)) for a, b in zip(low, high))
    out.mkdir(parents=True, exist_ok=True)
    written = 0
    for path in sorted(folder.iterdir()):
        if not path.name.endswith((".nii", ".nii.gz")):
            if path.is_file():
                shutil.copy2(path, out / path.name)
            continue
        image = nib.load(path)
        cropped = image.slicer[box]  # the affine of the cropped grid
        values = np.asarray(cropped.dataobj)
        if path.name in (label_name, mask_name):
            data = (values > 0.5) if path.name == mask_name else np.rint(values)
            result = nib.Nifti1Image(data.astype(np.uint8), cropped.affine)
        else:
            coded = grid_int16(values.astype(np.float32), mask[box])
            if coded is None:
                result = nib.Nifti1Image(values.astype(np.float32), cropped.affine)
            else:
                codes, step, intercept = coded
                result = nib.Nifti1Image(codes, cropped.affine)
                result.header.set_slope_inter(step, intercept)
        result.header.set_xyzt_units("mm", "sec")
        result.set_qform(cropped.affine, code=1)
        result.set_sform(cropped.affine, code=1)
        nib.save(result, out / path.name)
        written += (out / path.name).stat().st_size
        restored = np.asarray(nib.load(out / path.name).dataobj)
        if np.abs(restored - values).max() > 1e-4 or not np.allclose(nib.load(out / path.name).affine,
                                                                      cropped.affine):
            raise SciMLError(f"{out / path.name}: the stored volume differs from {path}")
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--label", default="OTMultiClass.nii.gz")
    parser.add_argument("--mask", default="brainmask.nii.gz")
    parser.add_argument("--margin", type=int, default=4)
    parser.add_argument("--below-tumour", type=int, default=20)
    args = parser.parse_args(argv)
    nib.openers.Opener.default_compresslevel = 9  # smaller files, same content (nibabel's default is 1)
    cases = sorted(p.parent for p in args.source.rglob(args.label))
    if not cases:
        raise SystemExit(f"no case folders with {args.label} under {args.source}")
    total = 0
    for folder in cases:
        size = prepare_case(folder, args.out / folder.name, args.label, args.mask, args.margin, args.below_tumour)
        print(f"{folder.name}: {size / 1e6:.2f} MB")
        total += size
    print(f"total {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
