"""Simulate top-quark vs QCD jets with Pythia 8 + FastJet and write 3-channel calorimeter images to HDF5.

    python -m sciml_plugins.hep.simulate --n-jets 2000 --out jets.h5 --seed 1 --workers 2

Signal: hadronic ttbar; background: QCD dijets; pp at 14 TeV. One jet per event: the leading anti-kT R=0.8 jet of
the visible final state, kept when 550 <= pT <= 650 GeV and |eta| < 2 (signal jets must also lie within dR < 0.8 of
a top quark). The image is centred on the jet axis and holds, per (eta, phi) pixel, the electromagnetic E_T
(photons, electrons), the hadronic E_T (other visible particles except muons, which leave little energy in a
calorimeter) and the number of charged particles with pT > 1 GeV, as in Kurth et al. 2017 ("Deep Learning at
15PF"). E and E_T are smeared per pixel with a Gaussian calorimeter resolution. The HDF5 layout is that of NERSC's
hep_cnn_benchmark (`data`, `label`, `weight`, `normweight`) plus jet features in `features/`.

Work is cut into chunks of `chunk_size` accepted jets per class; chunk k of class c draws all its random numbers
from seeds derived from (seed, c, k) alone, so the file is bit-identical for any number of worker processes.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import json
import logging
import math
import multiprocessing as mp
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

SQRT_S = 14000.0  # GeV
PROCESSES = {
    1: ["Top:gg2ttbar = on", "Top:qqbar2ttbar = on", "24:onMode = off", "24:onIfAny = 1 2 3 4 5"],
    0: ["HardQCD:all = on"],
}
CLASS_NAMES = {1: "top", 0: "qcd"}
CHANNELS = [
    "EM E_T [GeV]: photons and electrons",
    "hadronic E_T [GeV]: all other visible particles except muons (muons are minimum-ionising in a calorimeter)",
    "charged-particle multiplicity: charged visible particles with pT > track_pt_min (muons included)",
]
FEATURES = ("pt", "eta", "phi", "mass", "tau1", "tau2", "tau3", "tau21", "tau32", "n_constituents")
# Per-constituent arrays (jets, n_constituents_max), leading constituents first, zero-padded; `count` says how many
# are real. The layout of the public jet datasets (one padded array per quantity, as in the ATLAS top-tagging open
# data; the names of weaver-core's particle branches).
CONSTITUENTS = {"pt": "transverse momentum [GeV]", "deta": "pseudorapidity minus the jet's",
                "dphi": "azimuth minus the jet's [rad], wrapped to [-pi, pi)", "energy": "energy [GeV]",
                "charge": "electric charge [e]", "pid": "PDG particle id"}
MAX_BATCH = 200  # events per Pythia nextBatch call: bounds the memory of the full event records (~0.3 MB/event)


@dataclass(frozen=True)
class SimConfig:
    """Physics and detector settings; everything here is written to the file's attributes."""

    image_size: int = 40
    extent: float = 0.8  # image half-width in d_eta and d_phi
    jet_r: float = 0.8
    pt_min: float = 550.0
    pt_max: float = 650.0
    eta_max: float = 2.0
    top_match: bool = True  # signal jet within jet_r of a top quark (truth matching, as in the top-tagging benchmark)
    pthat_min: float = 500.0  # chosen so the jet-pT window is covered without wasting many events
    pthat_max: float = 700.0
    track_pt_min: float = 1.0
    n_constituents_max: int = 100  # leading constituents stored per jet (0: none)
    constituent_dtype: str = "float32"  # float16 halves the constituent arrays (the embedded sample uses it)
    em_resolution: tuple[float, float] = (0.10, 0.01)  # sigma/E = a/sqrt(E [GeV]) (+) b
    had_resolution: tuple[float, float] = (0.50, 0.03)


def _pythia_module():
    """PyPI's `pythia8mc` wheel renames the module; conda and source builds call it `pythia8`."""
    try:
        import pythia8mc as pythia8
    except ImportError:
        import pythia8
    return pythia8


def _version(*dists: str) -> str:
    for dist in dists:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return "unknown"


