"""Generate ClimateNet-like fields with tropical cyclones (TC) and atmospheric rivers (AR), written as CF-netCDF.

    python -m sciml_plugins.climate.generate --out DIR --files 6 --steps 40 --nlat 96 --nlon 144 --seed 0

Each time step is an independent global snapshot on a regular lat-lon grid (poles included, as CAM5's finite-volume
grid) with the ClimateNet input variables TMQ (precipitable water), U850, V850 (850 hPa winds) and PSL (sea-level
pressure), and `LABELS` (0 background, 1 TC, 2 AR):

1. Background: a zonal-mean climatology (moist tropics, subtropical highs and subpolar lows, trade easterlies and
   mid-latitude westerlies) plus weather noise. The wind noise is non-divergent, from a Gaussian random streamfunction
   whose kinetic-energy spectrum falls as k^-3 at synoptic scales; the PSL noise is that streamfunction in
   geostrophic balance (p' = rho f psi), so pressure and wind anomalies agree. TMQ gets log-normal noise.
2. TCs (0-5 per snapshot, 8-28 deg latitude, both hemispheres): Holland (1980) pressure profile with a 10-80 hPa
   central deficit, gradient-wind tangential winds (cyclonic in each hemisphere, 20 deg inflow) and a moist core.
   Labelled where the gradient wind reaches 34 kt (17.5 m/s) or the pressure deficit exceeds 4 hPa.
3. ARs (0-5 per snapshot): curved filaments from the subtropics poleward and eastward, 3000-7500 km long, with a
   moisture plume and a low-level jet along the axis. Labels follow the integrated-vapour-transport rule:
   IVT ~ TMQ |V850| > 250 kg m-1 s-1 outside the deep tropics, connected objects longer than 2000 km and more than
   twice as long as wide (Guan & Waliser 2015 style geometry, as the TECA heuristics behind ClimateNet-like labels).
4. Annotator disagreement: each snapshot's TC and AR masks are dilated by one pixel with probability 0.3.

Every snapshot draws from its own seed (seed, file index, step): a file is reproducible on its own.
"""
from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import xarray as xr
from scipy import ndimage

log = logging.getLogger(__name__)

EARTH_RADIUS = 6.371e6  # m
OMEGA = 7.292e-5  # s-1
RHO_AIR = 1.15  # kg m-3, near-surface air density for the gradient wind
KT34 = 17.5  # m/s, the 34-knot gale-force radius used for TC extent
CLASS_NAMES = ("background", "tropical_cyclone", "atmospheric_river")

VARIABLE_ATTRS = {
    "TMQ": {"long_name": "Total (vertically integrated) precipitable water", "units": "kg m-2",
            "standard_name": "atmosphere_mass_content_of_water_vapor"},
    "U850": {"long_name": "Zonal wind at 850 mbar pressure surface", "units": "m s-1",
             "standard_name": "eastward_wind"},
    "V850": {"long_name": "Meridional wind at 850 mbar pressure surface", "units": "m s-1",
             "standard_name": "northward_wind"},
    "PSL": {"long_name": "Sea level pressure", "units": "Pa", "standard_name": "air_pressure_at_mean_sea_level"},
}
# CF packing (int16 with scale_factor/add_offset): every netCDF reader unpacks it. Steps of 0.05 kg m-2, 0.05 m/s
# and 5 Pa are far below the weather noise and keep the embedded sample small.
PACKING = {"TMQ": (0.05, 800.0), "U850": (0.05, 0.0), "V850": (0.05, 0.0), "PSL": (5.0, 100000.0)}


@dataclass(frozen=True)
class GeneratorConfig:
    nlat: int = 96
    nlon: int = 144
    tc_max: int = 5  # TCs per snapshot: uniform 0..tc_max
    ar_max: int = 5  # ARs per snapshot: uniform 0..ar_max
    noise_wind: float = 4.0  # m/s, std of the streamfunction wind noise
    noise_tmq: float = 0.15  # std of log(TMQ) noise
    spectrum_scale_km: float = 3000.0  # wavelength below which the kinetic-energy spectrum falls as k^-3
    ivt_threshold: float = 250.0  # kg m-1 s-1
    ar_min_length_km: float = 2000.0
    ar_min_aspect: float = 2.0
    ar_lat_band: tuple[float, float] = (20.0, 80.0)
    label_dilation_probability: float = 0.3


