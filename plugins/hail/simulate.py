"""Simulated storm-centred patches calibrated on the real storm-object table (CAPS SSEF 2015, hagelslag).

The real 32x32 patches of Gagne et al. (2019) cannot be shipped, so patches are built from the real storms:

1. Environment and storm attributes: rows of the real table, resampled within each run day (so a day's patches
   carry that day's weather) and jittered by 10 % of each column's spread.
2. A convective cell: an elliptical reflectivity core of 10-25 km radius stretched along the 0-6 km shear, peak from
   the storm's `r10cmx_max`, size from its updraft; a hook appendage on the right-rear flank when `uh_max` is high;
   a cyclonic Rankine rotation couplet in the 500 hPa and (weaker) 10 m winds with speed ~ sqrt(UH) x m, where the
   mesocyclone strength m (lognormal, sigma 0.5) is drawn per storm and not in the table; the
   environmental wind with the real 0-6 km shear between 10 m and 500 hPa.
3. A cold pool of 2-8 K under and downshear of the core, scaled by the downdraft `wdnmax`, with divergent outflow,
   drying and stabilised (lower) CAPE.
4. Spatially correlated noise: Gaussian random fields with a k^-5/3 spectrum on every field.
5. The target: a hail-growth proxy from the updraft of parcel theory w = sqrt(2 CAPE), the depth of the hail-growth
   zone (-10 to -30 C) and the freezing level (melting) from the 700-500 hPa lapse rate, the updraft helicity and
   the peak reflectivity, plus noise; its rotation term is log(1 + UH/50) + 1.5 log m, so part of the hail signal
   lives only in the couplet and hook (zero or tiny patch means), where a CNN can see it and storm means cannot; mapped by quantiles onto the real `Hail_Size` distribution, and written as a
   1-h future maximum hail size field `HAIL_MAXK1_future` (metres, as WRF writes it) in the storm's footprint.

Files follow the layout of the NCAR storm-patch files: one netCDF per run day, dimensions `p` (patch), `row`,
`col`; fields `<NAME>_curr` (inputs) and `HAIL_MAXK1_future` (target), per-patch `track_id`, `run_date`,
`forecast_hour`, `centroid_lon`, `centroid_lat`. Fields are packed as int16 (CF scale_factor/add_offset) with zlib.

    python -m sciml_plugins.hail.simulate --out DIR [--patches-per-storm 2] [--seed 0] [--severe-fraction F]
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from sciml_plugins.hail.storms import TARGET, read_storms, resolve_csvs

log = logging.getLogger(__name__)
SIZE = 32
DX_KM = 3.0
MAX_SIZE_MM = 150.0  # real MESH sizes above this are artefacts (the table reaches 680 mm)
# name: (units, long name, packing step): the step is a quarter of each field's noise level, so packing adds
# noise of 7 % of it (step / sqrt(12)) and the files stay small.
FIELDS = {
    "REFL_COM_curr": ("dBZ", "composite reflectivity", 0.5),
    "T2_curr": ("K", "2 m temperature", 0.1),
    "TD2_curr": ("K", "2 m dew point temperature", 0.1),
    "U10_curr": ("m s-1", "10 m eastward wind", 0.25),
    "V10_curr": ("m s-1", "10 m northward wind", 0.25),
    "U500_curr": ("m s-1", "500 hPa eastward wind", 0.25),
    "V500_curr": ("m s-1", "500 hPa northward wind", 0.25),
    "T500_curr": ("K", "500 hPa temperature", 0.075),
    "T700_curr": ("K", "700 hPa temperature", 0.075),
    "MLCAPE_curr": ("J kg-1", "mixed-layer CAPE", 10.0),
}
TARGET_FIELD = "HAIL_MAXK1_future"
# Columns of the real table the generator draws (environment and storm attributes).
DRAWN = ["mlcape_mean", "shr06_mean", "srh03_mean", "tmp500_mean", "tmp700_mean", "dewp2m_mean", "temp2m_mean",
         "uh_max_max", "r10cmx_max", "wupmax_max", "wdnmax_max"]


def correlated_noise(rng: np.random.Generator, shape: tuple[int, ...], slope: float = 5 / 3) -> np.ndarray:
    """Gaussian random fields on the last two axes with an isotropic k^-slope energy spectrum, unit variance each."""
    ky = np.fft.fftfreq(shape[-2])[:, None]
    kx = np.fft.rfftfreq(shape[-1])[None, :]
    k = np.hypot(ky, kx)
    k[0, 0] = np.inf  # no mean
    # 1-D energy spectrum E(k) ~ k^-slope means 2-D power ~ k^-(slope+1): amplitude is its square root.
    amplitude = k ** (-(slope + 1) / 2)
    white = np.fft.rfft2(rng.standard_normal(shape).astype(np.float32))
    field = np.fft.irfft2(white * amplitude, s=shape[-2:]).astype(np.float32)
    return field / field.std(axis=(-2, -1), keepdims=True)


def draw_storms(table: pd.DataFrame, patches_per_storm: float, rng: np.random.Generator) -> pd.DataFrame:
    """Resample the real rows within each run day and jitter every drawn column by 10 % of its spread."""
    parts = []
    for _, day in table.groupby("run_day", sort=True):
        n = max(1, int(round(len(day) * patches_per_storm)))
        parts.append(day.iloc[rng.integers(0, len(day), n)])
    storms = pd.concat(parts, ignore_index=True)
    spread = table[DRAWN].std()
    for column in DRAWN:
        storms[column] = storms[column] + rng.normal(0, 0.1 * spread[column], len(storms))
    storms["mlcape_mean"] = storms["mlcape_mean"].clip(lower=50)
    storms["uh_max_max"] = storms["uh_max_max"].clip(lower=0)
    storms["r10cmx_max"] = storms["r10cmx_max"].clip(35, 78)
    storms["wupmax_max"] = storms["wupmax_max"].clip(lower=2)
    storms["wdnmax_max"] = storms["wdnmax_max"].clip(upper=0)
    storms["shr06_mean"] = storms["shr06_mean"].clip(lower=0)
    # Mesocyclone strength relative to what the storm's UH suggests (the table's hourly UH maximum misses how
    # organised the rotation is): seen only in the patch's rotation couplet and hook echo, never in a field mean.
    return storms.copy().assign(meso_strength=rng.lognormal(0.0, 0.5, len(storms)))  # copy: defragmented


def hail_proxy(storms: pd.DataFrame, rng: np.random.Generator, noise: float = 0.8) -> np.ndarray:
    """Physically motivated hail-growth index (larger = larger hail), standardised terms plus noise.

    Growth: parcel-theory updraft w = sqrt(2 CAPE) (log), rotation (log UH: rotating updrafts are wider and
    steadier), depth of the -10 to -30 C hail-growth zone (log), reflectivity (hail is the strongest scatterer).
    Loss: height of the freezing level, where hailstones start melting on the way down.
    """
    w = np.sqrt(2 * storms["mlcape_mean"].to_numpy())
    t500, t700 = storms["tmp500_mean"].to_numpy(), storms["tmp700_mean"].to_numpy()
    gamma = np.clip((t700 - t500) / 2.6, 4.0, 10.0)  # K/km between ~3.0 km (700 hPa) and ~5.6 km (500 hPa)
    growth_depth = 20.0 / gamma  # km between -10 and -30 C
    freezing_level = 3.0 + np.clip(t700, -5, None) / gamma  # km above sea level

    def z(v):
        return (v - v.mean()) / v.std()

    rotation = np.log1p(storms["uh_max_max"].to_numpy() / 50) + 1.5 * np.log(storms["meso_strength"].to_numpy())
    index = (0.5 * z(np.log(w)) + 1.5 * z(rotation)
             + 0.3 * z(np.log(growth_depth)) - 0.3 * z(freezing_level) + 0.4 * z(storms["r10cmx_max"].to_numpy()))
    return index + rng.normal(0, noise, len(index))


def map_to_sizes(index: np.ndarray, real_sizes: np.ndarray, severe_fraction: float | None) -> np.ndarray:
    """Hail sizes (mm) with the real distribution, in the order of `index` (quantile mapping).

    `severe_fraction` (optional) moves the share of sizes >= 25 mm while keeping the real distributions below and
    above 25 mm."""
    u = (np.argsort(np.argsort(index)) + 0.5) / len(index)
    below = float(np.mean(real_sizes < 25.0))
    if severe_fraction is not None:
        f = severe_fraction
        u = np.where(u < 1 - f, u * below / (1 - f), below + (u - (1 - f)) * (1 - below) / f)
    return np.quantile(np.sort(real_sizes), np.clip(u, 0, 1), method="linear")


def render(storms: pd.DataFrame, sizes_mm: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """All fields of all patches at once (no loop over patches): arrays (p, row, col), float32."""
    n = len(storms)
    c = (np.arange(SIZE) - (SIZE - 1) / 2) * DX_KM
    y, x = np.meshgrid(c, c, indexing="ij")
    x, y = x[None], y[None]

    def col(name):
        return storms[name].to_numpy(np.float32)[:, None, None]

    # Shear vector (0-6 km bulk shear, m/s) mostly westerly, as on the Plains in late spring.
    shear_dir = rng.normal(0.2, 0.45, n).astype(np.float32)[:, None, None]
    shear = col("shr06_mean") * 6000.0
    su, sv = shear * np.cos(shear_dir), shear * np.sin(shear_dir)
    u0 = rng.normal(2.0, 3.0, n).astype(np.float32)[:, None, None]
    v0 = rng.normal(6.0, 3.0, n).astype(np.float32)[:, None, None]

    # Core coordinates along (a) and across (b) the shear.
    a = x * np.cos(shear_dir) + y * np.sin(shear_dir)
    b = -x * np.sin(shear_dir) + y * np.cos(shear_dir)
    radius = 10.0 + 15.0 * np.clip((col("wupmax_max") - 10.0) / 30.0, 0, 1)  # km
    sigma_a = radius / 2 * (1 + 0.4 * np.clip(shear / 30.0, 0, 1))
    sigma_b = radius / 2
    peak = col("r10cmx_max")
    core_q = (a / sigma_a) ** 2 + (b / sigma_b) ** 2
    core = np.exp(-core_q / 2)
    refl = peak - 4.343 * core_q  # a Gaussian in Z is a parabola in dBZ

    # Supercells: hook echo on the right-rear flank and a mesocyclone between it and the core.
    meso = col("meso_strength")
    supercell = np.clip((col("uh_max_max") * meso - 40.0) / 150.0, 0, 1)
    hook_a, hook_b = -1.1 * sigma_a, -1.1 * sigma_b  # rear (upshear), right of the motion
    hook_q = ((a - hook_a) / (0.45 * sigma_b)) ** 2 + ((b - hook_b) / (0.3 * sigma_b)) ** 2
    refl = np.maximum(refl, peak - 6.0 - 4.343 * hook_q - 40.0 * (1 - supercell))
    meso_a, meso_b = 0.6 * hook_a, 0.6 * hook_b
    mx = meso_a * np.cos(shear_dir) - meso_b * np.sin(shear_dir)
    my = meso_a * np.sin(shear_dir) + meso_b * np.cos(shear_dir)
    dx, dy = x - mx, y - my
    r = np.hypot(dx, dy) + 1e-3
    rmax = 5.0
    vt = np.where(r < rmax, r / rmax, rmax / r) * np.sqrt(col("uh_max_max")) * meso  # Rankine vortex, m/s
    rot_u, rot_v = -vt * dy / r, vt * dx / r  # cyclonic

    # Cold pool under and just downshear of the core, with radial outflow.
    strength = np.clip(-col("wdnmax_max") / 6.0, 0, 1)
    dT = 2.0 + 6.0 * strength
    cx, cy = 0.5 * sigma_a * np.cos(shear_dir), 0.5 * sigma_a * np.sin(shear_dir)
    ox, oy = x - cx, y - cy
    sigma_cp = 1.3 * radius
    pool = np.exp(-(ox**2 + oy**2) / (2 * sigma_cp**2))
    ro = np.hypot(ox, oy) + 1e-3
    outflow = 1.2 * dT * (ro / sigma_cp) * pool  # m/s, radial

    def noise(scale):
        return scale * correlated_noise(rng, (n, SIZE, SIZE))

    fields = {}
    fields["REFL_COM_curr"] = np.clip(refl + noise(2.0), 0, 80)
    fields["T2_curr"] = (col("temp2m_mean") - 32) * 5 / 9 + 273.15 - dT * pool + noise(0.4)
    td = (col("dewp2m_mean") - 32) * 5 / 9 + 273.15 - 0.3 * dT * pool + noise(0.4)
    fields["TD2_curr"] = np.minimum(td, fields["T2_curr"])
    fields["U10_curr"] = u0 + 0.4 * rot_u + outflow * ox / ro + noise(1.0)
    fields["V10_curr"] = v0 + 0.4 * rot_v + outflow * oy / ro + noise(1.0)
    fields["U500_curr"] = u0 + su + rot_u + noise(1.5)
    fields["V500_curr"] = v0 + sv + rot_v + noise(1.5)
    updraft_warmth = np.clip(col("wupmax_max") / 30.0, 0, 1.5) * core
    fields["T500_curr"] = col("tmp500_mean") + 273.15 + updraft_warmth + noise(0.3)
    fields["T700_curr"] = col("tmp700_mean") + 273.15 + 0.5 * updraft_warmth + noise(0.3)
    fields["MLCAPE_curr"] = np.clip(col("mlcape_mean") * (1 - 0.7 * pool) * (1 + noise(0.08)), 0, None)

    # Target: the future (1 h) maximum hail size at the lowest level: the storm moved with the mean wind, and the
    # swath peaks at a grid point so that the patch maximum is exactly the storm's size.
    move_u = (u0 + 0.5 * su) * 3.6  # km per hour
    move_v = (v0 + 0.5 * sv) * 3.6
    ci = np.clip(np.rint((move_v[:, 0, 0] + c[-1]) / DX_KM), 4, SIZE - 5).astype(int)
    cj = np.clip(np.rint((move_u[:, 0, 0] + c[-1]) / DX_KM), 4, SIZE - 5).astype(int)
    hy, hx = y - c[ci][:, None, None], x - c[cj][:, None, None]
    swath = np.exp(-(hx**2 + hy**2) / (2 * (0.35 * radius) ** 2))
    hail = sizes_mm[:, None, None] / 1000.0 * swath
    fields[TARGET_FIELD] = np.where(swath > 0.1, hail, 0.0)
    return {k: v.astype(np.float32) for k, v in fields.items()}


def to_dataset(storms: pd.DataFrame, fields: dict[str, np.ndarray], attrs: dict) -> xr.Dataset:
    data = {name: (("p", "row", "col"), values) for name, values in fields.items()}
    ds = xr.Dataset(data, coords={"row": np.arange(SIZE), "col": np.arange(SIZE)})
    for name, (units, long_name, _) in FIELDS.items():
        ds[name].attrs = {"units": units, "long_name": long_name}
    ds[TARGET_FIELD].attrs = {"units": "m", "long_name": "1 h maximum hail diameter at the lowest model level, "
                                                         "one hour after the input fields"}
    ds["track_id"] = ("p", storms["Track_ID"].astype(str).to_numpy())
    ds["run_date"] = ("p", storms["run_day"].to_numpy(dtype="datetime64[ns]"))
    ds["forecast_hour"] = ("p", storms["Forecast_Hour"].to_numpy(np.int32))
    ds["centroid_lon"] = ("p", storms["Centroid_Lon"].to_numpy(np.float32), {"units": "degrees_east"})
    ds["centroid_lat"] = ("p", storms["Centroid_Lat"].to_numpy(np.float32), {"units": "degrees_north"})
    ds["row"].attrs = {"long_name": "grid row (south to north)", "grid_spacing_km": DX_KM}
    ds["col"].attrs = {"long_name": "grid column (west to east)", "grid_spacing_km": DX_KM}
    ds.attrs = attrs
    return ds


def encoding(ds: xr.Dataset) -> dict:
    """int16 packing (CF scale_factor/add_offset) with zlib, fill value marking missing data."""
    enc = {}
    steps = {**{k: v[2] for k, v in FIELDS.items()}, TARGET_FIELD: 1e-4}
    for name, step in steps.items():
        lo = float(ds[name].min())
        enc[name] = {"dtype": "int16", "scale_factor": step, "add_offset": lo + 32000 * step,
                     "_FillValue": np.int16(-32768), "zlib": True, "complevel": 6, "shuffle": True,
                     "chunksizes": (min(64, ds.sizes["p"]), SIZE, SIZE)}
        if float(ds[name].max()) > lo + 64000 * step:
            raise ValueError(f"{name}: range too wide for int16 packing at step {step}")
    return enc


def simulate(out: Path, storm_path: str | None = None, patches_per_storm: float = 2.0, seed: int = 0,
             severe_fraction: float | None = None) -> list[Path]:
    """Write one `hail_patches_<YYYYMMDD>.nc` per run day of the storm table into `out`; returns the files."""
    rng = np.random.default_rng(seed)
    table = read_storms(resolve_csvs(storm_path, "--storms"), DRAWN + ["Forecast_Hour", "Centroid_Lon",
                                                                        "Centroid_Lat"], MAX_SIZE_MM)
    # A few real rows carry a -9209 C 700 hPa temperature (the level is below ground over high terrain).
    physical = table["tmp700_mean"] > -60
    if (~physical).any():
        log.info("left out %d storm rows with a missing 700 hPa temperature", int((~physical).sum()))
        table = table[physical]
    storms = draw_storms(table, patches_per_storm, rng)
    sizes = map_to_sizes(hail_proxy(storms, rng), table[TARGET].to_numpy(), severe_fraction)
    fields = render(storms, sizes, rng)
    attrs = {"title": "Simulated storm-centred patches calibrated on CAPS SSEF 2015 storm objects (hagelslag)",
             "source": "sciml_plugins.hail.simulate", "seed": seed, "patches_per_storm": patches_per_storm,
             "severe_fraction": "real" if severe_fraction is None else severe_fraction,
             "grid_spacing_km": DX_KM, "Conventions": "CF-1.8"}
    out.mkdir(parents=True, exist_ok=True)
    files = []
    days = storms["run_day"].to_numpy()
    for day in np.unique(days):
        keep = days == day
        ds = to_dataset(storms[keep].reset_index(drop=True), {k: v[keep] for k, v in fields.items()}, attrs)
        path = out / f"hail_patches_{pd.Timestamp(day):%Y%m%d}.nc"
        tmp = path.with_suffix(".nc.tmp")
        ds.to_netcdf(tmp, encoding=encoding(ds), format="NETCDF4")
        tmp.replace(path)
        files.append(path)
    log.info("wrote %d patches in %d daily files to %s; severe (>= 25 mm) fraction %.3f", len(storms), len(files),
             out, float(np.mean(sizes >= 25)))
    return files


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the daily netCDF files")
    parser.add_argument("--storms", default=None, help="storm-object CSV file/folder (default: the embedded table)")
    parser.add_argument("--patches-per-storm", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--severe-fraction", type=float, default=None,
                        help="share of patches with hail >= 25 mm (default: the real share, about 0.7)")
    args = parser.parse_args(argv)
    if args.severe_fraction is not None and not 0 < args.severe_fraction < 1:
        parser.error("--severe-fraction must be in (0, 1)")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    simulate(args.out, args.storms, args.patches_per_storm, args.seed, args.severe_fraction)


if __name__ == "__main__":
    main()
