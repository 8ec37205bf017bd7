"""Fixtures for tests against a real cluster (`pytest -m cluster`, run by `make test-cluster`, which starts one with
.ci/cluster/start.sh). Without a cluster the tests skip: `make test` never needs one."""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest


def slurm_node_state() -> str | None:
    """The node states of the SLURM cluster that `sinfo` reaches (SLURM_CONF), or None when there is none."""
    if not shutil.which("sinfo"):
        return None
    try:
        result = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return None
    return result.stdout.strip() if result.returncode == 0 else None


@pytest.fixture
def slurm():
    state = slurm_node_state()
    if not state or not re.search(r"^(idle|mixed|allocated)", state, re.M):
        pytest.skip("no SLURM cluster up (make test-cluster starts one)")


@pytest.fixture
def ray_address():
    address = os.environ.get("RAY_ADDRESS", "")
    match = re.fullmatch(r"(?:ray://)?([\w.\-]+):(\d+)", address)
    if not match:
        pytest.skip("no Ray cluster: RAY_ADDRESS=HOST:PORT is not set (make test-cluster starts one)")
    try:
        socket.create_connection((match[1], int(match[2])), timeout=5).close()
    except OSError:
        pytest.skip(f"no Ray cluster answers at RAY_ADDRESS={address}")
    return address


def sbatch(script: Path, cwd: Path, timeout: float = 300, *args: str) -> int:
    """Submit `script` from `cwd` and wait for it; returns the job id."""
    result = subprocess.run(["sbatch", "--parsable", "--wait", f"--chdir={cwd}", *args, str(script)],
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"sbatch failed ({result.returncode}): {result.stdout}{result.stderr}" + \
        "".join(p.read_text()[-3000:] for p in cwd.glob("slurm-*.out"))
    return int(result.stdout.strip().split(";")[0])


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
