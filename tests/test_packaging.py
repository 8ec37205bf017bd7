"""Installs as a user gets them: a third-party plugin package, and sciml itself from a wheel (not editable)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, sciml
from conftest import pip_target as _pip_target


def test_third_party_plugin_is_discovered_and_trains(example_plugin, tmp_path):
    listing = sciml("--list-plugins", env=example_plugin)
    assert "example" in listing.stdout and "hep" in listing.stdout
    run_dir = tmp_path / "run"
    result = sciml("+plugin=example", "trainer.max_steps=1", "callbacks.progress_bar=null",
                   f"hydra.run.dir={run_dir}", env=example_plugin, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "test/auc" in metrics and (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert "unknown plugin" in sciml("+plugin=exampel", env=example_plugin).stderr


def test_non_editable_install_runs_from_any_directory(tmp_path):
    site = tmp_path / "site"
    _pip_target(ROOT, site)
    env = {"PYTHONPATH": str(site)}
    where = subprocess.run([sys.executable, "-c", "import sciml, sciml_plugins.hep as h; "
                            "print(sciml.__file__); print(h.plugin.config_dir)"],
                           env={**os.environ, **env}, cwd=tmp_path, capture_output=True, text=True, check=True)
    assert all(line.startswith(str(site)) for line in where.stdout.split()), where.stdout
    assert (site / "sciml" / "conf" / "config.yaml").is_file()
    assert (site / "sciml_plugins" / "hep" / "data" / "hep_top_qcd_40x40.h5").is_file()
    composed = sciml("+plugin=hep", "optimizer=lars", "--cfg", "job", "--resolve", env=env, cwd=tmp_path)
    assert composed.returncode == 0, composed.stderr[-2000:]
    assert "KurthCNN" in composed.stdout and "sciml.optim.LARS" in composed.stdout