def _seeds(seed: int, label: int, chunk: int) -> tuple[int, np.random.Generator]:
    """Pythia seed (1..899999999; 0 would mean 'from the clock') and a numpy generator for the detector smearing."""
    pythia_seed, smear_seed = np.random.SeedSequence([seed, label, chunk]).generate_state(2, dtype=np.uint64)
    return int(pythia_seed % 899_999_999) + 1, np.random.default_rng(int(smear_seed))


def _make_pythia(label: int, cfg: SimConfig, pythia_seed: int):
    pythia = _pythia_module().Pythia("", False)  # "" = default xmldoc path, False = no banner
    settings = [f"Beams:eCM = {SQRT_S}", *PROCESSES[label],
                f"PhaseSpace:pTHatMin = {cfg.pthat_min}", f"PhaseSpace:pTHatMax = {cfg.pthat_max}",
                "Print:quiet = on", "Next:numberCount = 0", "Random:setSeed = on", f"Random:seed = {pythia_seed}"]
    for s in settings:
        if not pythia.readString(s):
            raise RuntimeError(f"Pythia rejected the setting '{s}'")
    if not pythia.init():
        raise RuntimeError("Pythia initialisation failed")
    return pythia


def _flat(array) -> np.ndarray:
    import awkward as ak
    return ak.to_numpy(ak.flatten(array))


def _tau(cpt, cy, cphi, mask, axes, r0: float) -> np.ndarray:
    """N-subjettiness (beta=1): sum_i pT_i min_k dR(i, axis_k) / (R0 sum_i pT_i), on padded (jets, constituents)."""
    import awkward as ak

    apx, apy, apz, ae = (ak.to_numpy(getattr(axes, f)) for f in ("px", "py", "pz", "E"))  # (jets, N)
    ay = 0.5 * np.log((ae + apz) / (ae - apz))
    aphi = np.arctan2(apy, apx)
    dy = cy[:, :, None] - ay[:, None, :]
    dphi = (cphi[:, :, None] - aphi[:, None, :] + np.pi) % (2 * np.pi) - np.pi
    dr = np.sqrt(dy**2 + dphi**2).min(axis=2)
    return (cpt * dr * mask).sum(axis=1) / (r0 * (cpt * mask).sum(axis=1))


