"""The example plugin's data: `.npz` files holding `x` (N, F) features and, when labelled, `y` (N,) classes."""
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sciml.data import FileInfo, Reader
from sciml.errors import SciMLError


@dataclass
class NpzReader(Reader):
    features: int = 4  # expected number of features per row
    patterns = ("*.npz",)

    def default_path(self):
        return Path(__file__).parent / "data" / "blobs.npz"

    def open(self, path):
        with np.load(path) as f:
            if "x" not in f or f["x"].ndim != 2 or f["x"].shape[1] != self.features:
                raise SciMLError(f"{path}: expected 'x' of shape (N, {self.features}) (data.features)")
            return FileInfo(path, len(f["x"]), (self.features,), labels="y" in f)

    def read(self, info, rows):
        with np.load(info.path) as f:
            out = {k: f[k][rows] for k in ("x", "y") if k in f}
        if not np.isfinite(out["x"]).all():
            raise SciMLError(f"{info.path}: NaN or infinite values in 'x'")
        return {"x": out["x"].astype(np.float32), **({"y": out["y"].astype(np.int64)} if "y" in out else {})}

    def write(self, info, rows, outputs, directory):
        target = directory / f"{info.path.stem}_scores.npz"
        np.savez(tmp := directory / f".{target.name}.tmp.npz", row=rows, **outputs)
        return [Path(tmp).replace(target)]
