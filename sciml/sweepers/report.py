"""What a search leaves in its sweep directory: every trial (trials.csv), the Pareto front (pareto.csv, pareto.md,
pareto.png) and the best configuration as overrides with the one command that re-trains it (best.yaml).

With one objective the "front" is the ranking of completed trials; with several it is Optuna's set of
non-dominated trials (`study.best_trials`). The best configuration is the front's best trial on the first
objective (ties broken by the next ones), so with `[val/auc_best, model/params]` it is the most accurate network,
and pareto.md gives the command for every other trade-off on the front.
"""
from __future__ import annotations

import csv
import io
import logging
import shlex
from pathlib import Path

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

log = logging.getLogger(__name__)


def write(study: optuna.Study, sweep_dir: Path, objectives: list[str], base_overrides: list[str]) -> dict | None:
    """The sweep's Pareto table and plot and the best trial's command; None without completed trials."""
    trials = study.get_trials(deepcopy=False)
    params = sorted({name for t in trials for name in t.params})
    _write_csv(sweep_dir / "trials.csv", [_row(t, objectives, params) for t in trials])
    front = _front(study, objectives)
    if not front:
        return None
    rows = [{**_row(t, objectives, params), "command": command(base_overrides, t)} for t in front]
    _write_csv(sweep_dir / "pareto.csv", rows)
    _write_markdown(sweep_dir / "pareto.md", rows, objectives, params)
    _plot(study, front, objectives, sweep_dir / "pareto.png")
    best = front[0]
    summary = {
        "trial": best.number,
        "job_dir": best.user_attrs.get("job_dir"),
        "objectives": dict(zip(objectives, best.values)),
        "overrides": [f"{k}={v}" for k, v in best.user_attrs.get("params_overrides", {}).items()],
        "command": command(base_overrides, best),
    }
    (sweep_dir / "best.yaml").write_text(
        "# Best trial of the search (first objective, then the next ones); re-train it with `command`.\n"
        + yaml.safe_dump(summary, sort_keys=False, width=1000))
    return summary


def command(base_overrides: list[str], trial: FrozenTrial) -> str:
    """The command line that re-trains `trial`."""
    chosen = [f"{k}={v}" for k, v in trial.user_attrs.get("params_overrides", {}).items()]
    return "python -m sciml " + shlex.join([*base_overrides, *chosen])


def _front(study: optuna.Study, objectives: list[str]) -> list[FrozenTrial]:
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if not done:
        return []
    signs = [1 if d == optuna.study.StudyDirection.MAXIMIZE else -1 for d in study.directions]
    front = done if len(objectives) == 1 else study.best_trials
    return sorted(front, key=lambda t: tuple(-s * v for s, v in zip(signs, t.values)))


def _row(trial: FrozenTrial, objectives: list[str], params: list[str]) -> dict:
    values = trial.values if trial.values is not None else [None] * len(objectives)
    state = trial.state.name.lower()
    if trial.state == TrialState.FAIL and not trial.user_attrs.get("evaluated"):
        state = "interrupted"  # running when a sweep was killed; asked again on resume
    return {"trial": trial.number, "state": state, **dict(zip(objectives, values)),
            **{p: trial.user_attrs.get("params_overrides", {}).get(p, trial.params.get(p, "")) for p in params},
            "job_dir": trial.user_attrs.get("job_dir", ""), "error": trial.user_attrs.get("error", "")}


def _write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    _atomic(path, buffer.getvalue())


def _write_markdown(path: Path, rows: list[dict], objectives: list[str], params: list[str]) -> None:
    columns = ["trial", *objectives, *params]

    def cell(value):
        if isinstance(value, float):
            return f"{value:.6g}" if abs(value) < 1e6 else f"{value:.0f}"
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    lines += ["", "Re-train a trial:", ""]
    lines += [f"- trial {r['trial']}: `{r['command']}`" for r in rows]
    _atomic(path, "\n".join(lines) + "\n")


def _plot(study: optuna.Study, front: list[FrozenTrial], objectives: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    fig, ax = plt.subplots(figsize=(6, 4.5))
    if len(objectives) == 1:
        ax.plot([t.number for t in done], [t.values[0] for t in done], "o", color="0.6", label="trial")
        best = front[0]
        ax.plot([best.number], [best.values[0]], "*", ms=14, color="C3", label=f"best (trial {best.number})")
        ax.set_xlabel("trial")
        ax.set_ylabel(objectives[0])
    else:
        # y: the first objective, x: the second (more objectives: the front is still the full non-dominated set)
        ax.plot([t.values[1] for t in done], [t.values[0] for t in done], "o", color="0.7", label="trial")
        ordered = sorted(front, key=lambda t: t.values[1])
        ax.plot([t.values[1] for t in ordered], [t.values[0] for t in ordered], "o-", color="C3",
                drawstyle="steps-post" if len(objectives) == 2 else "default", label="Pareto front")
        for t in ordered:
            ax.annotate(str(t.number), (t.values[1], t.values[0]), textcoords="offset points", xytext=(4, 4),
                        fontsize=7)
        ax.set_xlabel(objectives[1])
        ax.set_ylabel(objectives[0])
        if _positive(done, 1) and max(t.values[1] for t in done) > 20 * min(t.values[1] for t in done):
            ax.set_xscale("log")  # parameter counts span decades
    failed = sum(t.state == TrialState.FAIL and bool(t.user_attrs.get("error"))
                 for t in study.get_trials(deepcopy=False))
    ax.set_title(f"{len(done)} trials completed, {failed} failed", fontsize=10)  # interrupted ones are not counted
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def _positive(trials: list[FrozenTrial], index: int) -> bool:
    return all(t.values[index] > 0 for t in trials)


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