def _process_batch(events, label: int, cfg: SimConfig, pythia, rng: np.random.Generator):
    """Select jets in one nextBatch of events; returns (index of each accepted event in the batch, images, features)."""
    import awkward as ak
    import fastjet

    prt = events.prt
    absid = abs(prt.id)
    vis = prt[(prt.status > 0) & (absid != 12) & (absid != 14) & (absid != 16)]
    counts = ak.to_numpy(ak.num(vis))
    n_events = len(counts)
    p4 = ak.zip({"px": vis.p.px, "py": vis.p.py, "pz": vis.p.pz, "E": vis.p.e}, with_name="Momentum4D")

    # Anti-kT over all events of the batch at once (fastjet's awkward interface runs the loop in C++).
    cs = fastjet.ClusterSequence(p4, fastjet.JetDefinition(fastjet.antikt_algorithm, cfg.jet_r))
    jets = cs.inclusive_jets(min_pt=cfg.pt_min)  # the leading jet must pass pt_min anyway
    lead = ak.argmax(np.hypot(jets.px, jets.py), axis=1, keepdims=True)
    has_jet = ak.to_numpy(ak.num(jets)) > 0
    jet = ak.firsts(jets[lead])
    jpx, jpy, jpz, je = (ak.to_numpy(ak.fill_none(getattr(jet, f), 0.0)) for f in ("px", "py", "pz", "E"))
    jpt = np.hypot(jpx, jpy)
    with np.errstate(divide="ignore", invalid="ignore"):
        jeta = np.arcsinh(jpz / jpt)
    jphi = np.arctan2(jpy, jpx)
    jmass = np.sqrt(np.maximum(je**2 - jpx**2 - jpy**2 - jpz**2, 0.0))
    constit = ak.firsts(cs.constituent_index(min_pt=cfg.pt_min)[lead])
    n_constit = ak.to_numpy(ak.fill_none(ak.num(constit), 0))

    keep = has_jet & (jpt >= cfg.pt_min) & (jpt <= cfg.pt_max) & (np.abs(jeta) < cfg.eta_max) & (n_constit >= 3)
    if label == 1 and cfg.top_match:
        # Last copy of t and tbar in the record = the top after showering, just before it decays.
        local = ak.local_index(prt.id)
        dr2 = np.full(n_events, np.inf)
        for sign in (6, -6):
            last = ak.to_numpy(ak.fill_none(ak.max(local[prt.id == sign], axis=1), -1))
            ok = last >= 0
            top = ak.firsts(prt[ak.from_regular(ak.from_numpy(np.where(ok, last, 0)[:, None]))])
            tpx, tpy, tpz = (ak.to_numpy(getattr(top.p, f)) for f in ("px", "py", "pz"))
            teta = np.arcsinh(tpz / np.maximum(np.hypot(tpx, tpy), 1e-9))
            dphi = (np.arctan2(tpy, tpx) - jphi + np.pi) % (2 * np.pi) - np.pi
            dr2 = np.where(ok, np.minimum(dr2, (teta - jeta) ** 2 + dphi**2), dr2)
        keep &= dr2 < cfg.jet_r**2
    sel = np.flatnonzero(keep)
    n_sel = len(sel)
    if n_sel == 0:
        return sel, np.zeros((0, 3, cfg.image_size, cfg.image_size), np.float32), \
            {k: np.zeros(0) for k in FEATURES}, _no_constituents(cfg)

    # N-subjettiness axes: exclusive kT reclustering of the constituents into N subjets (R=1000: nothing merges
    # with the beam). Winner-take-all recombination makes the N-1 axes a subset of the N axes, so tau_N <= tau_N-1
    # always (with E-scheme kT axes ~10% of QCD jets had tau2 > tau1), and suits beta=1 (Larkoski et al. 2014).
    cp4 = p4[sel][constit[sel]]
    kt = fastjet.ClusterSequence(cp4, fastjet.JetDefinition(fastjet.kt_algorithm, fastjet.JetDefinition.max_allowable_R,
                                                            fastjet.WTA_pt_scheme))
    width = int(ak.max(ak.num(cp4)))
    pad = lambda x: ak.to_numpy(ak.fill_none(ak.pad_none(x, width, axis=1), 0.0))  # noqa: E731
    cpx, cpy, cpz, ce = pad(cp4.px), pad(cp4.py), pad(cp4.pz), pad(cp4.E)
    mask = ce > 0
    cpt = np.hypot(cpx, cpy)
    with np.errstate(divide="ignore", invalid="ignore"):
        cy = np.where(mask, 0.5 * np.log((ce + cpz) / (ce - cpz)), 0.0)
    cphi = np.arctan2(cpy, cpx)
    with warnings.catch_warnings():  # fastjet 3.5 warns on every exclusive_jets call, even for kT (its check is buggy)
        warnings.simplefilter("ignore", UserWarning)
        axes = [kt.exclusive_jets(n_jets=n) for n in (1, 2, 3)]
    tau = [_tau(cpt, cy, cphi, mask, a, cfg.jet_r) for a in axes]
    features = {"pt": jpt[sel], "eta": jeta[sel], "phi": jphi[sel], "mass": jmass[sel],
                "tau1": tau[0], "tau2": tau[1], "tau3": tau[2], "tau21": tau[1] / tau[0], "tau32": tau[2] / tau[1],
                "n_constituents": n_constit[sel]}
    cid = pad(vis.id[sel][constit[sel]]).astype(np.int64)
    constituents = _constituents(cpt, cpz, ce, cphi, cid, mask, jeta[sel], jphi[sel], cfg, pythia)
    return sel, _images(vis, counts, sel, jeta[sel], jphi[sel], cfg, pythia, rng), features, constituents


def _no_constituents(cfg: SimConfig) -> dict:
    n = cfg.n_constituents_max
    out = {k: np.zeros((0, n), _constituent_dtype(k, cfg)) for k in CONSTITUENTS}
    return out | {"count": np.zeros(0, np.int16)}


