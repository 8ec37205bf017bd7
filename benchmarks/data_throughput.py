"""Data larger than memory against data in memory: training rate, data wait, peak memory, and test metrics.

Three measurements, each writing its table into docs/performance.md (between markers) and its raw numbers to JSON:

    # rate: a data set FACTOR x the cap, trained under a cgroup memory cap (streamed) against the same run without a
    # cap (held in memory), interleaved in pairs; the rows are tiles of the plugin's sample (see `make_dataset`)
    PYTHONPATH=. python benchmarks/data_throughput.py rate --plugin hep --cap-gb 1 --factor 8 --pairs 2 \
        --batches 300
    # metrics: the plugin's sample streamed in small chunks (forced by data.max_memory_gb) against held in memory,
    # full training, several seeds: test metrics of chunk-aware shuffling against full shuffling
    PYTHONPATH=. python benchmarks/data_throughput.py metrics --plugin hep --seeds 3 --epochs 6
    # scaling: the streamed run's rate and memory at 1x, 4x and 8x the cap, with 1 and 2 CPU ranks
    PYTHONPATH=. python benchmarks/data_throughput.py scaling --plugin hep --cap-gb 1 --factors 1,4,8 --ranks 1,2

The cap is a cgroup-v1 memory controller group (`/sys/fs/cgroup/memory/sciml_bench_*`, needs root): the kernel
reclaims page cache and kills the process when its own memory passes the cap. "peak memory" is the group's highest
resident anonymous plus shared memory (`total_rss + total_shmem` of memory.stat, sampled every 0.2 s: what the
process really holds, without the page cache the kernel reclaims), for the uncapped run too (its group has no
limit). "data wait" is the time between the end of one training step and the start of the next (fetching the
batch) as a share of the training epoch, from the `DataWait` callback this module adds to each run.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_bench import TEST_METRICS  # noqa: E402
from markers import replace_block  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "performance.md"
CGROUP = Path("/sys/fs/cgroup/memory")
GiB = 2**30
LOADER = re.compile(r"(\d+) loader worker\(s\) \((.*)\)(?:, \d+ batches prefetched)?\s*$")  # the streaming log line
# a short epoch: few validation and test batches (the rate is the training loop's), no plots
RUN = ["trainer.max_epochs=1", "callbacks.progress_bar=null", "data.val_size=0.01", "data.test_size=0.01",
       "+trainer.limit_val_batches=5", "+trainer.limit_test_batches=5", "+trainer.limit_predict_batches=1"]


class DataWait(pl.Callback):
    """Time between the end of one training step and the start of the next (the batch fetch), summed over the
    epoch, written as JSON to `out` at the end of training."""

    def __init__(self, out: str):
        self.out, self.wait, self.start, self.end, self._last = out, 0.0, None, None, None

    def on_train_epoch_start(self, trainer, pl_module):
        self.start = self._last = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._last is not None:
            self.wait += time.perf_counter() - self._last

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._last = self.end = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        if trainer.global_rank == 0 and self.start is not None and self.end:
            Path(self.out).write_text(json.dumps({"wait_s": self.wait, "epoch_s": self.end - self.start}))


# -- data sets ---------------------------------------------------------------------------------------------------
def make_dataset(plugin: str, target_bytes: float, folder: Path) -> Path:
    """Tiles of the plugin's embedded sample until the inputs (float32) reach `target_bytes`. Each tile is a
    transformed copy: HEP jet images flipped in eta and/or phi (symmetries of the preprocessed images; so only four
    distinct tiles, which is fine for rates and memory, not for metrics: `metrics` uses the untiled sample); climate
    fields rolled in longitude by a per-tile random shift (the synthetic climate is zonally symmetric), with later
    times. Written in the sample's own layout (chunks, compression). Made once per size; kept in `folder`."""
    done = folder / "COMPLETE"
    if done.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    if plugin == "hep":
        import h5py

        from sciml_plugins.hep.reader import DEFAULT_FILE
        with h5py.File(DEFAULT_FILE) as src:
            arrays = {k: src[k][()] for k in ("data", "label", "normweight", "weight")}
            layout = {k: dict(chunks=src[k].chunks, compression=src[k].compression,
                              compression_opts=src[k].compression_opts, shuffle=src[k].shuffle) for k in arrays}
            attrs = dict(src.attrs)
        tiles = int(np.ceil(target_bytes / (arrays["data"].size * 4)))
        for t in range(tiles):
            data = arrays["data"]
            data = data[..., ::-1, :] if t % 2 else data
            data = data[..., ::-1] if (t // 2) % 2 else data
            path = folder / f"tile_{t:03d}.h5"
            with h5py.File(path.with_suffix(".tmp"), "w") as out:
                for key, value in arrays.items():
                    out.create_dataset(key, data=np.ascontiguousarray(data) if key == "data" else value,
                                       **layout[key])
                out.attrs.update(attrs)
            path.with_suffix(".tmp").replace(path)
            print(f"  {path.name} ({t + 1}/{tiles})", flush=True)
    elif plugin == "climate":
        import xarray as xr

        from sciml_plugins.climate.generate import encoding
        from sciml_plugins.climate.reader import DEFAULT_DIR
        sample = xr.concat([xr.load_dataset(f, decode_times=False) for f in sorted(DEFAULT_DIR.glob("*.nc"))],
                           dim="time")
        row = 4 * sample.sizes["lat"] * sample.sizes["lon"] * len([v for v in sample.data_vars if v != "LABELS"])
        tiles = int(np.ceil(target_bytes / (row * sample.sizes["time"])))
        span = float(sample.time[-1] - sample.time[0]) + float(sample.time[1] - sample.time[0])
        for t in range(tiles):
            tile = sample.roll(lon=int(rng.integers(sample.sizes["lon"])), roll_coords=False)
            tile = tile.assign_coords(time=sample.time + t * span)
            path = folder / f"tile_{t:03d}.nc"
            layout = {k: v for k, v in encoding(tile).items() if k != "time"}  # times keep their own units
            tile.to_netcdf(path.with_suffix(".tmp"), engine="netcdf4", encoding=layout)
            path.with_suffix(".tmp").replace(path)
            print(f"  {path.name} ({t + 1}/{tiles})", flush=True)
    else:
        raise SystemExit(f"--plugin {plugin}: tiling is written for hep and climate")
    done.write_text("")
    return folder


def dataset_bytes(folder: Path) -> float:
    """Bytes on disk of a tiled data set."""
    return sum(f.stat().st_size for f in folder.iterdir() if f.suffix in (".h5", ".nc"))


# -- one run in a memory cgroup -------------------------------------------------------------------------------------
class Cgroup:
    """A cgroup-v1 memory group with an optional limit; polls the memory its processes hold."""

    def __init__(self, limit_bytes: float | None):
        self.path = CGROUP / f"sciml_bench_{os.getpid()}_{time.monotonic_ns()}"
        self.path.mkdir()
        if limit_bytes:
            (self.path / "memory.limit_in_bytes").write_text(str(int(limit_bytes)))
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _held(self) -> int:
        stat = dict(line.split() for line in (self.path / "memory.stat").read_text().splitlines())
        return int(stat["total_rss"]) + int(stat.get("total_shmem", 0))

    def _poll(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, self._held())

    def run(self, command: list[str], env: dict, log: Path) -> int:
        # the shell joins the group, then becomes the run: every process of the run is charged to it
        shell = f"echo $$ > {self.path / 'cgroup.procs'} && exec \"$@\""
        self._thread.start()
        with log.open("w") as out:
            code = subprocess.run(["sh", "-c", shell, "sh", *command], env=env, stdout=out, stderr=out).returncode
        self._stop.set()
        self._thread.join()
        return code

    def oom_kills(self) -> int:
        text = (self.path / "memory.oom_control").read_text()
        return int(dict(line.split() for line in text.splitlines()).get("oom_kill", 0))

    def max_usage(self) -> int:
        return int((self.path / "memory.max_usage_in_bytes").read_text())

    def remove(self) -> None:
        for pid in (self.path / "tasks").read_text().split():  # leftovers (a killed run's workers)
            try:
                os.kill(int(pid), 9)
            except ProcessLookupError:
                pass
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def train(plugin: str, data: Path | None, overrides: list[str], cap: float | None, workdir: Path,
          ranks: int = 1) -> dict:
    out = Path(tempfile.mkdtemp(dir=workdir))
    wait = out / "data_wait.json"
    command = [sys.executable, "-m", "sciml", f"+plugin={plugin}", f"hydra.run.dir={out}",
               f"+callbacks.data_wait._target_=data_throughput.DataWait", f"+callbacks.data_wait.out={wait}",
               *([f"data.path={data}"] if data else []),
               *([f"trainer.devices={ranks}", "trainer.accelerator=cpu", "strategy=ddp"] if ranks > 1 else []),
               *overrides]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "benchmarks"),
                                                         os.environ.get("PYTHONPATH", "")])}
    group = Cgroup(cap)
    start = time.perf_counter()
    try:
        code = group.run(command, env, out / "run.log")
        result = {"returncode": code, "wall_s": time.perf_counter() - start, "peak_gib": group.peak / GiB,
                  "max_usage_gib": group.max_usage() / GiB, "oom_kills": group.oom_kills(), "dir": str(out)}
    finally:
        group.remove()
    log = (out / "run.log").read_text(errors="replace")
    result["placement"] = [line.split(": ", 1)[-1] for line in log.splitlines()
                           if "held in memory" in line or "streamed in chunks" in line][:1]
    # the streamed loader's workers and why (num_workers=auto decides from the CPUs and torch threads)
    result["loader"] = [f"{m[1]} worker(s): {m[2]}" for m in map(LOADER.search, log.splitlines()) if m][:1]
    if code != 0:
        tail = "\n".join(log.splitlines()[-5:])
        print(f"run failed ({code}, OOM kills {result['oom_kills']}): {out}\n{tail}", flush=True)
        return result
    metrics = json.loads((out / "metrics.json").read_text())
    result["samples_per_s"] = metrics["train/samples_per_s"]
    result["test"] = {k: v for k, v in metrics.items() if k.startswith("test/")}
    if wait.exists():
        w = json.loads(wait.read_text())
        result["data_wait"] = w["wait_s"] / w["epoch_s"]
    return result


