"""`hydra/launcher=ray_jobs`: each sweep job is one Ray task, on a local Ray instance or a running Ray cluster.

hydra-ray-launcher's `RayLauncher` with what a sweep of sciml jobs needs on a real cluster:

* **No `object_store_memory` of its own.** The plugin adds 75 MB when the key is absent, which `ray.init` refuses
  when it connects to a running cluster; here it is only passed when the preset sets it.
* **The job runs in the sweep's working directory.** A Ray worker starts in the directory its raylet was started
  from, so relative paths (the sweep directory `multirun/...`, `data.path=...`) would resolve elsewhere than in
  the submitting process. The worker changes to `hydra.runtime.cwd`, the submitting process's directory; on
  several nodes that directory must be on a shared file system.
* **DDP inside a job works.** Lightning starts ranks 1..N-1 by re-running the application's command; inside a Ray
  worker `sys.argv` is Ray's worker script. The job gets the submitting process's command
  (`sciml.distributed.launch.app_command`). A job's ranks run on the node of its task, so `trainer.num_nodes`
  above 1 is refused before anything is launched (one line), and the job should reserve the CPUs/GPUs of all its
  ranks (`hydra.launcher.ray.remote.num_cpus`/`num_gpus`).
* **Every job is recorded.** A job whose worker dies (a rank's failure makes Lightning kill the worker, out of
  memory, a lost node) is not retried (`max_retries: 0` unless the preset says otherwise: a retried training would
  start from scratch and hide the failure) and is returned to the sweep as a failed job, with its `job_status.json`
  written, so that `summary.csv` lists it.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.errors import CompactHydraException
from hydra_plugins.hydra_ray_launcher.ray_launcher import RayLauncher
from omegaconf import DictConfig, OmegaConf, open_dict

from sciml import sweep_summary
from sciml.distributed import launch as ddp_launch

log = logging.getLogger(__name__)


class RayJobFailed(CompactHydraException):
    """A job whose Ray task ended without a result (its worker died)."""


class RayLaunchRefused(CompactHydraException):
    """A sweep this launcher cannot run; raised before any job starts."""


class RayJobsLauncher(RayLauncher):
    """hydra-ray-launcher's launcher, running each job (DDP jobs included) in a Ray task and recording jobs whose
    worker died."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import ray  # here, not at import: `python -m sciml` registers this launcher on every start

        setup_globals()
        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)

        configs = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = f"job_id_for_{idx}"
                sweep_config.hydra.job.num = idx
            _check_supported(sweep_config, idx)
            configs.append((idx, list(overrides), sweep_config))

        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info(f"Ray launcher: {len(job_overrides)} jobs, sweep output dir: {sweep_dir}")
        init = {k: v for k, v in OmegaConf.to_container(self.ray_cfg.init, resolve=True).items()
                if not (k == "object_store_memory" and v is None)}
        if not ray.is_initialized():
            ray.init(**init)
        remote = {"max_retries": 0, **OmegaConf.to_container(self.ray_cfg.remote or {}, resolve=True)}
        run_remote = ray.remote(**remote)(_run_job)
        command = ddp_launch.app_command()

        refs = []
        for idx, overrides, sweep_config in configs:
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            refs.append(run_remote.remote(self.hydra_context, sweep_config, self.task_function,
                                          Singleton.get_state(), command))
        return [self._result(ref, idx, overrides, sweep_config)
                for ref, (idx, overrides, sweep_config) in zip(refs, configs)]

    def _result(self, ref: Any, idx: int, overrides: list[str], sweep_config: DictConfig) -> JobReturn:
        import ray

        try:
            return ray.get(ref)
        except ray.exceptions.RayError as exc:
            # The task function records its own failures; this is a worker that died before it could.
            message = " ".join(f"{type(exc).__name__}: {exc}".split())[:2000]
            log.error(f"job #{idx} ended without a result: {message}")
            sweep_dir = Path(str(sweep_config.hydra.sweep.dir))
            job_dir = sweep_dir / str(sweep_config.hydra.sweep.subdir)
            sweep_summary.record_failed_job(sweep_dir, job_dir, idx, overrides, message)
            return JobReturn(overrides=overrides, cfg=sweep_config, working_dir=str(job_dir),
                             task_name=sweep_config.hydra.job.name, status=JobStatus.FAILED,
                             _return_value=RayJobFailed(f"job #{idx} ({' '.join(overrides)}): {message}"))


# Hydra's class path for it (sciml/launchers/__init__.py publishes that module); the class is never pickled.
RayJobsLauncher.__module__ = "hydra_plugins.sciml_launchers"


def _check_supported(cfg: DictConfig, idx: int) -> None:
    nodes = OmegaConf.select(cfg, "trainer.num_nodes", default=1) or 1
    if int(nodes) > 1:
        raise RayLaunchRefused(
            f"hydra/launcher=ray_jobs runs each job's ranks on one node, but job #{idx} has trainer.num_nodes="
            f"{nodes}: use hydra/launcher=slurm or torchrun for multi-node jobs")


def _run_job(hydra_context: Any, sweep_config: DictConfig, task_function: Any, singleton_state: dict,
             command: list[str]) -> JobReturn:
    """One job in a Ray worker: the submitting process's working directory and application command."""
    setup_globals()
    Singleton.set_state(singleton_state)
    HydraConfig.instance().set_config(sweep_config)
    os.chdir(sweep_config.hydra.runtime.cwd)
    with ddp_launch.app_command_set(command):
        return run_job(hydra_context=hydra_context, task_function=task_function, config=sweep_config,
                       job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
