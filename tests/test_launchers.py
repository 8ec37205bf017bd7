"""Launcher presets (conf/hydra/launcher): local parallel jobs that really overlap in time, the SLURM preset
turned into the sbatch script submitit would submit (no cluster needed), and the Ray preset composed and
instantiated (no Ray cluster is started). tests/test_cluster.py runs both on a real cluster (make test-cluster)."""
import csv
import os
from datetime import datetime

import pytest
from conftest import FAST, sciml, write_h5
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from omegaconf import OmegaConf

from sciml import launchers, searchpath, sweepers
from sciml.__main__ import register_resolvers


def _compose(*overrides):
    searchpath.register()
    sweepers.register()
    launchers.register()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="sciml.conf", version_base="1.3"):
        return compose("config", overrides=["+plugin=hep", *overrides], return_hydra_config=True)


def _span(log_file):
    stamps = [datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f")
              for line in log_file.read_text().splitlines() if line.startswith("[20")]
    return stamps[0], stamps[-1]


def test_local_parallel_jobs_run_at_the_same_time(tmp_path):
    data = write_h5(tmp_path / "images.h5", n=192)
    sweep = tmp_path / "sweep"
    result = sciml("-m", "+plugin=hep", "hydra/launcher=local_parallel", f"data.path={data}",
                   f"hydra.sweep.dir={sweep}", *FAST, "trainer.max_epochs=2", "seed=1,2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in result.stdout + result.stderr
    (start0, end0), (start1, end1) = _span(sweep / "0" / "hep.log"), _span(sweep / "1" / "hep.log")
    assert start1 < end0 and start0 < end1, f"jobs ran one after the other: {start0}-{end0}, {start1}-{end1}"
    with open(sweep / "summary.csv") as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["completed", "completed"]


def test_local_parallel_preset():
    cfg = _compose("hydra/launcher=local_parallel")
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher") and cfg.hydra.launcher.n_jobs == 2


@pytest.fixture
def fake_srun(tmp_path, monkeypatch):
    """submitit's SLURM executor only checks that `srun` exists before writing the sbatch script."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_slurm_preset_gives_the_sbatch_script(tmp_path, fake_srun, monkeypatch):
    import submitit

    cfg = _compose("hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.account=proj42",
                   "hydra.launcher.gpus_per_node=4", "hydra.launcher.tasks_per_node=4",
                   f"hydra.sweep.dir={tmp_path / 'sweep'}")
    launcher = instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "SlurmLauncher"
    launcher.setup(hydra_context=None, task_function=lambda c: None, config=cfg)
    submitted = []
    monkeypatch.setattr(submitit.AutoExecutor, "map_array", lambda self, fn, *args: submitted.append((self, args))
                        or [])
    launcher.launch([["seed=1"], ["seed=2"]], initial_job_idx=0)
    executor, args = submitted[0]
    assert args[0] == (["seed=1"], ["seed=2"]) and args[2] == (0, 1)
    script = executor._executor._make_submission_file_text("python -m submitit.core._submit", "uid")
    for line in ("--partition=gpu", "--account=proj42", "--time=120", "--gpus-per-node=4",
                 "--ntasks-per-node=4", "--cpus-per-task=8", "--mem=32GB", "--nodes=1"):
        assert f"#SBATCH {line}" in script, line
    assert executor._executor.max_num_timeout == 3


def test_ray_preset_composes_and_instantiates():
    from hydra_plugins.hydra_ray_launcher.ray_launcher import RayLauncher

    cfg = _compose("hydra/launcher=ray_jobs", "hydra.launcher.ray.remote.num_gpus=1")
    launcher = instantiate(cfg.hydra.launcher)  # does not start Ray; ray.init runs in launch()
    assert type(launcher).__name__ == "RayJobsLauncher" and isinstance(launcher, RayLauncher)
    # null, not absent: hydra-ray-launcher would otherwise pass 75 MB, which a running cluster refuses
    assert dict(cfg.hydra.launcher.ray.init) == {"address": None, "object_store_memory": None}
    assert dict(cfg.hydra.launcher.ray.remote) == {"num_cpus": 1, "num_gpus": 1, "max_retries": 0}


def test_ray_refuses_multi_node_jobs_before_launch(tmp_path):
    result = sciml("-m", "+plugin=hep", "hydra/launcher=ray_jobs", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                   "strategy=ddp", "trainer.num_nodes=2", "seed=1,2", env={"RAY_ADDRESS": "127.0.0.1:9"})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[0] == (
        "hydra/launcher=ray_jobs runs each job's ranks on one node, but job #0 has trainer.num_nodes=2: use "
        "hydra/launcher=slurm or torchrun for multi-node jobs")
    assert not list((tmp_path / "sweep").glob("*/")), "no job may have started"  # Hydra's multirun.yaml only


def test_sweep_directory_is_computed_once_by_the_submitting_process(monkeypatch):
    """Each job of a SLURM array has its own SLURM_JOB_ID. The job's config (Hydra's load_sweep_config copies the
    resolver cache of the submitting process's config, which the launcher pickles to the job) keeps the sweep
    directory the submitting process computed."""
    register_resolvers()
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "100")  # the submitting process, itself in a SLURM job
    submitting = OmegaConf.create({"dir": "multirun/hep/${sciml.launch_id:2026-01-01/10-00-00}"})
    assert submitting.dir == "multirun/hep/slurm-100"
    monkeypatch.setenv("SLURM_JOB_ID", "101")  # array task 0
    job = OmegaConf.create({"dir": "multirun/hep/${sciml.launch_id:2026-01-01/10-00-00}"})
    OmegaConf.copy_cache(from_config=submitting, to_config=job)
    assert job.dir == "multirun/hep/slurm-100"
    assert OmegaConf.create({"dir": "${sciml.launch_id:x}"}).dir == "slurm-101"  # a run of its own: its job id


def test_search_experiment_composes_with_a_cluster_launcher():
    cfg = _compose("+experiment=hep_arch_search", "hydra/launcher=slurm")
    assert cfg.hydra.sweeper._target_ == "hydra_plugins.sciml_sweepers.OptunaSweeper"
    assert cfg.hydra.sweeper.sampler == "nsga2" and list(cfg.hydra.sweeper.objectives) == ["val/auc_best",
                                                                                          "model/params"]
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.model.pool == "max" and cfg.model.batch_norm is False and cfg.trainer.max_epochs == 4
