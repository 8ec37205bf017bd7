"""Launching distributed runs: DDP from the CLI and under Hydra multirun, torchrun, the run directory all ranks agree
on, the HEP data sharded by rank, and the hybrid strategy's traffic against DDP's. Real gloo processes on CPU."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import FAST, sciml, write_h5
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from sciml import searchpath
from sciml.__main__ import launch_id
from sciml.distributed import CROSS_KEY, INTRA_KEY
from sciml.distributed.launch import hydra_subprocess_cmd
from sciml.errors import SciMLError
from sciml.data import DataModule, shard
from sciml_plugins.hep.model import KurthCNN
from sciml_plugins.hep.reader import CaloImages

pytestmark = pytest.mark.timeout(240)  # a hung collective must fail the test, not the CI job

# 366 rows: 55 test, 55 validation, 256 training rows = 2 ranks x 128 = 4 batches of 32 per rank and epoch.
ROWS, TEST_ROWS, STEPS = 366, 55, 4
DDP = ["strategy=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_epochs=1", *FAST]


def _ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _hep_module(path) -> DataModule:
    return DataModule(reader=CaloImages, path=str(path), batch_size=32, normalize="max")


def _single_process_module(path) -> DataModule:
    dm = _hep_module(path)
    dm.setup("fit")
    return dm


def _param_bytes() -> int:
    """Bytes of the trainable parameters of the FAST network."""
    model = KurthCNN((3, 16, 16), widths=(8, 8), hidden=16, dropout=0)
    assert not [b for b in model.buffers() if b.is_floating_point()]  # nothing else is averaged by hybrid
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _check_predictions(run_dir: Path, data_file: Path) -> None:
    """Every test row exactly once, with the scores written for it."""
    with h5py.File(run_dir / "predictions" / f"{data_file.stem}_scores.h5") as h5:
        rows, scores = h5["row"][...], h5["score"][...]
    np.testing.assert_array_equal(rows, _single_process_module(data_file).rows["test"])
    assert len(rows) == TEST_ROWS and ((0 <= scores) & (scores <= 1)).all()


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_h5(tmp_path_factory.mktemp("data") / "images.h5", n=ROWS)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, data_file):
    """One `strategy=ddp` CLI run on 2 CPU processes, started from an unrelated directory."""
    run_dir = tmp_path_factory.mktemp("runs") / "ddp"
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    result = sciml("+plugin=hep", f"data.path={data_file}", f"hydra.run.dir={run_dir}", *DDP, cwd=elsewhere)
    _ok(result)
    assert not any(elsewhere.iterdir()), "nothing may be written outside the run directory"
    return run_dir


# ---- DDP from the command line -----------------------------------------------------------------------------------

def test_ddp_run_fills_its_run_directory(ddp_run, data_file):
    metrics = json.loads((ddp_run / "metrics.json").read_text())
    assert metrics[INTRA_KEY] > 0 and metrics[CROSS_KEY] == 0
    assert 0 <= metrics["test/auc"] <= 1 and metrics["train/samples_per_s"] > 0
    assert (ddp_run / "checkpoints" / "last.ckpt").is_file() and (ddp_run / "plots" / "roc.png").is_file()
    _check_predictions(ddp_run, data_file)
    # rank 1 ran in the same directory, on its own shard, and wrote no .hydra/ of its own
    assert "data (rank 1 of 2): train 128, val 27, test 27" in (ddp_run / "hep_rank1.log").read_text()
    # (.lock is rank 0's hold on the run directory, sciml.rundir)
    assert sorted(p.name for p in ddp_run.iterdir() if p.name.startswith(".")) == [".hydra", ".lock"]


def test_ddp_channel_maxima_are_those_of_the_whole_training_split(ddp_run, data_file):
    """Each rank scanned only its rows; the all-reduced maxima equal a single process's."""
    checkpoint = torch.load(ddp_run / "checkpoints" / "last.ckpt", weights_only=False)
    np.testing.assert_array_equal(checkpoint["DataModule"]["normalizer"]["maximum"].numpy(),
                                  _single_process_module(data_file).normalizer.maximum.numpy())


