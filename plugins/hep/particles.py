"""Jets as particle clouds: each row is one jet's leading constituents, padded, with a mask.

`JetParticles` reads per-particle quantities from
- HDF5: a group of padded (N, P) datasets, one per quantity (the simulation's `constituents/`, the ATLAS top-tagging
  open data), or one (N, P, F) dataset whose columns are the quantities (JetNet);
- NumPy: an (N, P, F) `.npy` whose labels are the sibling `.npy` named with `y` in place of one `x` (EnergyFlow's
  X/y convention: `qg_jets_x10_....npy` -> `qg_jets_y10_....npy`), or an `.npz` holding both (`X`, `y`);
- ROOT: a TTree with jagged per-particle branches (weaver-core's ntuples), read with uproot and padded on read.

`fields` maps the roles pt, eta, phi (required), energy, charge, pid, mask, count (optional) to dataset or branch
names, or to column numbers of an (N, P, F) array. Rows are padded or cut to `max_particles` (leading by pT) and
the network inputs are computed from them (ParticleNet's set, Qu & Gouskos 2020): one row is (F + 1, P), the
features of `features` in that order and, last, the mask (1 real, 0 padding; padded entries are 0 everywhere).
Channels 0 and 1 are always deta and dphi: ParticleNet finds its first neighbours in them.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from sciml.data import FileInfo, Standardize
from sciml.errors import SciMLError
from sciml_plugins.hep.reader import H5Events, open_h5, read_rows

ROLES = ("pt", "eta", "phi", "energy", "charge", "pid", "mask", "count")
# the simulation's names (plugins/hep/simulate.py); coordinates there are already relative to the jet axis
DEFAULT_FIELDS = {"pt": "pt", "eta": "deta", "phi": "dphi", "energy": "energy", "charge": "charge", "pid": "pid",
                  "count": "count"}
PID_FLAGS = ("is_electron", "is_muon", "is_photon", "is_charged_hadron", "is_neutral_hadron")
# feature -> the roles it needs (charge: a charge field, or else derived from pid)
FEATURES = {"deta": ("eta",), "dphi": ("phi",), "log_pt": ("pt",), "log_e": ("energy",), "log_pt_rel": ("pt",),
            "log_e_rel": ("energy",), "dr": ("eta", "phi"), "charge": ("charge",), "pid": ("pid",)}
CHARGED_HADRONS = {211, 321, 2212, 3112, 3222, 3312, 3334}  # final-state charged hadrons (|PDG id|)
WINDOW = 4096  # ROOT entries read as one span when the wanted rows lie this close


def pid_flags(pid: np.ndarray, charge: np.ndarray) -> np.ndarray:
    """(n, P) PDG ids -> (n, 5, P) one-hot particle kinds (weaver-core's part_isElectron, ... flags)."""
    a = np.abs(pid)
    electron, muon, photon = a == 11, a == 13, a == 22
    hadron = ~(electron | muon | photon) & (a > 0)
    return np.stack([electron, muon, photon, hadron & (charge != 0), hadron & (charge == 0)], axis=1)


def charge_from_pid(pid: np.ndarray) -> np.ndarray:
    """Electric charge of the stable final-state particles from their PDG ids (0 for the rest)."""
    a = np.abs(pid)
    sign = np.sign(pid)
    return np.where(np.isin(a, (11, 13)), -sign, np.where(np.isin(a, list(CHARGED_HADRONS)), sign, 0)) \
        .astype(np.float64)


@dataclass
class JetParticles(H5Events):
    """Args (`data.` keys):
        fields: role -> dataset/branch name or column number (null: the simulation's `constituents/` names).
            Roles: pt, eta, phi (required), energy, charge, pid, and mask or count (else pT > 0 marks real ones).
        particles: where the particles are: HDF5 group or (N, P, F) dataset (null: `constituents`), `.npz` array
            (null: `X`), ROOT tree (null: the file's only tree). Ignored for `.npy`.
        label_key: labels (HDF5 dataset, `.npz` array, ROOT branch; null: `label`, `.npz`: `y`).
        max_particles: particles per row, leading by pT (padded or cut; null: the file's width; a ROOT file's
            longest jet).
        centre: re-centre eta and phi on the axis of the particles' summed momentum (massless sum).
        features: network inputs in order (null: all the fields allow); deta and dphi come first in any case.
        weight_key: per-jet weights (dataset, array or branch), or null.
    """

    fields: Mapping[str, Any] | None = None
    particles: str | None = None
    label_key: str | None = None
    max_particles: int | None = None
    centre: bool = True
    features: Sequence[str] | None = None
    weight_key: str | None = None
    patterns = ("*.h5", "*.hdf5", "*.npz", "*.npy", "*.root")
    fixed_dims = 1  # the networks are set functions: test files may hold another number of particles

    def __post_init__(self):
        fields = dict(DEFAULT_FIELDS if self.fields is None else self.fields)
        unknown = sorted(set(fields) - set(ROLES))
        if unknown:
            raise SciMLError(f"data.fields: unknown role '{unknown[0]}' (roles: {', '.join(ROLES)})")
        missing = [r for r in ("pt", "eta", "phi") if fields.get(r) is None]
        if missing:
            raise SciMLError(f"data.fields: no '{missing[0]}' field (pt, eta and phi are required)")
        self._fields = {k: v for k, v in fields.items() if v is not None}
        if self.max_particles is not None and self.max_particles < 1:
            raise SciMLError(f"data.max_particles={self.max_particles}: must be >= 1 or null")
        if self.features is not None:
            bad = sorted(set(self.features) - set(FEATURES))
            if bad:
                raise SciMLError(f"data.features: unknown feature '{bad[0]}' (features: {', '.join(FEATURES)})")
            for feature in self.features:
                needs = [r for r in FEATURES[feature] if not self._has(r)]
                if needs:
                    raise SciMLError(f"data.features: '{feature}' needs the '{needs[0]}' field (data.fields)")
        self._features = self._chosen_features()

    def _has(self, role: str) -> bool:
        return role in self._fields or (role == "charge" and "pid" in self._fields)

    def _chosen_features(self) -> list[str]:
        chosen = list(self.features) if self.features is not None else \
            [f for f, needs in FEATURES.items() if all(self._has(r) for r in needs)]
        return ["deta", "dphi"] + [f for f in chosen if f not in ("deta", "dphi")]

    @property
    def channel_names(self) -> list[str]:
        """The name of each input channel, mask last."""
        names = []
        for f in self._features:
            names += list(PID_FLAGS) if f == "pid" else [f]
        return names + ["mask"]

    def input_layout(self) -> str:
        return f"per-particle {', '.join(f'{k}={v!r}' for k, v in self._fields.items())} (data.fields)"

    def find(self, path, key):
        """Files named by `path`, without the label files of `.npy` pairs (one-dimensional arrays)."""
        return [f for f in super().find(path, key) if f.suffix != ".npy" or _npy_ndim(f) != 1]

    # -- opening ------------------------------------------------------------------------------------------------
    def open(self, path):
        suffix = path.suffix.lower()
        if suffix in (".h5", ".hdf5"):
            source = _H5Source(self, path)
        elif suffix in (".npy", ".npz"):
            source = _NumpySource(self, path)
        elif suffix == ".root":
            source = _RootSource(self, path)
        else:
            raise SciMLError(f"{path}: not a particle file (.h5, .hdf5, .npy, .npz or .root)")
        width = self.max_particles or source.width
        shape = (len(self.channel_names), int(width))
        return FileInfo(path, source.rows, shape, labels=source.labels,
                        meta={"source": source, "weights": source.weights, "chunk_rows": source.chunk_rows})

    # -- reading ------------------------------------------------------------------------------------------------
    def read(self, info, rows):
        source = info.meta["source"]
        raw, y, w = source.read(np.asarray(rows, dtype=np.int64))
        out = {"x": self.to_inputs(raw, info.shape[1], info.path)}
        if y is not None:
            y = np.asarray(y)
            if not np.isin(y, (0, 1)).all():
                raise SciMLError(f"{info.path}: labels '{source.label_name}' must be 0 (background) or 1 (signal), "
                                 f"found {np.unique(y[~np.isin(y, (0, 1))])[:5]}")
            out["y"] = y.astype(np.int64)
        if w is not None:
            out["w"] = np.asarray(w, dtype=np.float32)
            if not np.isfinite(out["w"]).all():
                raise SciMLError(f"{info.path}: NaN or infinite values in '{self.weight_key}'")
        return out

    def to_inputs(self, raw: dict[str, np.ndarray], width: int, path: Path | str = "") -> np.ndarray:
        """Raw per-particle arrays (n, P_file) by role -> network inputs (n, F + 1, width), mask last."""
        pt = np.asarray(raw["pt"], dtype=np.float64)
        n = len(pt)
        if "mask" in raw:
            mask = np.asarray(raw["mask"]) != 0
        elif "count" in raw:
            mask = np.arange(pt.shape[1])[None, :] < np.asarray(raw["count"]).reshape(n, 1)
        else:
            mask = pt > 0
        values = {r: np.asarray(v, dtype=np.float64) for r, v in raw.items() if r not in ("mask", "count")}
        for role, value in values.items():
            if not np.isfinite(value[mask]).all():
                raise SciMLError(f"{path}: NaN or infinite values in '{self._fields[role]}' (data.fields.{role})")
        # leading particles by pT first, padding last; then cut or pad to `width`
        order = np.argsort(np.where(mask, -pt, np.inf), axis=1, kind="stable")
        values = {r: np.take_along_axis(v, order, axis=1) for r, v in values.items()}
        mask = np.take_along_axis(mask, order, axis=1)
        pt, eta, phi = values["pt"], values["eta"], values["phi"]
        px, py = (pt * np.cos(phi) * mask).sum(1), (pt * np.sin(phi) * mask).sum(1)
        jet_pt = np.hypot(px, py)
        if self.centre:  # the axis of the summed (massless) momenta of all particles read
            pz = (pt * np.sinh(np.clip(eta, -20, 20)) * mask).sum(1)
            axis_eta = np.arcsinh(pz / np.maximum(jet_pt, 1e-12))
            eta = eta - axis_eta[:, None]
            phi = phi - np.arctan2(py, px)[:, None]
        phi = (phi + np.pi) % (2 * np.pi) - np.pi  # relative azimuth wrapped to [-pi, pi)
        columns = []
        safe = lambda v: np.log(np.where(mask, np.maximum(v, 1e-12), 1.0))  # noqa: E731
        for f in self._features:
            if f == "deta":
                columns.append(eta)
            elif f == "dphi":
                columns.append(phi)
            elif f == "log_pt":
                columns.append(safe(pt))
            elif f == "log_pt_rel":
                columns.append(safe(pt / np.maximum(jet_pt, 1e-12)[:, None]))
            elif f == "log_e":
                columns.append(safe(values["energy"]))
            elif f == "log_e_rel":
                energy = values["energy"]
                columns.append(safe(energy / np.maximum((energy * mask).sum(1), 1e-12)[:, None]))
            elif f == "dr":
                columns.append(np.hypot(eta, phi))
            elif f == "charge":
                columns.append(values["charge"] if "charge" in values else charge_from_pid(values["pid"]))
            elif f == "pid":
                charge = values["charge"] if "charge" in values else charge_from_pid(values["pid"])
                columns.extend(pid_flags(np.rint(values["pid"]).astype(np.int64), charge).transpose(1, 0, 2))
        x = np.stack(columns + [mask], axis=1) * mask[:, None, :]  # padded entries are 0 in every channel
        have = x.shape[2]
        if have >= width:
            x = x[:, :, :width]
        else:
            x = np.pad(x, ((0, 0), (0, 0), (0, width - have)))
        return x.astype(np.float32)


class ParticleStandardize(Standardize):
    """Per-feature standardisation over the real particles only (padded entries enter no statistic and stay 0);
    the mask channel (last) passes unchanged. Kept in checkpoints like any `sciml.data.Normalizer`."""

    def partial(self, x):
        mask = x[:, -1:, :] > 0.5
        count = np.full(x.shape[1], float(mask.sum()))
        masked = np.where(mask, x, 0.0)
        return {"sum": masked.sum(axis=(0, 2)), "sumsq": (masked ** 2).sum(axis=(0, 2)), "count": count}

    def finish(self, totals):
        super().finish(totals)
        self.mean[-1], self.std[-1] = 0.0, 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = x[:, -1:, :]
        features = (x[:, :-1] - self._view(x, self.mean[:-1])) / self._view(x, self.std[:-1])
        return torch.cat([features * mask, mask], dim=1)


# -- formats ----------------------------------------------------------------------------------------------------
def _npy_ndim(path: Path) -> int:
    try:
        return np.load(path, mmap_mode="r").ndim
    except (OSError, ValueError):
        return -1


class _Arrays:
    """Arrays held for a file (an `.npz` is decompressed once per process, an `.npy` memory-mapped)."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays

    def close(self):
        self.arrays = {}


class _Source:
    """One open particle file: rows, width, labels, weights; `read(rows)` -> (raw arrays by role, y, w)."""

    rows: int
    width: int
    labels: bool
    weights: bool
    chunk_rows: int | None = None
    label_name: str = "label"

    def __init__(self, reader: JetParticles, path: Path):
        self.reader, self.path = reader, path

    def check_weights(self, present: bool, where: str) -> bool:
        key = self.reader.weight_key
        if key and self.labels and not present:
            raise SciMLError(f"{self.path}: missing {where} '{key}' (per-jet weights; data.weight_key=null for none)")
        return bool(key) and present


class _H5Source(_Source):
    def __init__(self, reader, path):
        super().__init__(reader, path)
        h5 = reader.handle(path, open_h5)
        self.group = reader.particles or "constituents"
        node = h5.get(self.group)
        fields = reader._fields
        if isinstance(node, h5py.Group):
            self.columns = False
            for role, name in fields.items():
                if not isinstance(node.get(str(name)), h5py.Dataset):
                    raise SciMLError(f"{path}: no dataset '{self.group}/{name}' (data.fields.{role}; "
                                     f"found {', '.join(sorted(node))})")
            shapes = {role: node[str(name)].shape for role, name in fields.items()}
            first = node[str(fields["pt"])]
            bad = next((r for r, s in shapes.items() if s[:1] != first.shape[:1] or (r != "count" and s != first.shape)),
                       None)
            if first.ndim != 2 or bad:
                raise SciMLError(f"{path}: '{self.group}/*' must be (N, P) arrays of one shape (count: (N,)); "
                                 f"found {shapes}")
        elif isinstance(node, h5py.Dataset) and node.ndim == 3:
            self.columns = True
            first = node
            for role, column in fields.items():
                if not isinstance(column, int) or not 0 <= column < node.shape[2]:
                    raise SciMLError(f"{path}: '{self.group}' is (N, P, {node.shape[2]}): data.fields.{role} must be "
                                     f"a column number below {node.shape[2]}, got {column!r}")
        else:
            raise SciMLError(f"{path}: no particle group or (N, P, F) dataset '{self.group}' (data.particles)")
        self.rows, self.width = first.shape[0], first.shape[1]
        self.chunk_rows = first.chunks[0] if first.chunks else None
        self.label_name = reader.label_key or "label"
        self.labels = isinstance(h5.get(self.label_name), h5py.Dataset)
        self.weights = self.check_weights(isinstance(h5.get(reader.weight_key or ""), h5py.Dataset), "dataset")
        for key in [self.label_name] * self.labels + [reader.weight_key] * self.weights:
            if h5[key].shape != (self.rows,):
                raise SciMLError(f"{path}: '{key}' has shape {h5[key].shape}, expected ({self.rows},)")

    def read(self, rows):
        h5 = self.reader.handle(self.path, open_h5)
        fields = self.reader._fields
        if self.columns:
            block = read_rows(h5[self.group], rows)
            raw = {role: block[:, :, column] for role, column in fields.items()}
        else:
            raw = {role: read_rows(h5[f"{self.group}/{name}"], rows) for role, name in fields.items()}
        y = read_rows(h5[self.label_name], rows) if self.labels else None
        w = read_rows(h5[self.reader.weight_key], rows) if self.weights else None
        return raw, y, w


class _NumpySource(_Source):
    def __init__(self, reader, path):
        super().__init__(reader, path)
        arrays = self._arrays()
        self.key = "x" if path.suffix == ".npy" else (reader.particles or "X")
        self.label_name = "y" if path.suffix == ".npy" else (reader.label_key or "y")
        if self.key not in arrays:
            raise SciMLError(f"{path}: no array '{self.key}' (data.particles; found {', '.join(arrays)})")
        x = arrays[self.key]
        if x.ndim != 3:
            raise SciMLError(f"{path}: particles must be (N, P, F), found shape {x.shape}")
        for role, column in reader._fields.items():
            if not isinstance(column, int) or not 0 <= column < x.shape[2]:
                raise SciMLError(f"{path}: (N, P, {x.shape[2]}) particles: data.fields.{role} must be a column "
                                 f"number below {x.shape[2]}, got {column!r}")
        self.rows, self.width = x.shape[0], x.shape[1]
        self.labels = self.label_name in arrays
        self.weights = self.check_weights(bool(reader.weight_key) and reader.weight_key in arrays, "array")
        for key in [self.label_name] * self.labels + [reader.weight_key] * self.weights:
            if arrays[key].shape != (self.rows,):
                raise SciMLError(f"{path}: '{key}' has shape {arrays[key].shape}, expected ({self.rows},)")

    def _open(self, path: Path) -> _Arrays:
        try:
            if path.suffix == ".npz":
                with np.load(path) as f:
                    return _Arrays({k: f[k] for k in f.files})
            arrays = {"x": np.load(path, mmap_mode="r")}
        except (OSError, ValueError) as exc:
            raise SciMLError(f"{path}: not a readable NumPy file ({str(exc).splitlines()[0]})") from None
        labels = _npy_labels(path)
        if labels is not None:
            arrays["y"] = np.load(labels, mmap_mode="r")
        return _Arrays(arrays)

    def _arrays(self) -> dict[str, np.ndarray]:
        return self.reader.handle(self.path, self._open).arrays

    def read(self, rows):
        arrays = self._arrays()
        block = np.asarray(arrays[self.key][rows])
        raw = {role: block[:, :, column] for role, column in self.reader._fields.items()}
        y = np.asarray(arrays[self.label_name][rows]) if self.labels else None
        w = np.asarray(arrays[self.reader.weight_key][rows]) if self.weights else None
        return raw, y, w


def _npy_labels(path: Path) -> Path | None:
    """The labels of an `.npy` of particles: the sibling `.npy` whose name has `y` (`Y`) in place of one `x` (`X`)."""
    stem = path.stem
    for i, c in enumerate(stem):
        if c in "xX":
            other = path.with_name(stem[:i] + ("y" if c == "x" else "Y") + stem[i + 1:] + path.suffix)
            if other.is_file():
                return other
    return None


class _RootSource(_Source):
    def __init__(self, reader, path):
        super().__init__(reader, path)
        try:
            import uproot  # noqa: F401
        except ImportError:
            raise SciMLError(f"{path}: reading ROOT files needs uproot and awkward (pip install uproot awkward)") \
                from None
        tree = self._tree()
        branches = set(tree.keys())
        for role, name in reader._fields.items():
            if str(name) not in branches:
                raise SciMLError(f"{path}: no branch '{name}' in tree '{tree.name}' (data.fields.{role}; "
                                 f"branches: {', '.join(sorted(branches))})")
        self.rows = int(tree.num_entries)
        self.label_name = reader.label_key or "label"
        self.labels = self.label_name in branches
        self.weights = self.check_weights(bool(reader.weight_key) and reader.weight_key in branches, "branch")
        if reader.max_particles:
            self.width = reader.max_particles
        else:  # the longest jet of the file
            import awkward as ak

            counts = ak.num(tree[str(reader._fields["pt"])].array(library="ak"), axis=1)
            self.width = max(1, int(ak.max(counts))) if len(counts) else 1

    def _open(self, path: Path):
        import uproot

        try:
            return uproot.open(path)
        except Exception as exc:  # uproot raises many kinds for a file that is not ROOT
            raise SciMLError(f"{path}: not a readable ROOT file ({str(exc).splitlines()[0]})") from None

    def _tree(self):
        f = self.reader.handle(self.path, self._open)
        if self.reader.particles:
            if self.reader.particles not in f:
                raise SciMLError(f"{self.path}: no tree '{self.reader.particles}' (data.particles; found "
                                 f"{', '.join(f.keys(cycle=False))})")
            return f[self.reader.particles]
        trees = [k for k, c in f.classnames(cycle=False).items() if c in ("TTree", "ROOT::RNTuple")]
        if len(trees) != 1:
            raise SciMLError(f"{self.path}: {len(trees)} trees ({', '.join(trees)}): name one with data.particles")
        return f[trees[0]]

    def read(self, rows):
        import awkward as ak

        tree = self._tree()
        fields = self.reader._fields
        branches = {str(name) for name in fields.values()}
        branches |= {self.label_name} if self.labels else set()
        branches |= {self.reader.weight_key} if self.weights else set()
        # runs of nearby rows are read as one span of entries (uproot reads whole baskets anyway)
        breaks = np.flatnonzero(np.diff(rows) > WINDOW) + 1
        parts = []
        for run in np.split(rows, breaks):
            if len(run) == 0:
                continue
            block = tree.arrays(sorted(branches), entry_start=int(run[0]), entry_stop=int(run[-1]) + 1,
                                library="ak")
            parts.append(block[run - run[0]])
        block = ak.concatenate(parts) if len(parts) > 1 else parts[0]
        counts = ak.to_numpy(ak.num(block[str(fields["pt"])], axis=1))
        width = max(1, int(counts.max(initial=0)))  # padded to this block's longest jet; cut to P (by pT) later
        raw = {role: ak.to_numpy(block[str(name)]) if block[str(name)].ndim == 1 else  # a per-jet count
               ak.to_numpy(ak.fill_none(ak.pad_none(block[str(name)], width, axis=1), 0)).astype(np.float64)
               for role, name in fields.items()}
        if "count" not in raw and "mask" not in raw:  # no padding of its own: the real particles are the counted ones
            raw["count"] = counts
        y = ak.to_numpy(block[self.label_name]) if self.labels else None
        w = ak.to_numpy(block[self.reader.weight_key]) if self.weights else None
        return raw, y, w