def grid(nlat: int, nlon: int) -> tuple[np.ndarray, np.ndarray]:
    """CAM finite-volume style: latitudes from pole to pole inclusive, longitudes from 0 east."""
    return np.linspace(-90.0, 90.0, nlat), np.arange(nlon) * (360.0 / nlon)


def climatology(lat: np.ndarray) -> dict[str, np.ndarray]:
    """Zonal means (per latitude) of the four variables."""
    a = np.abs(lat)
    tmq = 4.0 + 48.0 * np.exp(-((lat / 32.0) ** 2))
    psl = (101300 - 300 * np.exp(-((lat / 10.0) ** 2)) + 900 * np.exp(-(((a - 30) / 10.0) ** 2))
           - 1900 * np.exp(-(((a - 62) / 11.0) ** 2)))
    u = -6.0 * np.exp(-((lat / 14.0) ** 2)) + 10.0 * np.exp(-(((a - 45) / 11.0) ** 2)) \
        - 3.0 * np.exp(-(((a - 75) / 7.0) ** 2))
    return {"TMQ": tmq, "U850": u, "V850": np.zeros_like(lat), "PSL": psl}


def haversine(lat1, lon1, lat2, lon2) -> np.ndarray:
    """Great-circle distance in m (degrees in, broadcasting)."""
    p1, p2 = np.radians(lat1), np.radians(lat2)
    dlat, dlon = p2 - p1, np.radians(lon2 - lon1)
    h = np.sin(dlat / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dlon / 2) ** 2
    return 2 * EARTH_RADIUS * np.arcsin(np.sqrt(np.clip(h, 0, 1)))


def local_offsets(lat, lon, lat0, lon0) -> tuple[np.ndarray, np.ndarray]:
    """East and north offsets (m) of grid points from a centre, on the tangent plane."""
    dlon = (lon - lon0 + 180.0) % 360.0 - 180.0
    return (EARTH_RADIUS * np.cos(np.radians(lat0)) * np.radians(dlon),
            EARTH_RADIUS * np.radians(lat - lat0) * np.ones_like(dlon))


