"""Training speed per plugin on one device: samples/s in fp32 and bf16, model FLOPs utilisation (MFU), the share of
the time spent waiting for data, and peak memory. Driven by `benchmarks/gpu.sh`; writes docs/performance.md.

Each (plugin, precision) is one Lightning fit of the plugin's default config (data, network, optimizer, batch) on
one device, without validation, checkpoints or logging: `--warmup` steps, then `--steps` timed steps (the device is
synchronised only at the two ends of the window). FLOPs per sample are counted with
`torch.utils.flop_counter.FlopCounterMode` over the first training step (forward, loss and backward: the matmuls
and convolutions, which is what MFU counts). The device's peak comes from its name (GPU: dense tensor-core bf16
and non-tensor fp32, from the vendors' data sheets) or, on CPU, from a 4096x4096 matmul measured here with the
same threads. "data wait" is the host's time between the end of one step and the start of the next (fetching the
batch, moving it to the device, `on_after_batch_transfer`) as a share of the window.

    benchmarks/gpu.sh              # on a GPU machine: all plugins, fp32 and bf16
    benchmarks/gpu.sh --cpu        # the same script on CPU with few steps: checks the script, GPU rows marked
                                   # as not yet measured
    python benchmarks/gpu_bench.py --cpu --plugins hep --steps 3 --out /tmp/perf.md data.path=... (overrides)
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import resource
import sys
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.data import extract_batch_size
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from markers import replace_block  # noqa: E402

from sciml.callbacks import SpeedOptions  # noqa: E402
from sciml.threads import configure_threads  # noqa: E402

DOC = Path(__file__).resolve().parents[1] / "docs" / "performance.md"
PLUGINS = ("hep", "climate", "tumor", "hail")
TEST_METRICS = {  # the metrics.json keys that judge a plugin's runs in the benchmarks
    "hep": ["test/auc", "test/acc", "test/bkg_rej_at_sig_eff_0.5"],
    "climate": ["test/miou", "test/iou_tc", "test/iou_ar"],
    "tumor": ["test/dice_wt", "test/dice_tc", "test/dice_et"],
    "hail": ["test/loss"],
}
PRECISIONS = {"fp32": "32-true", "bf16": "bf16-mixed"}
# Dense peak FLOP/s by device name: bf16 on tensor cores, fp32 without (TF32 off, torch's default for matmuls).
PEAKS = {"H200": {"bf16": 989e12, "fp32": 67e12}, "H100": {"bf16": 989e12, "fp32": 67e12},
         "A100": {"bf16": 312e12, "fp32": 19.5e12}}
NOT_MEASURED = "not yet measured"


def device_peak(device: torch.device, matmul_size: int = 4096) -> tuple[str, dict[str, float | None]]:
    """The device's name and its peak FLOP/s per precision (None when its name is not in PEAKS)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in PEAKS.items():
            if key in name:
                if "PCIe" in name or "NVL" in name:  # lower clocks than SXM: MFU against SXM would flatter
                    name += " (peak of the SXM part)"
                return name, peak
        return name, {"fp32": None, "bf16": None}
    name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return name, {"fp32": matmul_peak(torch.float32, matmul_size), "bf16": matmul_peak(torch.bfloat16, matmul_size)}


