"""Shared fixtures: small synthetic calorimeter-image files in the hep_cnn_benchmark layout."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def make_images(n: int, size: int = 16, channels: int = 3, seed: int = 0):
    """Background: one energy blob at the centre; signal: the same plus a second prong. Learnable in a few steps."""
    rng = np.random.default_rng(seed)
    label = (np.arange(n) % 2).astype(np.int32)
    yy, xx = np.mgrid[:size, :size]
    centre = size // 2

    def blob(y, x, width):
        return np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * width**2))

    data = np.zeros((n, channels, size, size), dtype=np.float32)
    for i in range(n):  # test data only; a tiny loop is fine here
        image = 100 * blob(centre, centre, 1.0)
        if label[i]:
            image += 60 * blob(centre + rng.integers(3, 5), centre + rng.integers(-3, 4), 1.0)
        data[i] = image * rng.uniform(0.8, 1.2, size=(channels, 1, 1))
    data += rng.exponential(0.5, size=data.shape).astype(np.float32)
    weight = np.full(n, 2.5e-3, dtype=np.float32)
    return data, label, weight


def write_h5(path: Path, n: int = 256, size: int = 16, channels: int = 3, seed: int = 0, **replace) -> Path:
    data, label, weight = make_images(n, size, channels, seed)
    arrays = {"data": data, "label": label, "weight": weight, "normweight": np.ones(n, dtype=np.float32)}
    arrays.update(replace)
    with h5py.File(path, "w") as h5:
        for key, value in arrays.items():
            if value is not None:
                h5[key] = value
    return path


@pytest.fixture
def h5_file(tmp_path) -> Path:
    return write_h5(tmp_path / "images.h5")


def pip_target(source: Path, target: Path) -> None:
    """Install a package (not editable, no dependencies) into `target`, as a user's site-packages."""
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True, capture_output=True, text=True)


@pytest.fixture(scope="session")
def example_plugin(tmp_path_factory) -> dict[str, str]:
    """The third-party example plugin (tests/example_plugin) installed as a user would: the environment to run
    `sciml(...)` with. The core's tests use it as their fixture: it knows no domain."""
    target = tmp_path_factory.mktemp("example_site")
    pip_target(ROOT / "tests" / "example_plugin", target)
    return {"PYTHONPATH": str(target)}


def sciml(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600):
    """Run the CLI as a user would: `python -m sciml ...` in a fresh process."""
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run([sys.executable, "-m", "sciml", *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


# Overrides that make a CLI run take seconds: tiny synthetic images, a small network, no progress bar.
FAST = ["model.widths=[8,8]", "model.hidden=16", "model.dropout=0",
        "optimizer.lr=0.005",
        "data.batch_size=32", "callbacks.progress_bar=null", "trainer.enable_model_summary=false"]
