"""The Optuna search sweeper (hydra/sweeper=optuna): search-space syntax, samplers, batches, failures, resume
(in-process, with a launcher that evaluates a known function), and one real multi-objective HEP search through
the CLI that writes the Pareto table and plot, resumes, and whose best command re-trains the best network."""
import csv
import json
import math
import shlex

import optuna
import pytest
import yaml
from conftest import FAST, sciml, write_h5
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from sciml.sweepers import OptunaSweeper
from sciml.sweepers.errors import SweepError
from sciml.sweepers.space import parse


# ------------------------------------------------------------------------------------------- search-space syntax
def test_hydra_sweep_syntax_to_optuna_distributions():
    space, fixed = parse(["model.widths=choice([8,16],[16,32,32])", "model.kernel_size=range(3,9,2)",
                          "optimizer.lr=tag(log,interval(1e-4,1e-2))", "model.dropout=interval(0,0.5)",
                          "model.batch_norm=choice(true,false)", "x=range(0,1,0.25)", "model.hidden=64"])
    assert space["model.widths"] == CategoricalDistribution(["[8,16]", "[16,32,32]"])  # override strings
    assert space["model.kernel_size"] == IntDistribution(3, 7, step=2)  # Hydra's range excludes its stop
    assert space["optimizer.lr"] == FloatDistribution(1e-4, 1e-2, log=True)
    assert space["model.dropout"] == FloatDistribution(0.0, 0.5)
    assert space["model.batch_norm"] == CategoricalDistribution([True, False])
    assert space["x"] == FloatDistribution(0.0, 0.75, step=0.25)
    assert fixed == {"model.hidden": "64"}


@pytest.mark.parametrize("line, message", [
    ("a=tag(log,interval(0,1))", "log interval needs start > 0"),
    ("a=interval(2,1)", "needs start < end"),
    ("a=choice(1,1)", "repeats a choice"),
    ("a=range(3,3)", "is empty"),
    ("a=choice(1", "search space"),
])
def test_bad_search_space_is_named(line, message):
    with pytest.raises(SweepError, match=message):
        parse([line])


# ------------------------------------------------------------------ the sweep loop, with a launcher that computes
class FunctionLauncher:
    """Stands in for Hydra's launcher: each job 'trains' by evaluating f(x, y) and writes metrics.json."""

    def __init__(self, sweep_dir, fail_if=lambda x: False):
        self.sweep_dir, self.fail_if, self.batches = sweep_dir, fail_if, []

    def launch(self, job_overrides, initial_job_idx):
        self.batches.append((initial_job_idx, [list(o) for o in job_overrides]))
        returns = []
        for i, overrides in enumerate(job_overrides):
            values = {k: v for k, v in (o.split("=", 1) for o in overrides)}
            x, shape = float(values["x"]), values.get("shape", "round")
            out = self.sweep_dir / str(initial_job_idx + i)
            out.mkdir(parents=True)
            result = JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED,
                               hydra_cfg=OmegaConf.create({"hydra": {"runtime": {"output_dir": str(out)}}}))
            if self.fail_if(x):
                result.status, result.return_value = JobStatus.FAILED, RuntimeError(f"diverged at x={x}")
            else:
                loss = (x - 2.0) ** 2 + (0.5 if shape == "square" else 0.0)
                (out / "metrics.json").write_text(json.dumps({"val/loss": loss, "model/params": 10 + abs(x)}))
                result.return_value = loss
            returns.append(result)
        return returns


def _sweeper(tmp_path, launcher=None, **kwargs):
    sweeper = OptunaSweeper(**{"seed": 0, **kwargs})
    sweeper.config = OmegaConf.create({
        "name": "t", "objective": "val/loss", "objective_mode": "min",
        "hydra": {"sweep": {"dir": str(tmp_path)}, "overrides": {"task": ["+plugin=none", "x=interval(-5,5)"]}}})
    sweeper.launcher = launcher or FunctionLauncher(tmp_path)
    sweeper.validate_batch_is_legal = lambda batch: None  # no Hydra config loader in this in-process check
    return sweeper


def _study(tmp_path, name="t"):
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(tmp_path / "optuna.journal")))
    return optuna.load_study(study_name=name, storage=storage)


