"""A Hydra sweeper on Optuna 5: ask a batch of trials, launch them through Hydra's configured launcher (basic,
joblib, submitit, ray), tell Optuna the results, repeat until `n_trials` trials have been evaluated.

Why our own: hydra-optuna-sweeper pins optuna < 3 and its SQLite storage fails with SQLAlchemy 2. This one keeps
the study in an Optuna journal file in the sweep directory (`optuna.journal`), so a sweep re-run with the same
`hydra.sweep.dir` resumes: `n_trials` counts evaluated trials in total across runs, and trials that were running
when the sweep was interrupted are marked failed and asked again.

Objectives: the task's returned value is `objective` (e.g. test/auc); further objectives (model/params,
train/samples_per_s, ...) are read from each job's metrics.json, the run contract. A job that fails, returns
nothing or gives a non-finite value is told to Optuna as FAIL and the sweep goes on.
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from sciml.sweepers.errors import SweepError

log = logging.getLogger(__name__)

SAMPLERS = ("tpe", "cmaes", "random", "nsga2")
_DIRECTIONS = {"max": "maximize", "maximize": "maximize", "min": "minimize", "minimize": "minimize"}


class OptunaSweeper(Sweeper):
    """Hydra sweeper: Optuna 5 ask/tell search over the sweep overrides, jobs run by Hydra's launcher."""
    def __init__(self, sampler: str = "tpe", seed: int | None = None, n_trials: int = 20, batch_size: int = 1,
                 objectives: Sequence[str] | None = None, directions: Sequence[str] | None = None,
                 study_name: str | None = None, storage: str | None = None,
                 params: DictConfig | dict | None = None, sampler_options: DictConfig | dict | None = None):
        if sampler not in SAMPLERS:
            raise SweepError(f"hydra.sweeper.sampler: unknown sampler '{sampler}', expected one of "
                             f"{', '.join(SAMPLERS)}")
        for key, value in (("n_trials", n_trials), ("batch_size", batch_size)):
            if not isinstance(value, int) or value < 1:
                raise SweepError(f"hydra.sweeper.{key} must be an integer >= 1, got {value!r}")
        self.sampler_name, self.seed, self.n_trials, self.batch_size = sampler, seed, n_trials, batch_size
        self.objectives = list(objectives) if objectives else None
        self.directions = list(directions) if directions else None
        self.study_name, self.storage = study_name, storage
        self.params = _plain(params) or {}
        self.sampler_options = _plain(sampler_options) or {}
        self.config: DictConfig | None = None
        self.launcher = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context,
                                                               task_function=task_function, config=config)

    # ---------------------------------------------------------------------------------------------------- sweep
    def sweep(self, arguments: list[str]) -> list[JobReturn]:
        from optuna.trial import TrialState

        from sciml.sweepers import report, space

        assert self.config is not None and self.launcher is not None
        objectives, directions = self._objectives()
        lines = [f"{k}={v}" for k, v in self.params.items()] + list(arguments)
        distributions, fixed = space.parse(lines)
        if not distributions:
            raise SweepError("the search space is empty: give hydra.sweeper.params or sweep overrides such as "
                             "'model.hidden=choice(16,32,64)'")
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        study = self._study(sweep_dir, directions)
        self._requeue_interrupted(study)

        log.info("Optuna %s sampler, %d trials in batches of %d, objectives %s; study: %s", self.sampler_name,
                 self.n_trials, self.batch_size,
                 ", ".join(f"{o} ({d})" for o, d in zip(objectives, directions)), self._storage_path(sweep_dir))
        log.info("search space: %s", ", ".join(f"{k}: {d}" for k, d in distributions.items()))
        returns: list[JobReturn] = []
        while (todo := self.n_trials - _evaluated(study)) > 0:
            trials = [study.ask(distributions) for _ in range(min(self.batch_size, todo))]
            batch = []
            for trial in trials:
                chosen = {key: space.override_value(trial.params[key]) for key in distributions}
                trial.set_user_attr("params_overrides", chosen)
                batch.append([*(f"{k}={v}" for k, v in fixed.items()), *(f"{k}={v}" for k, v in chosen.items())])
            self.validate_batch_is_legal(batch)
            results = self._launch(trials, batch)
            for trial, result in zip(trials, results):
                values, error = self._values(result, objectives)
                trial.set_user_attr("evaluated", True)
                trial.set_user_attr("job_dir", _job_dir(result))
                if error:
                    trial.set_user_attr("error", error)
                    study.tell(trial, state=TrialState.FAIL)
                    log.warning("trial %d failed: %s", trial.number, error)
                else:
                    study.tell(trial, values)
                    log.info("trial %d: %s", trial.number,
                             ", ".join(f"{o}={v:.5g}" for o, v in zip(objectives, values)))
            returns.extend(results)

        best = report.write(study, sweep_dir, objectives, self._base_overrides(distributions))
        failed = sum(t.state == TrialState.FAIL and bool(t.user_attrs.get("error"))
                     for t in study.get_trials(deepcopy=False))
        if best is None:
            errors = [t.user_attrs["error"] for t in study.get_trials(deepcopy=False) if t.user_attrs.get("error")]
            raise SweepError(f"all {failed} trials of the sweep failed (see {sweep_dir}/trials.csv); "
                             f"first error: {errors[0] if errors else 'unknown'}")
        log.info("%d trials evaluated (%d failed); Pareto table %s, plot %s", _evaluated(study), failed,
                 sweep_dir / "pareto.md", sweep_dir / "pareto.png")
        log.info("best trial %d %s; re-train it with:\n  %s", best["trial"], best["objectives"], best["command"])
        return returns

    # ------------------------------------------------------------------------------------------------- helpers
    def _objectives(self) -> tuple[list[str], list[str]]:
        objectives = self.objectives or [str(self.config.objective)]
        directions = self.directions
        if directions is None:
            if len(objectives) > 1 or objectives[0] != self.config.objective:
                raise SweepError("hydra.sweeper.directions: give maximize/minimize for each of "
                                 f"hydra.sweeper.objectives {objectives}")
            directions = [self.config.get("objective_mode", "min")]
        if len(directions) != len(objectives):
            raise SweepError(f"hydra.sweeper.directions has {len(directions)} entries for {len(objectives)} "
                             f"objectives {objectives}")
        bad = [d for d in directions if d not in _DIRECTIONS]
        if bad:
            raise SweepError(f"hydra.sweeper.directions: '{bad[0]}' is not maximize or minimize")
        if self.sampler_name == "cmaes" and len(objectives) > 1:
            raise SweepError("hydra.sweeper.sampler=cmaes optimises one objective; use nsga2 or tpe for "
                             f"{len(objectives)} objectives")
        return objectives, [_DIRECTIONS[d] for d in directions]

    def _storage_path(self, sweep_dir: Path) -> Path:
        return Path(self.storage) if self.storage else sweep_dir / "optuna.journal"

    def _study(self, sweep_dir: Path, directions: list[str]):
        import optuna
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        path = self._storage_path(sweep_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        storage = JournalStorage(JournalFileBackend(str(path)))
        name = self.study_name or str(self.config.get("name", "sciml"))
        try:
            study = optuna.create_study(storage=storage, study_name=name, sampler=self._sampler(),
                                        directions=directions, load_if_exists=True)
        except Exception as exc:
            raise SweepError(f"{path}: cannot open study '{name}': {' '.join(str(exc).split())}") from None
        if [d.name.lower() for d in study.directions] != directions:
            raise SweepError(f"{path}: study '{name}' was created with directions "
                             f"{[d.name.lower() for d in study.directions]}, this sweep asks for {directions}; "
                             "use a new hydra.sweep.dir")
        return study

    def _sampler(self):
        import optuna

        kwargs = {"seed": self.seed, **self.sampler_options}
        kind = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler,
                "cmaes": optuna.samplers.CmaEsSampler, "nsga2": optuna.samplers.NSGAIISampler}[self.sampler_name]
        try:
            return kind(**kwargs)
        except TypeError as exc:
            raise SweepError(f"hydra.sweeper.sampler_options: {exc}") from None

    def _requeue_interrupted(self, study) -> None:
        """Trials left RUNNING by an interrupted sweep: told FAIL (they never finished) and asked again."""
        from optuna.trial import TrialState

        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
            study.enqueue_trial(trial.params, user_attrs={"rerun_of": trial.number}, skip_if_exists=False)
            log.info("trial %d was interrupted; it is asked again", trial.number)

    def _launch(self, trials, batch: list[list[str]]) -> list[JobReturn]:
        """Launch a batch; the job number (the job's sub-directory) is the trial number. Trials asked in one batch
        are numbered consecutively; a gap (another process sharing the study) starts a new launch."""
        results: list[JobReturn] = []
        start = 0
        for i in range(1, len(trials) + 1):
            if i == len(trials) or trials[i].number != trials[i - 1].number + 1:
                results.extend(self.launcher.launch(batch[start:i], initial_job_idx=trials[start].number))
                start = i
        return results

    def _values(self, result: JobReturn, objectives: list[str]) -> tuple[list[float] | None, str | None]:
        if result.status != JobStatus.COMPLETED:
            return None, " ".join(str(result._return_value).split()) or "job failed"
        metrics: dict[str, Any] = {}
        job_dir = _job_dir(result)
        if job_dir and (Path(job_dir) / "metrics.json").is_file():
            metrics = json.loads((Path(job_dir) / "metrics.json").read_text())
        if result._return_value is not None:
            metrics[str(self.config.objective)] = result._return_value
        values = []
        for name in objectives:
            if name not in metrics:
                return None, f"objective '{name}' not in {job_dir}/metrics.json"
            value = float(metrics[name])
            if not math.isfinite(value):
                return None, f"objective '{name}' is {value}"
            values.append(value)
        return values, None

    def _base_overrides(self, distributions: dict) -> list[str]:
        """The command line's task overrides without the searched keys: with a trial's values they re-train it."""
        task = list(OmegaConf.select(self.config, "hydra.overrides.task", default=[]) or [])
        keep = []
        for line in task:
            key = line.split("=", 1)[0].lstrip("+~")
            if key not in distributions:
                keep.append(line)
        return keep


def _evaluated(study) -> int:
    return sum(bool(t.user_attrs.get("evaluated")) for t in study.get_trials(deepcopy=False))


def _job_dir(result: JobReturn) -> str | None:
    return OmegaConf.select(result.hydra_cfg, "hydra.runtime.output_dir") if result.hydra_cfg else None


def _plain(node):
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
