"""The ClimateNet-like generator: CF-netCDF a reader understands, and the physics behind the labels."""
import numpy as np
import pytest
import xarray as xr
from scipy import ndimage

from sciml_plugins.climate import generate as g


def test_cli_writes_cf_netcdf(tmp_path):
    assert g.main(["--out", str(tmp_path), "--files", "2", "--steps", "3", "--nlat", "24", "--nlon", "36",
                   "--seed", "4"]) == 0
    files = sorted(tmp_path.glob("*.nc"))
    assert [f.name for f in files] == ["climatenet_like_24x36_000.nc", "climatenet_like_24x36_001.nc"]
    ds = xr.open_dataset(files[1])
    assert ds["TMQ"].dims == ("time", "lat", "lon") and ds.sizes == {"time": 3, "lat": 24, "lon": 36}
    assert ds["PSL"].attrs["units"] == "Pa" and ds["TMQ"].attrs["standard_name"].startswith("atmosphere_mass")
    assert ds["lat"].attrs["units"] == "degrees_north" and ds.attrs["Conventions"] == "CF-1.8"
    assert str(ds["time"].values[0]) == "2000-01-01 18:00:00"  # file 1 starts after file 0's three 6-h steps
    assert set(np.unique(ds["LABELS"].values)) <= {0, 1, 2}
    again = g.generate_file(tmp_path / "again.nc", 1, 3, 4, g.GeneratorConfig(nlat=24, nlon=36))
    np.testing.assert_allclose(again["PSL"].values, ds["PSL"].values, atol=2.5)  # same seed: same field (packing)


def test_tropical_cyclone_is_a_holland_vortex():
    gen = g.Generator(g.GeneratorConfig(nlat=361, nlon=720))  # 0.5 degree grid
    for hemisphere in (1, -1):
        rng = np.random.default_rng(3)
        while True:  # draw until the storm lies in the wanted hemisphere (the draw decides it)
            fields = {k: np.zeros_like(gen.lat2) for k in ("TMQ", "U850", "V850", "PSL")}
            state = rng.bit_generator.state
            mask = gen.add_tropical_cyclone(fields, rng)
            lat0 = gen.lat2.ravel()[fields["PSL"].argmin()]
            if np.sign(lat0) == hemisphere:
                break
        rng.bit_generator.state = state
        rng.choice([-1.0, 1.0]), rng.uniform(), rng.uniform()
        deficit, rmax, b = rng.uniform(1000.0, 8000.0), rng.uniform(50e3, 130e3), rng.uniform(1.0, 2.0)
        assert fields["PSL"].min() == pytest.approx(-deficit, rel=0.2)
        vmax = np.sqrt(b * deficit / (g.RHO_AIR * np.e))  # Holland's maximum gradient wind (no Coriolis term)
        speed = np.hypot(fields["U850"], fields["V850"])
        assert 0.75 * vmax < speed.max() <= 1.01 * vmax
        # cyclonic: positive relative vorticity in the north, negative in the south, around the centre
        dv = np.gradient(fields["V850"], axis=1) / gen.dx
        du = np.gradient(fields["U850"], axis=0) / gen.dy
        core = ndimage.binary_erosion(mask)
        assert np.sign((dv - du)[core].mean()) == hemisphere
        radius_km = np.sqrt(mask.sum() * (gen.dy * gen.dx[mask]).mean() / np.pi) / 1e3
        assert 100 < radius_km < 800, radius_km


def test_atmospheric_river_labels_follow_the_ivt_rule():
    config = g.GeneratorConfig(nlat=96, nlon=144, label_dilation_probability=0.0)
    gen = g.Generator(config)
    found = 0
    for seed in range(6):
        fields, labels = gen.snapshot(np.random.default_rng(seed))
        ar = labels == 2
        ivt = fields["TMQ"] * np.hypot(fields["U850"], fields["V850"])
        assert (ivt[ar] > 250).all() and (np.abs(gen.lat2[ar]) >= 20).all()
        objects, n = g.label_periodic(ar)
        for k in range(1, n + 1):
            where = objects == k
            la, lo = gen.lat2[where], gen.lon2[where]
            assert g.haversine(la[:, None], lo[:, None], la[None], lo[None]).max() > 2000e3
        found += n
    assert found >= 3


def test_objects_across_the_date_line_are_one():
    mask = np.zeros((5, 10), bool)
    mask[2, :2] = mask[2, -2:] = True
    mask[0, 5] = True
    objects, n = g.label_periodic(mask)
    assert n == 2 and objects[2, 0] == objects[2, -1] != objects[0, 5]