def _fmt(runs: list[dict], key: str, form: str = "{:.2f}") -> str:
    values = [r[key] for r in runs if key in r]
    return "-" if not values else " / ".join(form.format(v) for v in values)


# -- the three measurements ------------------------------------------------------------------------------------------
def rate(args, workdir: Path) -> str:
    cap = args.cap_gb * GiB
    folder = make_dataset(args.plugin, args.factor * cap, ROOT / "benchmarks" / "data" /
                          f"tiled_{args.plugin}_{args.factor * args.cap_gb:g}gib")
    size = dataset_bytes(folder)
    common = [*RUN, f"+trainer.limit_train_batches={args.batches}", *args.extra]
    pairs = []
    for p in range(args.pairs):
        pair = {}
        for name, cap_bytes, memory in (("streamed", cap, "auto"), ("in memory", None, 1e6)):
            pair[name] = train(args.plugin, folder, [*common, f"data.max_memory_gb={memory}"], cap_bytes, workdir)
            print(f"pair {p + 1} {name}: {json.dumps(pair[name])}", flush=True)
        pairs.append(pair)
    ratios = [p["streamed"]["samples_per_s"] / p["in memory"]["samples_per_s"] for p in pairs
              if "samples_per_s" in p["streamed"] and "samples_per_s" in p["in memory"]]
    lines = ["| run | training samples/s | data wait | peak memory GiB | cgroup max usage GiB | OOM kills | wall s |",
             "|---|---|---|---|---|---|---|"]
    for name in ("streamed", "in memory"):
        runs = [p[name] for p in pairs]
        label = f"streamed, cap {args.cap_gb:g} GiB" if name == "streamed" else "in memory, no cap"
        lines.append(f"| {label} | {_fmt(runs, 'samples_per_s', '{:.0f}')} | {_fmt(runs, 'data_wait', '{:.1%}')} | "
                     f"{_fmt(runs, 'peak_gib')} | {_fmt(runs, 'max_usage_gib')} | {_fmt(runs, 'oom_kills', '{}')} | "
                     f"{_fmt(runs, 'wall_s', '{:.0f}')} |")
    ratio = f"{statistics.median(ratios):.3f} (pairs: {', '.join(f'{r:.3f}' for r in ratios)})" if ratios else "-"
    load = os.getloadavg()
    lines += ["", f"`{args.plugin}`: {len(list(folder.glob('tile_*')))} tiles, {size / GiB:.1f} GiB on disk, "
              f"{args.factor:g}x the {args.cap_gb:g} GiB cap as float32 inputs; {args.batches} training batches per "
              f"run, {args.pairs} interleaved pairs; streamed / in-memory rate: **{ratio}**. Placement logged: "
              f"{(pairs[0]['streamed'].get('placement') or ['-'])[0]}; streamed runs' loader: "
              f"{' / '.join(dict.fromkeys((p['streamed'].get('loader') or ['-'])[0] for p in pairs))}. Load "
              f"average at the end {load[0]:.1f} on "
              f"{os.cpu_count()} CPUs. Command: `PYTHONPATH=. python benchmarks/data_throughput.py rate --plugin "
              f"{args.plugin} --cap-gb {args.cap_gb:g} --factor {args.factor:g} --pairs {args.pairs} --batches "
              f"{args.batches}{' ' + ' '.join(args.extra) if args.extra else ''}`"]
    _save(args, {"pairs": pairs, "ratios": ratios, "dataset_gib": size / GiB})
    return "\n".join(lines)