def _constituent_dtype(key: str, cfg: SimConfig):
    return {"charge": np.int8, "pid": np.int16}.get(key, np.dtype(cfg.constituent_dtype))


def _constituents(cpt, cpz, ce, cphi, cid, mask, jeta, jphi, cfg: SimConfig, pythia) -> dict:
    """The leading `n_constituents_max` constituents of each jet by pT, relative to the jet axis, zero-padded."""
    n = cfg.n_constituents_max
    order = np.argsort(np.where(mask, -cpt, np.inf), axis=1, kind="stable")[:, :n]
    take = lambda a: np.take_along_axis(a, order, axis=1)  # noqa: E731
    pt, pz, e, phi, pid, valid = take(cpt), take(cpz), take(ce), take(cphi), take(cid), take(mask)
    with np.errstate(divide="ignore", invalid="ignore"):
        deta = np.where(valid, np.arcsinh(pz / pt), 0.0) - jeta[:, None]
    dphi = (phi - jphi[:, None] + np.pi) % (2 * np.pi) - np.pi
    ids = np.unique(pid[valid])
    charge_of = {int(i): pythia.particleData.charge(int(i)) for i in ids}
    charge = np.vectorize(lambda i: charge_of.get(int(i), 0.0), otypes=[float])(pid) if pid.size else pid * 0.0
    out = {"pt": pt, "deta": deta, "dphi": dphi, "energy": e, "charge": charge, "pid": pid}
    out = {k: np.where(valid, v, 0).astype(_constituent_dtype(k, cfg)) for k, v in out.items()}
    if out["pt"].shape[1] < n:  # this batch's longest jet is shorter than n
        out = {k: np.pad(v, ((0, 0), (0, n - v.shape[1]))) for k, v in out.items()}
    return out | {"count": valid.sum(axis=1).astype(np.int16)}


def _images(vis, counts, sel, jeta, jphi, cfg: SimConfig, pythia, rng: np.random.Generator) -> np.ndarray:
    """Bin every visible particle of the selected events into (jets, 3, H, W) with one bincount per quantity."""
    size, ext = cfg.image_size, cfg.extent
    row_of_event = np.full(len(counts), -1)
    row_of_event[sel] = np.arange(len(sel))
    row = np.repeat(row_of_event, counts)
    px, py, pz, e, pid = (_flat(x) for x in (vis.p.px, vis.p.py, vis.p.pz, vis.p.e, vis.id))
    use = row >= 0
    row, px, py, pz, e, pid = row[use], px[use], py[use], pz[use], e[use], pid[use]
    pt = np.hypot(px, py)
    with np.errstate(divide="ignore", invalid="ignore"):
        deta = np.arcsinh(pz / pt) - jeta[row]
    dphi = (np.arctan2(py, px) - jphi[row] + np.pi) % (2 * np.pi) - np.pi
    inside = (np.abs(deta) < ext) & (np.abs(dphi) < ext)  # NaN (pT = 0) compares False
    row, pt, pz, e, pid, deta, dphi = (a[inside] for a in (row, pt, pz, e, pid, deta, dphi))
    pix = np.minimum(((deta + ext) * (size / (2 * ext))).astype(np.int64), size - 1) * size + \
        np.minimum(((dphi + ext) * (size / (2 * ext))).astype(np.int64), size - 1)

    ids, inverse = np.unique(pid, return_inverse=True)
    charged = np.array([pythia.particleData.charge(int(i)) != 0 for i in ids], bool)[inverse]
    absid = np.abs(pid)
    em = (absid == 11) | (absid == 22)
    channel = np.where(em, 0, np.where(absid == 13, -1, 1))  # -1: muon, no calorimeter deposit
    et = e * pt / np.sqrt(pt**2 + pz**2)

    n_pix = len(sel) * size * size
    out = np.zeros((3, n_pix))
    for ch, (a, b) in ((0, cfg.em_resolution), (1, cfg.had_resolution)):
        m = channel == ch
        energy = np.bincount(row[m] * size * size + pix[m], weights=e[m], minlength=n_pix)
        trans = np.bincount(row[m] * size * size + pix[m], weights=et[m], minlength=n_pix)
        hit = np.flatnonzero(energy > 0)
        # Resolution acts on the deposited energy E; E_T scales with it (same direction).
        sigma = np.sqrt(a**2 * energy[hit] + (b * energy[hit]) ** 2)
        smeared = np.maximum(energy[hit] + sigma * rng.standard_normal(len(hit)), 0.0)
        out[ch, hit] = trans[hit] * smeared / energy[hit]
    m = charged & (pt > cfg.track_pt_min)
    out[2] = np.bincount(row[m] * size * size + pix[m], minlength=n_pix)
    return out.reshape(3, len(sel), size, size).transpose(1, 0, 2, 3).astype(np.float32)


