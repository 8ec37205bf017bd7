"""What climate scientists open after a run: predictions as CF-netCDF on the input's own coordinates, and maps of
truth vs prediction on lat/lon axes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

from sciml_plugins.climate.data import NetCDFFields

FLAG_MEANINGS = {"background": "background", "tc": "tropical_cyclone", "ar": "atmospheric_river"}


def _coordinate(source: NetCDFFields, name: str, values: np.ndarray) -> xr.DataArray:
    attrs = dict(source.datasets[0][name].attrs)
    if source.downsample > 1:
        attrs["comment"] = f"block mean of {source.downsample} input grid points"
    return xr.DataArray(values, dims=(name,), attrs=attrs)


def write_netcdf(source: NetCDFFields, predictions: dict[str, np.ndarray], class_names: list[str],
                 directory: Path) -> list[Path]:
    """One `<input stem>_pred.nc` per input file holding predicted time steps: `LABELS_PRED` (time, lat, lon),
    `PROB_<CLASS>` per foreground class, and the input's `LABELS` when it has them. `predictions` are sorted by
    `index` (rows of `source`)."""
    file_id, local = source.locate(predictions["index"])
    truth = source.read(predictions["index"]).get("y") if source.has_labels else None
    meanings = " ".join(FLAG_MEANINGS.get(n, n) for n in class_names)
    flags = np.arange(len(class_names), dtype=np.uint8)
    written, used = [], set()
    for f in np.unique(file_id):
        rows = file_id == f
        path = source.files[f]
        time = source.datasets[f]["time"]
        data = {"LABELS_PRED": (("time", "lat", "lon"), predictions["label"][rows].astype(np.uint8),
                                {"long_name": "predicted extreme weather event class", "flag_values": flags,
                                 "flag_meanings": meanings})}
        if "probability" in predictions:
            for k, name in enumerate(class_names[1:], start=1):
                data[f"PROB_{name.upper()}"] = (
                    ("time", "lat", "lon"), predictions["probability"][rows, k].astype(np.float32),
                    {"long_name": f"predicted probability of class {FLAG_MEANINGS.get(name, name)}", "units": "1",
                     "valid_min": np.float32(0), "valid_max": np.float32(1)})
        if truth is not None:
            data["LABELS"] = (("time", "lat", "lon"), truth[rows].astype(np.uint8),
                              {"long_name": "extreme weather event class (input labels)", "flag_values": flags,
                               "flag_meanings": meanings})
        coords = {"time": xr.DataArray(time.values[local[rows]], dims=("time",), attrs=dict(time.attrs)),
                  "lat": _coordinate(source, "lat", source.lat), "lon": _coordinate(source, "lon", source.lon)}
        ds = xr.Dataset(data, coords=coords, attrs={
            "Conventions": "CF-1.8", "title": "Tropical cyclone and atmospheric river segmentation",
            "source": "sciml climate plugin (ClimateUNet)", "input_file": str(path),
            "history": f"predicted from {path.name}"})
        stem = path.stem if path.stem not in used else f"{path.stem}_{f}"
        used.add(stem)
        target = directory / f"{stem}_pred.nc"
        tmp = target.with_suffix(".nc.tmp")
        encoding = {v: {"zlib": True, "complevel": 4} for v in data}
        ds.to_netcdf(tmp, engine="netcdf4", format="NETCDF4", encoding=encoding)
        tmp.replace(target)
        written.append(target)
    return written


def _time_label(source: NetCDFFields, file_id: int, t: int) -> str:
    time = source.datasets[file_id]["time"]
    value = time.values[t]
    try:
        import cftime

        when = cftime.num2date(value, time.attrs["units"], time.attrs.get("calendar", "standard"))
        return when.strftime("%Y-%m-%d %H:%M")
    except Exception:  # undecodable or missing units: show the raw value
        return f"time {value}"


def write_maps(source: NetCDFFields, predictions: dict[str, np.ndarray], class_names: list[str], directory: Path,
               count: int) -> list[Path]:
    """`count` PNG maps, the time steps with the most event pixels first: the first input variable (TMQ) in grey,
    events in colour, truth (when known) beside prediction, on longitude/latitude axes."""
    if count <= 0:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    directory.mkdir(parents=True, exist_ok=True)
    index = predictions["index"]
    batch = source.read(index)
    reference = batch.get("y", predictions["label"])
    chosen = np.argsort(-(reference > 0).sum(axis=(1, 2)), kind="stable")[:count]
    colors = ["#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd"][: len(class_names) - 1]
    cmap = ListedColormap(colors)
    lon = np.rad2deg(np.unwrap(np.deg2rad(source.lon)))  # monotonic across the date line
    lat = source.lat
    file_id, local = source.locate(index)
    var = source.variables[0]
    units = source.datasets[0][var].attrs.get("units", "")
    panels = [("truth", batch["y"])] if "y" in batch else []
    panels.append(("prediction", predictions["label"]))
    written = []
    for rank, i in enumerate(chosen):
        aspect = (lat.max() - lat.min()) / max(lon.max() - lon.min(), 1e-6)
        fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 1.2 + 6.0 * aspect), squeeze=False,
                                 constrained_layout=True)
        for ax, (title, labels) in zip(axes[0], panels):
            mesh = ax.pcolormesh(lon, lat, batch["x"][i, 0], cmap="Greys_r", shading="nearest")
            events = np.ma.masked_equal(labels[i], 0)
            ax.pcolormesh(lon, lat, events, cmap=cmap, vmin=0.5, vmax=len(class_names) - 0.5, alpha=0.8,
                          shading="nearest")
            ax.set_title(f"{title}: {source.files[file_id[i]].name}, {_time_label(source, file_id[i], local[i])}",
                         fontsize=9)
            ax.set_xlabel("longitude (°E)")
            ax.set_ylabel("latitude (°N)")
            ax.set_aspect("equal")
        fig.colorbar(mesh, ax=axes[0].tolist(), label=f"{var} ({units})", shrink=0.8)
        axes[0, -1].legend(handles=[Patch(color=c, label=FLAG_MEANINGS.get(n, n).replace("_", " "))
                                    for c, n in zip(colors, class_names[1:])], loc="lower right", fontsize=8)
        path = directory / f"map_{rank}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written