def metrics(args, workdir: Path) -> str:
    keys = args.metric_keys.split(",") if args.metric_keys else TEST_METRICS[args.plugin]
    runs = {"streamed": [], "in memory": []}
    for seed in range(1, args.seeds + 1):
        for name, memory in (("streamed", args.stream_memory_gb), ("in memory", 1e6)):
            overrides = [f"trainer.max_epochs={args.epochs}", f"seed={seed}", f"data.seed={seed}",
                         "callbacks.progress_bar=null", f"data.max_memory_gb={memory}",
                         f"data.stream_chunk_rows={args.chunk_rows}", f"data.shuffle_buffer_mb={args.buffer_mb}",
                         *args.extra]
            result = train(args.plugin, None, overrides, None, workdir)
            runs[name].append(result)
            print(f"seed {seed} {name}: {json.dumps(result)}", flush=True)
    lines = ["| run | " + " | ".join(keys) + " | training samples/s |", "|---" * (len(keys) + 2) + "|"]
    for name, results in runs.items():
        cells = []
        for key in keys:
            values = [r["test"][key] for r in results if key in r.get("test", {})]
            cells.append(f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}" if len(values) > 1 else "-")
        label = (f"streamed ({args.chunk_rows}-row chunks, {args.buffer_mb:g} MB buffer)" if name == "streamed"
                 else "in memory (full shuffle)")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {_fmt(results, 'samples_per_s', '{:.0f}')} |")
    lines += ["", f"`{args.plugin}` embedded sample, {args.epochs} epochs, seeds 1-{args.seeds} (mean ± standard "
              f"deviation over seeds; the same seed gives both runs the same split and initial weights). Command: "
              f"`PYTHONPATH=. python benchmarks/data_throughput.py metrics --plugin {args.plugin} --seeds "
              f"{args.seeds} --epochs {args.epochs} --chunk-rows {args.chunk_rows} --buffer-mb {args.buffer_mb:g}"
              f"{' ' + ' '.join(args.extra) if args.extra else ''}`"]
    _save(args, runs)
    return "\n".join(lines)


