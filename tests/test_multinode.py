"""Two nodes x two ranks, simulated on this machine: two torchrun invocations (`--nnodes=2 --node-rank=0/1
--master-addr=127.0.0.1`), as docs/distributed.md shows, for DDP and for the hybrid strategy with one group per node.
Four gloo processes take ~30-50 s on 2 cores: `slow`, and `cluster` so that `make test-cluster` (CI) runs them."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
from conftest import FAST, write_h5

pytestmark = [pytest.mark.slow, pytest.mark.cluster, pytest.mark.timeout(300)]

# 366 rows: 256 training rows = 4 ranks x 64 = 2 batches of 32 per rank; the FAST network has 2,906 parameters.
ROWS, STEPS, PARAM_BYTES = 366, 2, 2906 * 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(tmp_path, *overrides: str) -> list[subprocess.CompletedProcess]:
    data = write_h5(tmp_path / "images.h5", n=ROWS)
    port = _free_port()
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}", "--nproc-per-node=2",
         "--master-addr=127.0.0.1", f"--master-port={port}", "--rdzv-id=sim42",
         "-m", "sciml", "+plugin=hep", f"data.path={data}", "trainer.accelerator=cpu", "trainer.num_nodes=2",
         "trainer.devices=2", "trainer.max_epochs=1", *FAST, *overrides],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for node in (0, 1)]
    try:
        outputs = [node.communicate(timeout=240)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    for node, output in zip(nodes, outputs):
        assert node.returncode == 0, output[-4000:]
    assert "GLOBAL_RANK: 3, MEMBER: 4/4" in outputs[0] + outputs[1]
    return outputs


def _one_run_directory(tmp_path) -> dict:
    """Both nodes' ranks agree on outputs/hep/torchrun-<rdzv id>; rank 0 alone writes the metrics, once."""
    runs = list((tmp_path / "outputs" / "hep").iterdir())
    assert [r.name for r in runs] == ["torchrun-sim42"], runs
    log = (runs[0] / "hep.log").read_text()
    assert log.count("[sciml][INFO] - metrics: {") == 1
    assert all(f"data (rank {r} of 4)" in log for r in range(4))
    return json.loads((runs[0] / "metrics.json").read_text())


def test_ddp_on_two_simulated_nodes(tmp_path):
    _two_nodes(tmp_path, "strategy=ddp")
    metrics = _one_run_directory(tmp_path)
    assert metrics["comm/intra_group_bytes"] == STEPS * PARAM_BYTES  # every gradient all-reduced every step
    assert metrics["comm/cross_group_bytes"] == 0
    assert 0 <= metrics["test/auc"] <= 1


def test_hybrid_with_one_group_per_simulated_node(tmp_path):
    """group_size=2: DDP inside each node, model averaging across the two nodes every step (sync_period=1)."""
    _two_nodes(tmp_path, "strategy=hybrid", "strategy.group_size=2", "strategy.sync_period=1")
    metrics = _one_run_directory(tmp_path)
    assert metrics["comm/intra_group_bytes"] == STEPS * PARAM_BYTES
    assert metrics["comm/cross_group_bytes"] == STEPS * PARAM_BYTES