def _run_chunk(task: tuple[int, int, int, int, SimConfig]) -> dict:
    """Generate events for one class until `n_target` jets pass the selection."""
    label, chunk, n_target, seed, cfg = task
    t0 = time.perf_counter()
    pythia_seed, rng = _seeds(seed, label, chunk)
    pythia = _make_pythia(label, cfg, pythia_seed)
    images, features, constituents, n_examined, n_generated, eff = [], [], [], 0, 0, 0.3
    while sum(len(x) for x in images) < n_target:
        missing = n_target - sum(len(x) for x in images)
        # Batch size from the running efficiency: few overshoot events, deterministic given the seed.
        n_batch = int(min(MAX_BATCH, max(8, math.ceil(1.2 * missing / eff))))
        events = pythia.nextBatch(n_batch)
        sel, img, feat, parts = _process_batch(events, label, cfg, pythia, rng)
        take = min(missing, len(sel))
        # Events past the last needed jet do not count as examined (the selection efficiency stays unbiased).
        n_examined += int(sel[take - 1]) + 1 if take == missing else len(events)
        n_generated += len(events)
        images.append(img[:take])
        features.append({k: v[:take] for k, v in feat.items()})
        constituents.append({k: v[:take] for k, v in parts.items()})
        eff = max(sum(len(x) for x in images) / n_examined, 0.02)
    info = pythia.infoPython()
    return {"label": label, "chunk": chunk, "images": np.concatenate(images),
            "features": {k: np.concatenate([f[k] for f in features]) for k in FEATURES},
            "constituents": {k: np.concatenate([c[k] for c in constituents]) for k in constituents[0]},
            "n_examined": n_examined, "n_generated": n_generated,
            "sigma_pb": info.sigmaGen() * 1e9, "sigma_err_pb": info.sigmaErr() * 1e9,
            "seconds": time.perf_counter() - t0}


