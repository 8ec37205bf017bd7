"""What climate scientists open after a run: predictions as CF-netCDF on the input's own coordinates, and maps of
truth vs prediction on lat/lon axes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

from sciml.data import FileInfo

FLAG_MEANINGS = {"background": "background", "tc": "tropical_cyclone", "ar": "atmospheric_river"}


def _coordinate(info: FileInfo, name: str, downsample: int) -> xr.DataArray:
    attrs = dict(info.meta[f"{name}_attrs"])
    if downsample > 1:
        attrs["comment"] = f"block mean of {downsample} input grid points"
    return xr.DataArray(info.meta[name], dims=(name,), attrs=attrs)


def write_netcdf(info: FileInfo, rows: np.ndarray, outputs: dict[str, np.ndarray], truth: np.ndarray | None,
                 class_names: list[str], directory: Path, downsample: int = 1, stem: str | None = None) -> Path:
    """`<stem (default: the input's)>_pred.nc` for the predicted time steps `rows` of one input file: `LABELS_PRED`,
    `PROB_<CLASS>` per foreground class and, when the input has them, its `LABELS`; (time, lat, lon) on the input's
    time values, units and calendar, or (lat, lon) when the input has no time dimension."""
    meanings = " ".join(FLAG_MEANINGS.get(n, n) for n in class_names)
    flags = np.arange(len(class_names), dtype=np.uint8)
    has_time = info.meta["has_time"]
    dims = ("time", "lat", "lon") if has_time else ("lat", "lon")

    def field(values: np.ndarray) -> np.ndarray:
        return values if has_time else values[0]

    data = {"LABELS_PRED": (dims, field(outputs["label"].astype(np.uint8)),
                            {"long_name": "predicted extreme weather event class", "flag_values": flags,
                             "flag_meanings": meanings})}
    if "probability" in outputs:
        for k, name in enumerate(class_names[1:], start=1):
            data[f"PROB_{name.upper()}"] = (
                dims, field(outputs["probability"][:, k].astype(np.float32)),
                {"long_name": f"predicted probability of class {FLAG_MEANINGS.get(name, name)}", "units": "1",
                 "valid_min": np.float32(0), "valid_max": np.float32(1)})
    if truth is not None:
        data["LABELS"] = (dims, field(truth.astype(np.uint8)),
                          {"long_name": "extreme weather event class (input labels)", "flag_values": flags,
                           "flag_meanings": meanings})
    coords = {"lat": _coordinate(info, "lat", downsample), "lon": _coordinate(info, "lon", downsample)}
    if has_time:  # the input's own time values (a time dimension without a variable: its indices)
        times = rows if info.meta["time"] is None else info.meta["time"][rows]
        coords["time"] = xr.DataArray(times, dims=("time",), attrs=dict(info.meta["time_attrs"]))
    path = info.path
    ds = xr.Dataset(data, coords=coords, attrs={
        "Conventions": "CF-1.8", "title": "Tropical cyclone and atmospheric river segmentation",
        "source": "sciml climate plugin (ClimateUNet)", "input_file": str(path),
        "history": f"predicted from {path.name}"})
    target = directory / f"{stem or path.stem}_pred.nc"
    tmp = directory / f".{target.name}.tmp"
    encoding = {v: {"zlib": True, "complevel": 4} for v in data}
    ds.to_netcdf(tmp, engine="netcdf4", format="NETCDF4", encoding=encoding)
    tmp.replace(target)
    return target


def time_label(info: FileInfo, row: int) -> str:
    time, attrs = info.meta["time"], info.meta["time_attrs"]
    if time is None:
        return f"time step {row}"
    try:
        import cftime

        return cftime.num2date(time[row], attrs["units"], attrs.get("calendar", "standard")).strftime("%Y-%m-%d %H:%M")
    except Exception:  # undecodable or missing units: show the raw value
        return f"time {time[row]}"


def write_maps(reader, info: FileInfo, rows: np.ndarray, predicted: np.ndarray, truth: np.ndarray | None,
               directory: Path, maps: list[tuple[int, Path]]) -> list[tuple[int, Path]]:
    """Keep `reader.num_maps` PNG maps of the time steps with the most event pixels (truth when known, else the
    prediction) among all files written so far: `maps` is the current selection, best first; a time step of this
    file that enters it is drawn, and the map it pushes out is deleted. Each map shows the first input variable
    (TMQ) in grey and events in colour, truth (when known) beside prediction, on longitude/latitude axes."""
    reference = truth if truth is not None else predicted
    events = (reference > 0).sum(axis=(1, 2))
    maps = list(maps)
    for i in np.argsort(-events, kind="stable"):
        if len(maps) >= reader.num_maps and events[i] <= maps[-1][0]:
            break  # candidates are in decreasing order: none of the rest enters either
        path = directory / f"map_{info.path.stem}_{int(rows[i])}.png"
        panels = ([("truth", truth[i])] if truth is not None else []) + [("prediction", predicted[i])]
        field = reader.read(info, rows[i:i + 1])["x"][0, 0]
        _draw(path, info, int(rows[i]), field, panels, reader.variables[0], reader.class_names)
        maps.append((int(events[i]), path))
        maps.sort(key=lambda m: -m[0])  # stable: earlier maps win ties
        for _, dropped in maps[reader.num_maps:]:
            dropped.unlink(missing_ok=True)
        maps = maps[:reader.num_maps]
    return maps


def _draw(path: Path, info: FileInfo, row: int, field: np.ndarray, panels, variable: str, class_names) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    path.parent.mkdir(parents=True, exist_ok=True)
    colors = ["#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd"][: len(class_names) - 1]
    cmap = ListedColormap(colors)
    lon = np.rad2deg(np.unwrap(np.deg2rad(info.meta["lon"])))  # monotonic across the date line
    lat = info.meta["lat"]
    aspect = (lat.max() - lat.min()) / max(lon.max() - lon.min(), 1e-6)
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 1.2 + 6.0 * aspect), squeeze=False,
                             constrained_layout=True)
    for ax, (title, labels) in zip(axes[0], panels):
        mesh = ax.pcolormesh(lon, lat, field, cmap="Greys_r", shading="nearest")
        ax.pcolormesh(lon, lat, np.ma.masked_equal(labels, 0), cmap=cmap, vmin=0.5, vmax=len(class_names) - 0.5,
                      alpha=0.8, shading="nearest")
        ax.set_title(f"{title}: {info.path.name}, {time_label(info, row)}", fontsize=9)
        ax.set_xlabel("longitude (°E)")
        ax.set_ylabel("latitude (°N)")
        ax.set_aspect("equal")
    fig.colorbar(mesh, ax=axes[0].tolist(), label=f"{variable} ({info.meta['units']})", shrink=0.8)
    axes[0, -1].legend(handles=[Patch(color=c, label=FLAG_MEANINGS.get(n, n).replace("_", " "))
                                for c, n in zip(colors, class_names[1:])], loc="lower right", fontsize=8)
    fig.savefig(path, dpi=90)
    plt.close(fig)