class Generator:
    def __init__(self, config: GeneratorConfig = GeneratorConfig()):
        self.c = config
        self.lat, self.lon = grid(config.nlat, config.nlon)
        self.lat2, self.lon2 = np.meshgrid(self.lat, self.lon, indexing="ij")
        self.coriolis = 2 * OMEGA * np.sin(np.radians(self.lat2))
        self.dy = EARTH_RADIUS * np.radians(self.lat[1] - self.lat[0])
        self.dx = EARTH_RADIUS * np.radians(self.lon[1] - self.lon[0]) * np.maximum(np.cos(np.radians(self.lat2)),
                                                                                    np.cos(np.radians(60.0)))
        # streamfunction power spectrum: E(k) = k^3 |psi_k|^2 ~ k^-3 above k0, so |psi_k|^2 ~ (k^2 + k0^2)^-3;
        # generated on twice the latitudes (periodic FFT), of which the first half is kept, so lat is not periodic
        ky = np.fft.fftfreq(2 * config.nlat, d=self.dy / 1e3)[:, None]
        kx = np.fft.rfftfreq(config.nlon, d=EARTH_RADIUS * np.radians(360.0 / config.nlon) * np.cos(np.radians(45))
                             / 1e3)[None, :]
        k0 = 1.0 / config.spectrum_scale_km
        self.psi_amplitude = (kx**2 + ky**2 + k0**2) ** -1.5
        self.tmq_amplitude = (kx**2 + ky**2 + k0**2) ** -1.0
        self.tmq_amplitude[0, 0] = self.psi_amplitude[0, 0] = 0.0

    def _random_field(self, rng: np.random.Generator, amplitude: np.ndarray) -> np.ndarray:
        noise = rng.normal(size=amplitude.shape) + 1j * rng.normal(size=amplitude.shape)
        field = np.fft.irfft2(noise * amplitude, s=(2 * self.c.nlat, self.c.nlon))[: self.c.nlat]
        return field / field.std()

    def background(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        clim = climatology(self.lat)
        psi = self._random_field(rng, self.psi_amplitude)
        u = -np.gradient(psi, self.dy, axis=0)
        v = (np.roll(psi, -1, axis=1) - np.roll(psi, 1, axis=1)) / (2 * self.dx)  # periodic in longitude
        scale = self.c.noise_wind / np.sqrt(0.5 * (u.var() + v.var()))
        u, v, psi = u * scale, v * scale, psi * scale
        tmq_noise = self._random_field(rng, self.tmq_amplitude)
        return {"TMQ": clim["TMQ"][:, None] * np.exp(self.c.noise_tmq * tmq_noise - self.c.noise_tmq**2 / 2),
                "U850": clim["U850"][:, None] + u, "V850": v,
                "PSL": clim["PSL"][:, None] + RHO_AIR * self.coriolis * psi}

    def add_tropical_cyclone(self, fields, rng) -> np.ndarray:
        """Adds one TC to `fields` in place and returns its mask."""
        hemisphere = rng.choice([-1.0, 1.0])
        lat0, lon0 = hemisphere * rng.uniform(8.0, 28.0), rng.uniform(0.0, 360.0)
        deficit = rng.uniform(1000.0, 8000.0)  # Pa
        rmax = rng.uniform(50e3, 130e3)  # m; resolved model storms are larger than observed ones
        b = rng.uniform(1.0, 2.0)  # Holland B
        r = np.maximum(haversine(self.lat2, self.lon2, lat0, lon0), 1.0)
        shape = (rmax / r) ** b
        f0 = abs(2 * OMEGA * np.sin(np.radians(lat0)))
        speed = np.sqrt(b / RHO_AIR * shape * deficit * np.exp(-shape) + (r * f0 / 2) ** 2) - r * f0 / 2
        dx, dy = local_offsets(self.lat2, self.lon2, lat0, lon0)
        norm = np.maximum(np.hypot(dx, dy), 1.0)
        inflow = np.radians(20.0)
        tangent_x, tangent_y = -hemisphere * dy / norm, hemisphere * dx / norm  # cyclonic: anticlockwise in the NH
        radial_x, radial_y = dx / norm, dy / norm
        fields["U850"] += speed * (np.cos(inflow) * tangent_x - np.sin(inflow) * radial_x)
        fields["V850"] += speed * (np.cos(inflow) * tangent_y - np.sin(inflow) * radial_y)
        anomaly = -deficit * (1 - np.exp(-shape))
        fields["PSL"] += anomaly
        fields["TMQ"] += rng.uniform(10.0, 20.0) * np.exp(-((r / 350e3) ** 2))
        return (speed >= KT34) | (anomaly < -400.0)

    def add_atmospheric_river(self, fields, rng) -> None:
        """Adds one moisture filament with its low-level jet (labels come from the IVT rule afterwards)."""
        hemisphere = rng.choice([-1.0, 1.0])
        length = rng.uniform(3000e3, 7500e3)
        width = rng.uniform(300e3, 600e3)  # Gaussian e-folding half-width
        heading = np.radians(rng.uniform(20.0, 60.0))  # from east, poleward
        turn = np.radians(rng.uniform(-25.0, 25.0))
        step = 50e3
        n = int(length / step) + 1
        s = np.linspace(0, 1, n)
        lat, lon = [hemisphere * rng.uniform(18.0, 32.0)], [rng.uniform(0.0, 360.0)]
        angles = heading + turn * s
        for a in angles[1:]:  # trace the axis on the sphere
            lat.append(lat[-1] + hemisphere * np.degrees(step * np.sin(a) / EARTH_RADIUS))
            lon.append(lon[-1] + np.degrees(step * np.cos(a) / (EARTH_RADIUS * np.cos(np.radians(lat[-2])))))
        lat, lon = np.clip(np.array(lat), -85, 85), np.array(lon) % 360.0
        d = haversine(self.lat2[..., None], self.lon2[..., None], lat, lon)  # (nlat, nlon, n)
        nearest = d.argmin(-1)
        dist = np.take_along_axis(d, nearest[..., None], -1)[..., 0]
        taper = np.sin(np.pi * np.clip(s[nearest], 0.02, 0.98)) ** 0.5
        profile = np.exp(-((dist / width) ** 2)) * taper
        fields["TMQ"] += rng.uniform(15.0, 30.0) * profile
        jet = rng.uniform(12.0, 25.0) * profile
        a = angles[nearest]
        fields["U850"] += jet * np.cos(a)
        fields["V850"] += jet * np.sin(a) * hemisphere

    def ar_mask(self, fields, tc: np.ndarray) -> np.ndarray:
        """IVT objects that pass the length and aspect-ratio tests, outside the tropics and the TCs."""
        ivt = fields["TMQ"] * np.hypot(fields["U850"], fields["V850"])
        lo, hi = self.c.ar_lat_band
        band = (np.abs(self.lat2) >= lo) & (np.abs(self.lat2) <= hi)
        candidate = (ivt > self.c.ivt_threshold) & band & ~tc
        objects, count = label_periodic(candidate)
        mask = np.zeros_like(candidate)
        area = EARTH_RADIUS**2 * np.radians(self.lat[1] - self.lat[0]) * np.radians(self.lon[1] - self.lon[0]) \
            * np.cos(np.radians(self.lat2))
        for k in range(1, count + 1):
            where = objects == k
            if where.sum() < 3:
                continue
            la, lo_ = self.lat2[where], self.lon2[where]
            length = haversine(la[:, None], lo_[:, None], la[None], lo_[None]).max()
            width = area[where].sum() / max(length, 1.0)
            if length > self.c.ar_min_length_km * 1e3 and length / width > self.c.ar_min_aspect:
                mask |= where
        return mask

    def snapshot(self, rng: np.random.Generator) -> tuple[dict[str, np.ndarray], np.ndarray]:
        fields = self.background(rng)
        tc = np.zeros(fields["TMQ"].shape, dtype=bool)
        for _ in range(rng.integers(0, self.c.tc_max + 1)):
            tc |= self.add_tropical_cyclone(fields, rng)
        for _ in range(rng.integers(0, self.c.ar_max + 1)):
            self.add_atmospheric_river(fields, rng)
        ar = self.ar_mask(fields, tc)
        if rng.random() < self.c.label_dilation_probability:
            tc, ar = ndimage.binary_dilation(tc), ndimage.binary_dilation(ar)
        labels = np.where(tc, 1, np.where(ar, 2, 0)).astype(np.uint8)
        return fields, labels


def label_periodic(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components (8-connected) with longitude wrapping: objects across the date line are one."""
    objects, count = ndimage.label(mask, structure=np.ones((3, 3)))
    parent = np.arange(count + 1)

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    west, east = objects[:, 0], objects[:, -1]
    for shift in (-1, 0, 1):  # diagonal neighbours across the seam too
        e = np.roll(east, shift)
        for a, b in zip(west[(west > 0) & (e > 0)], e[(west > 0) & (e > 0)]):
            parent[find(a)] = find(b)
    roots = np.array([find(i) for i in range(count + 1)])
    unique, relabel = np.unique(roots, return_inverse=True)
    return relabel[objects], len(unique) - 1


def to_dataset(fields: dict[str, np.ndarray], labels: np.ndarray, lat, lon, hours, config: GeneratorConfig,
               seed: int) -> xr.Dataset:
    coords = {
        "time": ("time", np.asarray(hours, dtype=np.float64),
                 {"units": "hours since 2000-01-01 00:00:00", "calendar": "noleap", "standard_name": "time",
                  "axis": "T"}),
        "lat": ("lat", lat, {"units": "degrees_north", "standard_name": "latitude", "long_name": "latitude",
                             "axis": "Y"}),
        "lon": ("lon", lon, {"units": "degrees_east", "standard_name": "longitude", "long_name": "longitude",
                             "axis": "X"}),
    }
    data = {name: (("time", "lat", "lon"), values.astype(np.float32), VARIABLE_ATTRS[name])
            for name, values in fields.items()}
    data["LABELS"] = (("time", "lat", "lon"), labels, {
        "long_name": "Extreme weather event class", "flag_values": np.array([0, 1, 2], dtype=np.uint8),
        "flag_meanings": " ".join(CLASS_NAMES)})
    ds = xr.Dataset(data, coords=coords)
    ds = xr.decode_cf(ds)
    ds.attrs = {
        "Conventions": "CF-1.8",
        "title": "Synthetic ClimateNet-like fields with tropical cyclones and atmospheric rivers",
        "source": "sciml_plugins.climate.generate (simulated, not model output)",
        "references": "Holland 1980 (MWR 108:1212); Guan & Waliser 2015 (JGR 120:12514); "
                      "Kashinath et al. 2021 (GMD 14:107)",
        "generator_seed": seed,
        "generator_config": repr(asdict(config)),
    }
    return ds


def encoding(ds: xr.Dataset) -> dict:
    enc = {name: {"dtype": "int16", "scale_factor": scale, "add_offset": offset, "_FillValue": np.int16(-32768),
                  "zlib": True, "complevel": 6, "shuffle": True, "chunksizes": (1, ds.sizes["lat"], ds.sizes["lon"])}
           for name, (scale, offset) in PACKING.items() if name in ds}
    enc["LABELS"] = {"dtype": "uint8", "zlib": True, "complevel": 6,
                     "chunksizes": (1, ds.sizes["lat"], ds.sizes["lon"])}
    enc["time"] = {"units": "hours since 2000-01-01 00:00:00", "calendar": "noleap", "dtype": "float64"}
    return enc


def generate_file(path: Path, file_index: int, steps: int, seed: int, config: GeneratorConfig,
                  hours_per_step: float = 6.0) -> xr.Dataset:
    gen = Generator(config)
    fields = {k: np.empty((steps, config.nlat, config.nlon), np.float32) for k in VARIABLE_ATTRS}
    labels = np.empty((steps, config.nlat, config.nlon), np.uint8)
    for t in range(steps):  # one seed per snapshot
        rng = np.random.default_rng([seed, file_index, t])
        snap, labels[t] = gen.snapshot(rng)
        for k in fields:
            fields[k][t] = snap[k]
    hours = (file_index * steps + np.arange(steps)) * hours_per_step
    ds = to_dataset(fields, labels, gen.lat, gen.lon, hours, config, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".nc.tmp")
    ds.to_netcdf(tmp, engine="netcdf4", format="NETCDF4", encoding=encoding(ds))
    tmp.replace(path)
    return ds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="output folder (one netCDF file per --files)")
    parser.add_argument("--files", type=int, default=6)
    parser.add_argument("--steps", type=int, default=40, help="time steps (snapshots) per file")
    parser.add_argument("--nlat", type=int, default=96)
    parser.add_argument("--nlon", type=int, default=144)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prefix", default="climatenet_like")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if min(args.files, args.steps) < 1 or args.nlat < 8 or args.nlon < 8:
        parser.error("--files and --steps must be >= 1, --nlat and --nlon >= 8")
    config = GeneratorConfig(nlat=args.nlat, nlon=args.nlon)
    counts = np.zeros(3)
    for i in range(args.files):
        path = args.out / f"{args.prefix}_{args.nlat}x{args.nlon}_{i:03d}.nc"
        ds = generate_file(path, i, args.steps, args.seed, config)
        counts += np.bincount(ds["LABELS"].values.ravel(), minlength=3)
        log.info("wrote %s (%d steps, %.1f MB)", path, args.steps, path.stat().st_size / 1e6)
    fractions = counts / counts.sum()
    log.info("pixel fractions: background %.4f, TC %.4f, AR %.4f", *fractions)
    return 0


if __name__ == "__main__":
    sys.exit(main())