def _check_args(n_jets_per_class, seed, workers, image_size, chunk_size, n_constituents=0) -> None:
    for name, flag, value, low in (("n_jets_per_class", "--n-jets", n_jets_per_class, 1),
                                   ("n_constituents", "--n-constituents", n_constituents, 0),
                                   ("seed", "--seed", seed, 0), ("workers", "--workers", workers, 1),
                                   ("image_size", "--image-size", image_size, 2),
                                   ("chunk_size", "--chunk-size", chunk_size, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} ({flag}) must be an integer >= {low}, got {value!r}")
    if seed >= 2**63:
        raise ValueError(f"seed (--seed) must be < 2**63, got {seed}")


def simulate(n_jets_per_class: int, out: str | os.PathLike, seed: int = 1, workers: int | None = None,
             image_size: int = 40, chunk_size: int = 250, config: SimConfig | None = None,
             n_constituents: int | None = None, constituent_dtype: str | None = None) -> dict:
    """Generate `n_jets_per_class` top and QCD jets, write them to the HDF5 file `out`, return a summary dict.
    `n_constituents` and `constituent_dtype` (float32, float16) override the config's constituent settings."""
    workers = (os.cpu_count() or 1) if workers is None else workers
    cfg = config or SimConfig()
    n_constituents = cfg.n_constituents_max if n_constituents is None else n_constituents
    constituent_dtype = constituent_dtype or cfg.constituent_dtype
    _check_args(n_jets_per_class, seed, workers, image_size, chunk_size, n_constituents)
    if constituent_dtype not in ("float32", "float16"):
        raise ValueError(f"constituent_dtype (--constituent-dtype) must be float32 or float16, got "
                         f"{constituent_dtype!r}")
    out = Path(out)
    if not out.parent.is_dir():
        raise ValueError(f"out (--out): folder '{out.parent}' does not exist")
    _pythia_module()  # fail early, in this process, if the generator is missing
    cfg = SimConfig(**{**asdict(cfg), "image_size": image_size, "n_constituents_max": n_constituents,
                       "constituent_dtype": constituent_dtype})

    n_chunks = math.ceil(n_jets_per_class / chunk_size)
    tasks = [(label, k, min(chunk_size, n_jets_per_class - k * chunk_size), seed, cfg)
             for k in range(n_chunks) for label in (1, 0)]
    log.info("simulating %d jets per class in %d chunks on %d worker(s)", n_jets_per_class, len(tasks), workers)
    t0 = time.perf_counter()
    results = []
    # spawn: a clean interpreter per worker, safe even when the caller has threads (torch) running.
    pool = cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) if workers > 1 else None
    with pool or contextlib.nullcontext():
        for r in (pool.map if pool else map)(_run_chunk, tasks):  # in task order, whatever finishes first
            results.append(r)
            log.info("chunk %d/%d (%s %d): %d jets from %d events in %.1f s", len(results), len(tasks),
                     CLASS_NAMES[r["label"]], r["chunk"], len(r["images"]), r["n_examined"], r["seconds"])
    wall = time.perf_counter() - t0

    per_class = {}
    for label in (1, 0):
        rs = [r for r in results if r["label"] == label]  # already in chunk order
        n_examined = sum(r["n_examined"] for r in rs)
        # Chunks are independent runs: combine their cross-section estimates weighted by the events behind them.
        n_gen = np.array([r["n_generated"] for r in rs])
        sigma = np.dot([r["sigma_pb"] for r in rs], n_gen) / n_gen.sum()
        sigma_err = np.linalg.norm(np.array([r["sigma_err_pb"] for r in rs]) * n_gen) / n_gen.sum()
        per_class[label] = {"images": np.concatenate([r["images"] for r in rs]),
                            "features": {k: np.concatenate([r["features"][k] for r in rs]) for k in FEATURES},
                            "constituents": {k: np.concatenate([r["constituents"][k] for r in rs])
                                             for k in rs[0]["constituents"]},
                            "n_examined": n_examined, "n_generated": int(n_gen.sum()),
                            "sigma_pb": float(sigma), "sigma_err_pb": float(sigma_err),
                            "efficiency": n_jets_per_class / n_examined,
                            "seconds": sum(r["seconds"] for r in rs)}

    labels = np.concatenate([np.full(n_jets_per_class, label, np.int32) for label in (1, 0)])
    order = np.random.default_rng(seed).permutation(len(labels))  # interleave signal and background
    weight = np.concatenate([np.full(n_jets_per_class, per_class[c]["sigma_pb"] / per_class[c]["n_examined"])
                             for c in (1, 0)])
    normweight = weight.copy()
    for c in (1, 0):
        normweight[labels == c] *= n_jets_per_class / weight[labels == c].sum()
    arrays = {"data": np.concatenate([per_class[c]["images"] for c in (1, 0)])[order],
              "label": labels[order], "weight": weight[order].astype(np.float32),
              "normweight": normweight[order].astype(np.float32)}
    features = {k: np.concatenate([per_class[c]["features"][k] for c in (1, 0)])[order] for k in FEATURES}
    constituents = {k: np.concatenate([per_class[c]["constituents"][k] for c in (1, 0)])[order]
                    for k in per_class[1]["constituents"]} if cfg.n_constituents_max else {}

    n_generated = sum(per_class[c]["n_generated"] for c in (1, 0))
    cpu_seconds = sum(per_class[c]["seconds"] for c in (1, 0))
    summary = {"n_jets": len(labels), "wall_seconds": wall, "events_generated": n_generated,
               "events_per_s_per_process": n_generated / cpu_seconds, "jets_per_s": len(labels) / wall,
               **{f"efficiency_{CLASS_NAMES[c]}": per_class[c]["efficiency"] for c in (1, 0)},
               **{f"sigma_pb_{CLASS_NAMES[c]}": per_class[c]["sigma_pb"] for c in (1, 0)},
               **{f"events_examined_{CLASS_NAMES[c]}": per_class[c]["n_examined"] for c in (1, 0)}}
    _write(out, arrays, features, _attributes(cfg, seed, chunk_size, n_jets_per_class, per_class), constituents)
    log.info("wrote %d jets to %s in %.1f s: %.1f events/s per process, %.2f accepted jets/s overall, "
             "selection efficiency top %.3f, qcd %.3f", len(labels), out, wall,
             summary["events_per_s_per_process"], summary["jets_per_s"],
             summary["efficiency_top"], summary["efficiency_qcd"])
    return summary