@pytest.mark.parametrize("sampler", ["tpe", "cmaes", "random"])
def test_single_objective_samplers_minimise_a_known_function(tmp_path, sampler):
    sweeper = _sweeper(tmp_path, sampler=sampler, n_trials=24, batch_size=4)
    sweeper.sweep(["x=interval(-5,5)", "shape=choice(round,square)" if sampler != "cmaes" else "shape=round"])
    study = _study(tmp_path)
    assert len(study.trials) == 24
    assert [b[0] for b in sweeper.launcher.batches] == [0, 4, 8, 12, 16, 20], "batches of 4, job num = trial"
    best = study.best_trial
    assert best.value == pytest.approx((best.params["x"] - 2) ** 2 + (0.5 if best.params.get("shape") == "square"
                                                                         else 0))
    assert best.value < 0.5, f"{sampler} should get near the minimum at x=2 in 24 trials, got {best.params}"
    front = list(csv.DictReader(open(tmp_path / "pareto.csv")))
    assert float(front[0]["val/loss"]) == pytest.approx(best.value), "single objective: trials ranked, best first"
    assert yaml.safe_load((tmp_path / "best.yaml").read_text())["trial"] == best.number


def test_failed_trials_are_told_fail_and_the_sweep_goes_on(tmp_path):
    sweeper = _sweeper(tmp_path, sampler="random", n_trials=12, batch_size=3,
                       launcher=FunctionLauncher(tmp_path, fail_if=lambda x: x < 0))
    sweeper.sweep(["x=interval(-5,5)"])
    study = _study(tmp_path)
    states = {t.number: t.state.name for t in study.trials}
    failed = [t for t in study.trials if t.state.name == "FAIL"]
    assert len(states) == 12 and failed and all(t.params["x"] < 0 for t in failed)
    assert all(t.params["x"] >= 0 for t in study.trials if t.state.name == "COMPLETE")
    assert "diverged at x=" in failed[0].user_attrs["error"]
    rows = list(csv.DictReader(open(tmp_path / "trials.csv")))
    assert sum(r["state"] == "fail" for r in rows) == len(failed)


def test_every_trial_failing_is_a_clear_error(tmp_path):
    sweeper = _sweeper(tmp_path, sampler="random", n_trials=2, launcher=FunctionLauncher(tmp_path, lambda x: True))
    with pytest.raises(SweepError, match="all 2 trials of the sweep failed.*diverged at x="):
        sweeper.sweep(["x=interval(-5,5)"])


def test_resume_counts_trials_in_total_and_reruns_interrupted_ones(tmp_path):
    _sweeper(tmp_path, sampler="tpe", n_trials=3).sweep(["x=interval(-5,5)"])
    # a sweep killed while trial 3 was running leaves it RUNNING in the journal
    interrupted = _study(tmp_path).ask({"x": FloatDistribution(-5, 5)})
    resumed = _sweeper(tmp_path, sampler="tpe", n_trials=6)
    resumed.sweep(["x=interval(-5,5)"])
    trials = _study(tmp_path).trials
    evaluated = [t for t in trials if t.user_attrs.get("evaluated")]
    assert len(evaluated) == 6, "n_trials counts evaluated trials across runs"
    assert trials[interrupted.number].state.name == "FAIL" and not trials[interrupted.number].user_attrs.get("evaluated")
    rerun = [t for t in trials if t.user_attrs.get("rerun_of") == interrupted.number]
    assert len(rerun) == 1 and rerun[0].params["x"] == interrupted.params["x"] and rerun[0].state.name == "COMPLETE"
    assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [0, 1, 2, 4, 5, 6]
    rows = {int(r["trial"]): r["state"] for r in csv.DictReader(open(tmp_path / "trials.csv"))}
    assert rows[interrupted.number] == "interrupted" and list(rows.values()).count("complete") == 6
    _sweeper(tmp_path, sampler="tpe", n_trials=6).sweep(["x=interval(-5,5)"])  # already done: nothing launched
    assert len(_study(tmp_path).trials) == len(trials)


