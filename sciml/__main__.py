"""The command line.

    python -m sciml +plugin=NAME [overrides]         train, test and predict (Hydra; `-m` for sweeps)
    python -m sciml predict CKPT INPUT... [-o DIR] [overrides]
                                                     predict (and score, when labelled) files with a checkpoint
    python -m sciml --list-plugins
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from sciml import launchers, plugins, searchpath, sweepers
from sciml.errors import SciMLError

# Hydra flags that only print information: they need no plugin.
_INFO_FLAGS = {"--help", "-h", "--hydra-help", "--info", "-i", "--cfg", "-c", "--version", "--shell-completion", "-sc"}


def _plugin_names(argv: list[str]) -> list[str] | None:
    """Plugin names requested on the command line (several under a sweep), None when no `plugin` override."""
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType

    try:
        args, _ = get_args_parser().parse_known_args(argv)
        overrides = OverridesParser.create().parse_overrides(args.overrides)
    except Exception:  # let Hydra report malformed command lines in its own words
        return None
    for override in overrides:
        if override.key_or_group != "plugin":
            continue
        if override.type != OverrideType.ADD:
            raise SciMLError(f"select the plugin with '+plugin=...', not '{override.input_line}' "
                             "(plugin is not in the defaults list)")
        if override.is_sweep_override():
            return list(override.sweep_string_iterator())
        return [str(override.value())]
    return None


def check_command_line(argv: list[str]) -> list[str] | None:
    """The plugins the command line selects (None for Hydra's information flags without one); a missing or unknown
    plugin is a one-line error naming the installed plugins."""
    names = _plugin_names(argv)
    if names is None and any(a.split("=")[0] in _INFO_FLAGS for a in argv):
        return None
    available = plugins.installed()
    if names is None:
        raise SciMLError(f"no plugin selected: add +plugin=NAME (installed plugins: {', '.join(available)})")
    for name in names:
        plugins.load(name)  # raises a one-line error naming the installed plugins
    return names


def predict_command(argv: list[str]) -> list[str]:
    """`predict CKPT INPUT... [-o DIR] [overrides]` as the Hydra command line of a test-only run: the plugin and
    the data, model and task config come from the checkpoint (sciml.run.with_checkpoint_config)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m sciml predict",
                                     description="Predict files with a trained checkpoint; labelled files are also "
                                                 "scored (metrics.json). Extra KEY=VALUE overrides are passed on.")
    parser.add_argument("checkpoint", help="a checkpoint of a sciml run (RUN/checkpoints/best-*.ckpt or last.ckpt)")
    parser.add_argument("inputs", nargs="+", help="files, folders or globs in the plugin's format")
    parser.add_argument("-o", "--output", help="run directory for the predictions (default: "
                                               "outputs/NAME/predict/DATE/TIME)")
    args, rest = parser.parse_known_args(argv)
    inputs = [a for a in args.inputs if "=" not in a]
    overrides = rest + [a for a in args.inputs if "=" in a]
    if not inputs:
        raise SciMLError("predict: no input files given")
    from sciml.run import saved_config  # torch only now: a checkpoint is read

    record = saved_config(args.checkpoint)
    if not record or not record.get("plugin"):
        raise SciMLError(f"predict: {args.checkpoint} carries no sciml config (written by an older sciml?); use "
                         "+plugin=NAME train=false ckpt_path=... with the training overrides instead")
    paths = ",".join(_quote(str(Path(p).absolute())) for p in inputs)  # globs too: absolute() does not resolve
    name = record["config"].get("name", record["plugin"])
    out = args.output or f"outputs/{name}/predict/${{now:%Y-%m-%d}}/${{now:%H-%M-%S}}"
    return [f"+plugin={record['plugin']}", "train=false", f"ckpt_path={_quote(str(Path(args.checkpoint).absolute()))}",
            f"data.test_path=[{paths}]", f"hydra.run.dir={_quote(out) if args.output else out}", *overrides]


def _quote(text: str) -> str:
    """A value for Hydra's override grammar, quoted so that any path survives it."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def launch_id(default: str) -> str:
    """Run-directory name shared by every rank of one launch (resolver `sciml.launch_id`, used by
    conf/hydra/default.yaml): ranks started by srun or torchrun each run Hydra themselves, and a timestamp per
    process could differ between them.

    `slurm-<SLURM_JOB_ID>` inside a SLURM job; `torchrun-<TORCHELASTIC_RUN_ID>` under torchrun with a rendezvous id
    (`--standalone` or `--rdzv-id`; plain torchrun's id is "none"); otherwise `default` (the timestamp path).
    `hydra.run.dir=DIR` always wins.

    A multirun's sweep directory is computed once, by the process that launches the sweep: the resolver is cached
    (like Hydra's `now`), and Hydra copies the cache into each job's config, which launchers pickle to the job. So
    the jobs of a `hydra/launcher=slurm` array (each a SLURM job with its own id) or of a Ray sweep all land in the
    sweep directory of the submitting process.
    """
    if os.environ.get("SLURM_JOB_ID"):
        return f"slurm-{os.environ['SLURM_JOB_ID']}"
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id and run_id != "none":
        return f"torchrun-{run_id}"
    return default


def register_resolvers() -> None:
    # At import as well as in main(): launchers that run jobs in other processes (Ray workers, submitit's SLURM
    # jobs) unpickle the task function from this module and then resolve the job's config, which needs the resolver
    # registered there too (its cached value comes with the config).
    OmegaConf.register_new_resolver("sciml.launch_id", launch_id, replace=True, use_cache=True)


register_resolvers()


@hydra.main(config_path="pkg://sciml.conf", config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float | None:
    from sciml.run import run_job  # heavy imports (torch, Lightning) only once a job really runs

    return run_job(cfg)


def main() -> None:
    argv = sys.argv[1:]
    if argv[:1] == ["--list-plugins"]:
        for plugin in plugins.load_all():
            print(f"{plugin.name:12s} {plugin.description}")
        return
    try:
        if argv[:1] == ["predict"]:
            argv = predict_command(argv[1:])
            sys.argv = [sys.argv[0], *argv]  # Hydra reads sys.argv; DDP children re-run it
        names = check_command_line(argv)
    except SciMLError as exc:
        print(f"sciml: error: {exc}", file=sys.stderr)
        sys.exit(2)
    setup(names)
    _hydra_main()


def setup(plugin_names: list[str] | None = None) -> None:
    """Everything sciml registers before Hydra composes, in one explicit call: the selected plugins' config folders
    (all installed plugins when none is selected) on the search path, the Optuna sweeper, the run-directory
    resolver, the Ray launcher, the hybrid strategy and the Hydra-aware DDP launcher."""
    from sciml import distributed

    searchpath.register(plugin_names)
    sweepers.register()  # hydra/sweeper=optuna
    launchers.register()  # hydra/launcher=ray_jobs
    register_resolvers()
    distributed.setup()


if __name__ == "__main__":
    main()