def _attributes(cfg: SimConfig, seed: int, chunk_size: int, n_jets_per_class: int, per_class: dict) -> dict:
    size, ext = cfg.image_size, cfg.extent
    attrs = {
        "generator": "Pythia 8 (pythia.org), jets: FastJet (fastjet.fr)",
        "pythia_version": _version("pythia8mc", "pythia8"), "fastjet_version": _version("fastjet"),
        "awkward_version": _version("awkward"), "numpy_version": np.__version__, "h5py_version": _version("h5py"),
        "created_by": f"sciml {_version('sciml')} (sciml_plugins.hep.simulate)",
        "sqrt_s_gev": SQRT_S, "beams": "pp",
        "process_signal": json.dumps(PROCESSES[1]), "process_background": json.dumps(PROCESSES[0]),
        "pthat_min_gev": cfg.pthat_min, "pthat_max_gev": cfg.pthat_max,
        "pythia_other_settings": "defaults (ISR, FSR, MPI, hadronisation and decays on); "
                                 "Print:quiet = on; Next:numberCount = 0; Random:setSeed = on",
        "seed": seed, "chunk_size": chunk_size, "n_jets_per_class": n_jets_per_class,
        "seeding": "chunk k of class c: Pythia Random:seed and smearing RNG from numpy SeedSequence([seed, c, k])",
        "jet_definition": f"anti-kT R={cfg.jet_r}, E-scheme, visible final-state particles (no neutrinos)",
        "selection": f"leading jet with {cfg.pt_min} <= pT <= {cfg.pt_max} GeV, |eta| < {cfg.eta_max}, "
                     f">= 3 constituents" + (f"; signal: a top quark within dR < {cfg.jet_r} of the jet axis"
                                              if cfg.top_match else ""),
        "image_size": size, "image_extent": ext, "image_pixel_size": 2 * ext / size,
        "image_axes": f"data[jet, channel, eta_bin, phi_bin]; bins of d_eta and d_phi (wrapped) relative to the "
                      f"jet axis over [-{ext}, {ext}), eta increasing with the row index",
        "image_content": "all visible final-state particles in the window, not only jet constituents",
        "channels": json.dumps(CHANNELS), "track_pt_min_gev": cfg.track_pt_min,
        "em_resolution": list(cfg.em_resolution), "had_resolution": list(cfg.had_resolution),
        "resolution_model": "per pixel: E -> max(0, E + N(0, sigma)), sigma/E = a/sqrt(E/GeV) (+) b; "
                            "E_T scaled by the same factor; track counts not smeared",
        "labels": "1 = top (signal), 0 = QCD (background)",
        "weight": "per-class cross-section weight in pb: sigmaGen(class) / events examined (class)",
        "normweight": "weight scaled so that each class's weights sum to its number of jets",
        "features": json.dumps({"pt, eta, phi, mass": "leading-jet kinematics (GeV, pseudorapidity, rad)",
                                "tau1..3": f"N-subjettiness, beta=1, R0={cfg.jet_r}, exclusive-kT axes with "
                                           "winner-take-all recombination, distances in rapidity-phi",
                                "tau21, tau32": "tau2/tau1, tau3/tau2", "n_constituents": "jet constituents"}),
        "config": json.dumps(asdict(cfg)),
    }
    if cfg.n_constituents_max:
        attrs |= {"constituents_max": cfg.n_constituents_max, "constituents_dtype": cfg.constituent_dtype,
                  "constituents": json.dumps({**CONSTITUENTS, "count": "number of real constituents in the row "
                                                                       "(the rest is zero padding)"}),
                  "constituents_content": f"the {cfg.n_constituents_max} highest-pT constituents of the jet, "
                                          "generator-level visible final-state particles (no detector smearing, "
                                          "unlike the images), sorted by decreasing pT, zero-padded"}
    for c, name in CLASS_NAMES.items():
        attrs[f"selection_efficiency_{name}"] = per_class[c]["efficiency"]
        attrs[f"events_examined_{name}"] = per_class[c]["n_examined"]
        attrs[f"sigma_gen_pb_{name}"] = per_class[c]["sigma_pb"]
        attrs[f"sigma_gen_err_pb_{name}"] = per_class[c]["sigma_err_pb"]
    return attrs