def test_multi_objective_front_is_non_dominated(tmp_path):
    sweeper = _sweeper(tmp_path, sampler="nsga2", n_trials=16, batch_size=4, objectives=["val/loss", "model/params"],
                       directions=["minimize", "minimize"], sampler_options={"population_size": 4})
    sweeper.sweep(["x=interval(-5,5)"])
    done = [t for t in _study(tmp_path).trials if t.state.name == "COMPLETE"]
    front = list(csv.DictReader(open(tmp_path / "pareto.csv")))
    points = [(float(r["val/loss"]), float(r["model/params"])) for r in front]
    for loss, params in points:  # nothing evaluated is better on both objectives
        assert not any(t.values[0] < loss and t.values[1] < params for t in done)
    for t in done:  # everything not on the front is dominated by a front member
        if (t.values[0], t.values[1]) not in points:
            assert any(lo <= t.values[0] and pa <= t.values[1] for lo, pa in points)
    assert (tmp_path / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert float(front[0]["val/loss"]) == min(p[0] for p in points), "best = front's best on the first objective"


@pytest.mark.parametrize("kwargs, message", [
    ({"sampler": "grid"}, "unknown sampler 'grid'"),
    ({"n_trials": 0}, "n_trials must be an integer >= 1"),
    ({"sampler": "cmaes", "objectives": ["val/loss", "model/params"], "directions": ["minimize", "minimize"]},
     "cmaes optimises one objective"),
    ({"objectives": ["val/loss", "model/params"]}, "directions: give maximize/minimize"),
    ({"objectives": ["val/loss"], "directions": ["up"]}, "'up' is not maximize or minimize"),
])
def test_bad_sweeper_settings_are_named(tmp_path, kwargs, message):
    with pytest.raises(SweepError, match=message):
        _sweeper(tmp_path, **kwargs).sweep(["x=interval(-5,5)"])


def test_changed_directions_on_resume_are_refused(tmp_path):
    _sweeper(tmp_path, n_trials=1).sweep(["x=interval(-5,5)"])
    with pytest.raises(SweepError, match="created with directions"):
        _sweeper(tmp_path, n_trials=2, objectives=["val/loss"], directions=["maximize"]).sweep(["x=interval(-5,5)"])


# ----------------------------------------------------------------------------- end to end: python -m sciml -m
SEARCH = ["hydra/sweeper=optuna", "hydra.sweeper.sampler=nsga2", "hydra.sweeper.seed=0", "hydra.sweeper.batch_size=2",
          "+hydra.sweeper.sampler_options.population_size=2",
          "hydra.sweeper.objectives=[test/auc,model/params]", "hydra.sweeper.directions=[maximize,minimize]",
          "model.widths=choice([4],[8,8],[4,4,4,4,4])",  # five pooling units do not fit 16x16 images: fails
          "model.hidden=choice(0,16)", "trainer.max_epochs=1"]


def test_cli_multi_objective_search_resumes_and_retrains_the_best(tmp_path):
    data = write_h5(tmp_path / "images.h5", n=192)
    sweep = tmp_path / "search"
    common = ["-m", "+plugin=hep", f"data.path={data}", f"hydra.sweep.dir={sweep}", *FAST, *SEARCH]
    first = sciml(*common, "hydra.sweeper.n_trials=2")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    second = sciml(*common, "hydra.sweeper.n_trials=4")  # the same sweep directory: resumes
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "Traceback" not in second.stderr

    trials = list(csv.DictReader(open(sweep / "trials.csv")))
    assert [int(t["trial"]) for t in trials] == [0, 1, 2, 3], "4 trials in total, not 2 + 4"
    for t in trials:
        if t["model.widths"] == "[4,4,4,4,4]":
            assert t["state"] == "fail" and "below one pixel" in t["error"]
        else:
            assert t["state"] == "complete"
            metrics = json.loads(open(sweep / t["trial"] / "metrics.json").read())
            assert float(t["test/auc"]) == metrics["test/auc"] and float(t["model/params"]) == metrics["model/params"]
    assert any(t["state"] == "fail" for t in trials) and any(t["state"] == "complete" for t in trials)

    front = list(csv.DictReader(open(sweep / "pareto.csv")))
    assert front and all(r["state"] == "complete" for r in front)
    assert "| trial | test/auc | model/params |" in (sweep / "pareto.md").read_text()
    assert (sweep / "pareto.png").read_bytes()[:4] == b"\x89PNG"

    best = yaml.safe_load((sweep / "best.yaml").read_text())
    retrain = tmp_path / "retrain"
    argv = shlex.split(best["command"])
    assert argv[:3] == ["python", "-m", "sciml"] and "-m" not in argv[3:]
    again = sciml(*argv[3:], f"hydra.run.dir={retrain}")
    assert again.returncode == 0, again.stderr[-3000:]
    metrics = json.loads((retrain / "metrics.json").read_text())
    assert metrics["model/params"] == best["objectives"]["model/params"], "the command rebuilds the same network"
    assert math.isclose(metrics["test/auc"], best["objectives"]["test/auc"], abs_tol=1e-6), "same seed, same run"


def test_cli_sweeper_error_is_one_line(tmp_path):
    result = sciml("-m", "+plugin=hep", "hydra/sweeper=optuna", "hydra.sweeper.sampler=grid",
                   "model.hidden=choice(8,16)", f"hydra.sweep.dir={tmp_path}")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "unknown sampler 'grid'" in result.stderr