def scaling(args, workdir: Path) -> str:
    cap = args.cap_gb * GiB
    lines = ["| data / cap | ranks | training samples/s (all ranks) | data wait (rank 0) | peak memory GiB | "
             "OOM kills |", "|---|---|---|---|---|---|"]
    results = []
    for factor in map(float, args.factors.split(",")):
        folder = make_dataset(args.plugin, factor * cap, ROOT / "benchmarks" / "data" /
                              f"tiled_{args.plugin}_{factor * args.cap_gb:g}gib")
        for ranks in map(int, args.ranks.split(",")):
            # the cap is per rank (a node gives each rank its share), set on the whole job: the ranks share it and
            # each one's budget is its share of what the job may use
            result = train(args.plugin, folder, [*RUN, f"+trainer.limit_train_batches={args.batches}", *args.extra],
                           cap * ranks, workdir, ranks)
            result |= {"factor": factor, "ranks": ranks}
            results.append(result)
            print(json.dumps(result), flush=True)
            lines.append(f"| {factor:g}x | {ranks} | {result.get('samples_per_s', float('nan')):.0f} | "
                         f"{result.get('data_wait', float('nan')):.1%} | {result['peak_gib']:.2f} | "
                         f"{result['oom_kills']} |")
    lines += ["", f"`{args.plugin}`, cap {args.cap_gb:g} GiB per rank on the whole job, data sizes relative to it, "
              f"{args.batches} training batches per rank, one run per row (not interleaved: compare within a factor). Command: `PYTHONPATH=. python benchmarks/data_throughput.py scaling --plugin {args.plugin} "
              f"--cap-gb {args.cap_gb:g} --factors {args.factors} --ranks {args.ranks} --batches {args.batches}`"]
    _save(args, results)
    return "\n".join(lines)