def matmul_peak(dtype: torch.dtype, n: int = 4096, reps: int = 3, clock=time.perf_counter) -> float:
    """FLOP/s of an n x n matmul on this CPU with the current threads (best of `reps`); with
    clock=time.process_time, FLOP per second of this process's CPU time."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        start = clock()
        a @ b
        best = min(best, clock() - start)
    return 2 * n**3 / best


class Meter(pl.Callback):
    """Times a window of training steps and counts the FLOPs of the first one."""

    def __init__(self, warmup: int, steps: int, device: torch.device):
        self.warmup, self.steps, self.device = warmup, steps, device
        self.step = 0
        self.samples = 0
        self.data_time = 0.0
        self.flops_per_sample = None
        self._counter = None
        self._last_end = None
        self.start = self.stop = None

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        now = time.perf_counter()
        if self.step > self.warmup and self._last_end is not None:
            self.data_time += now - self._last_end
        if self.step == 0:
            self._counter = FlopCounterMode(display=False)
            self._counter.__enter__()
        if self.step == self.warmup:
            self._sync()
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            self.start, self.cpu_start = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.step == 0:
            self._counter.__exit__(None, None, None)
            self.flops_per_sample = self._counter.get_total_flops() / extract_batch_size(batch)
        if self.step >= self.warmup:
            self.samples += extract_batch_size(batch)
        if self.step == self.warmup + self.steps - 1:
            self._sync()
            self.stop, self.cpu_stop = time.perf_counter(), time.process_time()
            trainer.should_stop = True
        self.step += 1
        self._last_end = time.perf_counter()


def compose(plugin: str, overrides: list[str]):
    from hydra import compose as hydra_compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from sciml import searchpath

    searchpath.register()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="sciml.conf", version_base="1.3"):
        cfg = hydra_compose("config", overrides=[f"+plugin={plugin}", *overrides], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = cfg.paths.output_dir = str(Path(os.environ.get("TMPDIR", "/tmp")) /
                                                                   "sciml_gpu_bench")
    HydraConfig.instance().set_config(cfg)
    return cfg


def measure(plugin: str, precision: str, device: torch.device, warmup: int, steps: int,
            overrides: list[str], channels_last: bool = False, compile: bool = False) -> dict:
    from hydra.utils import instantiate

    from sciml.run import hand_shapes_to_model

    cfg = compose(plugin, overrides)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    hand_shapes_to_model(cfg, datamodule)  # the data's row shape becomes model.input_shape, as in a run
    task = instantiate(cfg.task, model=instantiate(cfg.model), optimizer=cfg.optimizer, scheduler=cfg.scheduler,
                       _recursive_=False)
    meter = Meter(warmup, steps, device)
    trainer = pl.Trainer(accelerator=device.type if device.type != "cuda" else "gpu", devices=1,
                         precision=PRECISIONS[precision], max_steps=warmup + steps, max_epochs=-1,
                         limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[meter, SpeedOptions(channels_last=channels_last, compile=compile)],
                         default_root_dir=cfg.paths.output_dir)
    trainer.fit(task, datamodule=datamodule)
    window = meter.stop - meter.start
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"samples_per_s": meter.samples / window,
            "samples_per_cpu_s": meter.samples / (meter.cpu_stop - meter.cpu_start), "flops_per_sample": meter.flops_per_sample,
            "data_share": meter.data_time / window, "peak_bytes": peak,
            "batch": getattr(datamodule, "batch_size", None)}


def table(results: dict, peaks: dict, device_name: str, cpu: bool) -> str:
    memory = "peak host RSS (GiB, whole process)" if cpu else "peak GPU memory (GiB)"
    lines = [f"| plugin | batch | GFLOP/sample (train step) | precision | samples/s | MFU | data wait | {memory} |",
             "|---|---|---|---|---|---|---|---|"]
    for (plugin, precision), r in results.items():
        peak = peaks.get(precision)
        mfu = f"{100 * r['samples_per_s'] * r['flops_per_sample'] / peak:.1f} %" if peak else "n/a"
        lines.append(f"| {plugin} | {r['batch']} | {r['flops_per_sample'] / 1e9:.4f} | {precision} | "
                     f"{r['samples_per_s']:.0f} | {mfu} | {100 * r['data_share']:.0f} % | "
                     f"{r['peak_bytes'] / 2**30:.2f} |")
    peak_text = ", ".join(f"{k} {v / 1e12:.3g} TFLOP/s" if v else f"{k} unknown" for k, v in peaks.items())
    return "\n".join(lines) + f"\n\nDevice: {device_name}; peak {peak_text}."


def not_measured_table() -> str:
    lines = ["| plugin | precision | samples/s | MFU | data wait | peak GPU memory |", "|---|---|---|---|---|---|"]
    lines += [f"| {p} | {q} | {NOT_MEASURED} | {NOT_MEASURED} | {NOT_MEASURED} | {NOT_MEASURED} |"
              for p in PLUGINS for q in PRECISIONS]
    return "\n".join(lines) + "\n\nNo GPU has run this benchmark yet: run `benchmarks/gpu.sh` on one."


def gpu_block(doc: Path) -> str:
    """The text of the GPU block of `doc` ('' when there is none)."""
    text = doc.read_text() if doc.exists() else ""
    if "<!-- gpu:begin -->" not in text:
        return ""
    return text.split("<!-- gpu:begin -->", 1)[1].split("<!-- gpu:end -->", 1)[0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="run on CPU (a check of the script)")
    parser.add_argument("--plugins", nargs="+", default=list(PLUGINS))
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default: 10 on GPU, 2 on CPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 50 on GPU, 5 on CPU)")
    parser.add_argument("--matmul-size", type=int, default=4096, help="CPU peak: the n x n matmul measured")
    parser.add_argument("--out", type=Path, default=DOC, help="markdown file to write the tables into")
    parser.add_argument("overrides", nargs="*", help="config overrides for every plugin (e.g. data.batch_size=256)")
    args = parser.parse_args(argv)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    if not args.cpu and not torch.cuda.is_available():
        parser.error("no GPU visible: run on a GPU machine, or with --cpu to check the script")
    device = torch.device("cpu" if args.cpu else "cuda", 0 if not args.cpu else None)
    warmup = args.warmup if args.warmup is not None else (2 if args.cpu else 10)
    steps = args.steps if args.steps is not None else (5 if args.cpu else 50)
    configure_threads("auto", 1)
    device_name, peaks = device_peak(device, args.matmul_size)
    results = {}
    for plugin in args.plugins:
        for precision in args.precisions:
            start = time.perf_counter()
            results[plugin, precision] = measure(plugin, precision, device, warmup, steps, args.overrides)
            r = results[plugin, precision]
            print(f"{plugin} {precision}: {r['samples_per_s']:.0f} samples/s, "
                  f"{r['flops_per_sample'] / 1e9:.4f} GFLOP/sample, data wait {100 * r['data_share']:.0f} %, "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    command = "benchmarks/gpu.sh" + (" --cpu" if args.cpu else "")
    text = table(results, peaks, device_name, args.cpu)
    text += f"\n\n{warmup} warm-up + {steps} timed steps per row; command: `{command}`"
    if args.overrides:
        text += f" with `{' '.join(args.overrides)}`"
    text += "."
    print(text)
    if args.cpu:
        replace_block(args.out, "gpu_cpu_check", text)
        if not gpu_block(args.out).strip() or NOT_MEASURED in gpu_block(args.out):  # never over real GPU numbers
            replace_block(args.out, "gpu", not_measured_table())
    else:
        replace_block(args.out, "gpu", text)


if __name__ == "__main__":
    main()
