"""benchmarks/gpu_bench.py in its --cpu mode (what `benchmarks/gpu.sh --cpu` runs) on one plugin with tiny
settings, and the GPU path where a GPU is present."""
import sys

import pytest
import torch
from conftest import ROOT, write_h5

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_bench  # noqa: E402

TINY = ["model.widths=[8,8]", "model.hidden=16", "data.batch_size=16"]


def test_cpu_mode_writes_the_tables(tmp_path):
    data = write_h5(tmp_path / "images.h5", n=128)
    doc = tmp_path / "performance.md"
    doc.write_text("# Performance\n\nprose that stays\n<!-- gpu:begin -->\n<!-- gpu:end -->\n")
    gpu_bench.main(["--cpu", "--plugins", "hep", "--warmup", "1", "--steps", "2", "--matmul-size", "256",
                    "--out", str(doc), f"data.path={data}", *TINY])
    text = doc.read_text()
    assert "prose that stays" in text
    check = text.split("<!-- gpu_cpu_check:begin -->")[1].split("<!-- gpu_cpu_check:end -->")[0]
    rows = [line for line in check.splitlines() if line.startswith("| hep |")]
    assert len(rows) == 2 and "fp32" in rows[0] and "bf16" in rows[1]
    assert all("%" in row and "n/a" not in row for row in rows), "MFU against the measured CPU peak"
    gpu = text.split("<!-- gpu:begin -->")[1].split("<!-- gpu:end -->")[0]
    assert gpu_bench.NOT_MEASURED in gpu


def test_gpu_peaks_by_name():
    assert gpu_bench.PEAKS["H200"]["bf16"] == 989e12 and gpu_bench.PEAKS["A100"]["fp32"] == 19.5e12


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_mode(tmp_path):
    data = write_h5(tmp_path / "images.h5", n=256)
    doc = tmp_path / "performance.md"
    gpu_bench.main(["--plugins", "hep", "--warmup", "2", "--steps", "5", "--out", str(doc), f"data.path={data}",
                    *TINY])
    gpu = doc.read_text().split("<!-- gpu:begin -->")[1]
    assert gpu_bench.NOT_MEASURED not in gpu.split("<!-- gpu:end -->")[0]