def _save(args, payload) -> None:
    path = ROOT / "docs" / "benchmarks" / f"{args.name or f'data-{args.mode}-{args.plugin}'}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "out"}, "results": payload},
                               indent=1, default=str))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("rate", "metrics", "scaling"))
    parser.add_argument("--plugin", default="hep", choices=("hep", "climate"))
    parser.add_argument("--cap-gb", type=float, default=1.0)
    parser.add_argument("--factor", type=float, default=8.0)
    parser.add_argument("--factors", default="1,4,8")
    parser.add_argument("--ranks", default="1,2")
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--chunk-rows", type=int, default=256)
    parser.add_argument("--buffer-mb", type=float, default=32)
    parser.add_argument("--stream-memory-gb", type=float, default=0.001)
    parser.add_argument("--metric-keys", default=None, help="comma-separated test metrics (default: the plugin's)")
    parser.add_argument("--out", type=Path, default=DOC, help="markdown file for the table (between markers)")
    parser.add_argument("--name", help="the table's marker and JSON name (default: data-MODE-PLUGIN)")
    parser.add_argument("extra", nargs="*", help="more overrides for every run")
    args = parser.parse_intermixed_args()  # overrides may follow the options
    if not CGROUP.is_dir() or not os.access(CGROUP, os.W_OK):
        raise SystemExit(f"{CGROUP}: a writable cgroup-v1 memory controller is needed (run as root)")
    with tempfile.TemporaryDirectory(dir=ROOT / "benchmarks") as tmp:
        table = {"rate": rate, "metrics": metrics, "scaling": scaling}[args.mode](args, Path(tmp))
    print(table)
    replace_block(args.out, args.name or f"data-{args.mode}-{args.plugin}", table)


if __name__ == "__main__":
    main()