def test_ddp_multirun_runs_each_job_once(tmp_path, data_file):
    """Without the child command of sciml.distributed.launch, every rank-1 child re-runs the whole sweep. A fixed
    MASTER_PORT in the environment must not be reused by the second job (it would find the first job's store)."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    result = sciml("-m", "+plugin=hep", f"data.path={data_file}", *DDP, "optimizer.lr=0.001,0.002", cwd=tmp_path,
                   env={"MASTER_PORT": str(port)})
    _ok(result)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multirun"], "no run directories of children"
    sweeps = [p for p in (tmp_path / "multirun" / "hep").glob("*/*") if p.is_dir()]
    assert len(sweeps) == 1, sweeps
    sweep = sweeps[0]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    assert len(list(tmp_path.rglob("metrics.json"))) == 2
    for job, lr in (("0", 0.001), ("1", 0.002)):
        assert OmegaConf.load(sweep / job / "config.yaml").optimizer.lr == lr
        assert "data (rank 1 of 2)" in (sweep / job / "hep_rank1.log").read_text()
    summary = (sweep / "summary.csv").read_text().splitlines()
    assert len(summary) == 3 and all(",completed," in line for line in summary[1:])


@pytest.mark.slow
def test_failed_ddp_job_does_not_stop_the_sweep(tmp_path, data_file):
    """Job 0 fails on every rank after the ranks were launched (its optimizer is built inside fit). Lightning's
    watchdog would kill the sweep process when the failed child exits; the job-scoped watchdog lets job 1 run."""
    result = sciml("-m", "+plugin=hep", f"data.path={data_file}", *DDP, "optimizer.weight_decay=-1,0.01",
                   cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]  # a multirun with a failed job exits non-zero
    summary = next(tmp_path.glob("multirun/hep/*/*/summary.csv")).read_text().splitlines()
    assert ",failed," in summary[1] and ",completed," in summary[2]


# ---- hybrid against DDP ------------------------------------------------------------------------------------------

def test_hybrid_exchanges_a_quarter_of_ddp_traffic(tmp_path, ddp_run, data_file):
    """Both count the bytes handed to all-reduce. DDP reduces every gradient, P bytes (the trainable parameters),
    at each of the STEPS steps. The hybrid strategy with group_size=1 has one-rank groups (no intra-group traffic)
    and all-reduces the parameters and floating-point buffers every sync_period=4 steps: KurthCNN has no buffers,
    so cross-group bytes = (STEPS // 4) * P = exactly 1/4 of DDP's intra-group bytes, STEPS being a multiple of 4."""
    run_dir = tmp_path / "hybrid"
    _ok(sciml("+plugin=hep", f"data.path={data_file}", f"hydra.run.dir={run_dir}", *DDP, "strategy=hybrid",
              "strategy.group_size=1", "strategy.sync_period=4"))
    hybrid = json.loads((run_dir / "metrics.json").read_text())
    ddp = json.loads((ddp_run / "metrics.json").read_text())
    param_bytes = _param_bytes()
    assert ddp[INTRA_KEY] == STEPS * param_bytes
    assert hybrid[CROSS_KEY] == STEPS // 4 * param_bytes == ddp[INTRA_KEY] / 4
    assert hybrid[INTRA_KEY] == 0
    _check_predictions(run_dir, data_file)


# ---- torchrun and the shared run directory -----------------------------------------------------------------------

def test_torchrun_ranks_share_one_run_directory(tmp_path, data_file):
    """torchrun starts both ranks; each composes the run directory itself and both pick torchrun-<run id>."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "sciml",
               "+plugin=hep", f"data.path={data_file}", *DDP]
    result = subprocess.run(command, cwd=tmp_path, env={**os.environ, "PYTHONWARNINGS": "ignore"},
                            capture_output=True, text=True, timeout=200)
    _ok(result)
    runs = list((tmp_path / "outputs" / "hep").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("torchrun-"), runs
    assert json.loads((runs[0] / "metrics.json").read_text())[INTRA_KEY] == STEPS * _param_bytes()
    _check_predictions(runs[0], data_file)


def test_launch_id(monkeypatch):
    for key in ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    assert launch_id("2026-01-01/10-00-00") == "2026-01-01/10-00-00"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # plain torchrun: no id the ranks share
    assert launch_id("2026-01-01/10-00-00") == "2026-01-01/10-00-00"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc")
    assert launch_id("x") == "torchrun-abc"
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert launch_id("x") == "slurm-4242"


def _hydra_config(tmp_path, *overrides: str):
    searchpath.register()
    OmegaConf.register_new_resolver("sciml.launch_id", launch_id, replace=True)
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="sciml.conf", version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path / "sweep" / "1")
    return cfg


def test_run_dir_under_slurm(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    cfg = _hydra_config(tmp_path, "+plugin=hep")
    assert cfg.hydra.run.dir == "outputs/hep/slurm-4242"
    assert cfg.hydra.sweep.dir == "multirun/hep/slurm-4242"


def test_child_command_runs_this_job_only(tmp_path, monkeypatch):
    """The child of job 1 of `-m ... optimizer.lr=0.1,0.2`: RUN mode, this job's overrides and directory."""
    cfg = _hydra_config(tmp_path, "+plugin=hep", "optimizer.lr=0.2", "hydra.job.chdir=false")
    with open_dict(cfg):
        cfg.hydra.overrides.hydra = ["hydra.mode=MULTIRUN", "hydra.sweep.dir=/s", "hydra.job.chdir=false"]
        cfg.hydra.overrides.task = ["+plugin=hep", "optimizer.lr=0.2"]
    HydraConfig.instance().set_config(cfg)
    monkeypatch.setattr(sys, "argv", ["sciml", "-m", "+plugin=hep", "optimizer.lr=0.1,0.2", "hydra.sweep.dir=/s",
                                      "--config-dir", "/extra"])
    monkeypatch.setitem(sys.modules, "__main__", types.SimpleNamespace(__spec__=types.SimpleNamespace(
        name="sciml.__main__")))
    command, cwd = hydra_subprocess_cmd(local_rank=1)
    assert command[1:] == ["-m", "sciml.__main__", "--config-dir", "/extra", "hydra.job.chdir=false",
                           "+plugin=hep", "optimizer.lr=0.2", f'hydra.run.dir="{tmp_path / "sweep" / "1"}"',
                           "hydra.output_subdir=null", "hydra.job.name=hep_rank1"]
    assert cwd == cfg.hydra.runtime.cwd


# ---- sharding of the HEP data --------------------------------------------------------------------------------------

class _FakeStrategy:
    root_device = torch.device("cpu")

    def __init__(self):
        self.reduced = []

    def reduce(self, tensor, reduce_op):
        self.reduced.append((tensor.clone(), reduce_op))
        return tensor  # the test takes the maximum over the two fake ranks itself


def _rank_module(path, rank, world=2, use_distributed_sampler=False):
    dm = _hep_module(path)
    dm.trainer = types.SimpleNamespace(
        world_size=world, global_rank=rank, strategy=_FakeStrategy(),
        _accelerator_connector=types.SimpleNamespace(use_distributed_sampler=use_distributed_sampler))
    dm.setup("fit")
    return dm


def test_shard():
    rows = np.arange(10, 21)  # 11 rows
    equal = [shard(rows, r, 3, equal=True) for r in range(3)]
    assert [len(s) for s in equal] == [3, 3, 3] and len(set(np.concatenate(equal))) == 9
    exact = [shard(rows, r, 3, equal=False) for r in range(3)]
    assert sorted(np.concatenate(exact).tolist()) == rows.tolist()


def test_two_ranks_get_disjoint_equal_shards_of_the_file(tmp_path):
    path = write_h5(tmp_path / "images.h5", n=257)  # 179 training, 39 validation and test rows: odd counts
    whole = _single_process_module(path)
    ranks = [_rank_module(path, rank) for rank in (0, 1)]
    for split in ("train", "val"):  # equal shards, disjoint, all rows but one
        parts = [dm.rows[split] for dm in ranks]
        assert len(parts[0]) == len(parts[1]) == len(whole.rows[split]) // 2
        assert not set(parts[0]) & set(parts[1])
        assert set(parts[0]) | set(parts[1]) <= set(whole.rows[split])
    test = [dm.rows["test"] for dm in ranks]  # every test row exactly once
    assert sorted(np.concatenate(test).tolist()) == whole.rows["test"].tolist()
    with h5py.File(path) as h5:
        data = h5["data"][...]
    for rank, dm in enumerate(ranks):  # only this rank's rows were read into memory
        mine = [shard(whole.rows["train"], rank, 2, equal=False), dm.rows["val"], test[rank]]
        np.testing.assert_array_equal(dm.store._rows, np.sort(np.concatenate(mine)))
        np.testing.assert_array_equal(dm.store._memory["x"], data[dm.store._rows])
        batch = next(iter(dm.train_dataloader()))
        np.testing.assert_array_equal(batch["x"].numpy(), data[batch["index"].numpy()])
    # the maxima: each rank reduces its local ones with "max"; together they are the whole split's
    reduced = [dm.trainer.strategy.reduced for dm in ranks]
    assert all(len(r) == 1 and r[0][1] == "max" for r in reduced)
    np.testing.assert_array_equal(torch.maximum(reduced[0][0][0], reduced[1][0][0]).float().numpy(),
                                  whole.normalizer.maximum.numpy())


def test_sharding_refuses_lightnings_sampler_on_top(tmp_path):
    with pytest.raises(SciMLError, match="use_distributed_sampler=False"):
        _rank_module(write_h5(tmp_path / "images.h5", n=64), 0, use_distributed_sampler=True)


def test_more_ranks_than_training_rows(tmp_path):
    with pytest.raises(SciMLError, match="fewer than the 64 ranks"):
        _rank_module(write_h5(tmp_path / "images.h5", n=32), 0, world=64)