def _write(out: Path, arrays: dict, features: dict, attrs: dict, constituents: dict | None = None) -> None:
    """Write to FILE.tmp and rename: a crash never leaves a half-written FILE."""
    import h5py

    tmp = out.with_name(out.name + ".tmp")
    try:
        with h5py.File(tmp, "w") as h5:
            data = arrays["data"]
            # 32 jets per HDF5 chunk (614 kB at 40x40, under h5py's 1 MB chunk cache) keep random reads cheap.
            h5.create_dataset("data", data=data, chunks=(max(1, min(len(data), 32)), *data.shape[1:]),
                              compression="gzip", compression_opts=6, shuffle=True)
            for key in ("label", "weight", "normweight"):
                h5.create_dataset(key, data=arrays[key])
            group = h5.create_group("features")
            for key, value in features.items():
                group.create_dataset(key, data=value.astype(np.int32 if key == "n_constituents" else np.float32))
            if constituents:
                group = h5.create_group("constituents")
                for key, value in constituents.items():  # chunks of 256 jets: cheap random batches, good gzip
                    chunks = (max(1, min(len(value), 256)), *value.shape[1:])
                    group.create_dataset(key, data=value, chunks=chunks, compression="gzip", compression_opts=9,
                                         shuffle=True)
            h5.attrs.update(attrs)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m sciml_plugins.hep.simulate", description=__doc__.split("\n")[0])
    parser.add_argument("--n-jets", type=int, required=True, metavar="N", help="accepted jets per class (top, QCD)")
    parser.add_argument("--out", required=True, metavar="FILE.h5", help="output HDF5 file (written atomically)")
    parser.add_argument("--seed", type=int, default=1, help="base seed; the output does not depend on --workers")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes (default: all CPUs)")
    parser.add_argument("--image-size", type=int, default=40, metavar="PIXELS", help="pixels per side (default 40)")
    parser.add_argument("--chunk-size", type=int, default=250, metavar="N",
                        help="accepted jets per class per work unit (default 250); changes the random streams")
    parser.add_argument("--n-constituents", type=int, default=SimConfig.n_constituents_max, metavar="N",
                        help="leading constituents stored per jet in constituents/ (default 100; 0: none)")
    parser.add_argument("--constituent-dtype", default=SimConfig.constituent_dtype, choices=("float32", "float16"),
                        help="type of the constituents' pt, deta, dphi, energy (default float32)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        return simulate(args.n_jets, args.out, seed=args.seed, workers=args.workers,
                        image_size=args.image_size, chunk_size=args.chunk_size,
                        n_constituents=args.n_constituents, constituent_dtype=args.constituent_dtype)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    except ImportError as err:
        raise SystemExit(f"error: event generation needs Pythia 8 and FastJet (pip install 'sciml[sim]'): {err}") \
            from None


if __name__ == "__main__":
    main(sys.argv[1:])
