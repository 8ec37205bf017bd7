"""The command line: `python -m sciml +plugin=NAME [overrides]`, `python -m sciml --list-plugins`."""
from __future__ import annotations

import os
import sys

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


def check_command_line(argv: list[str]) -> None:
    if any(a.split("=")[0] in _INFO_FLAGS for a in argv):
        return
    names = _plugin_names(argv)
    available = plugins.installed()
    if names is None:
        raise SciMLError(f"no plugin selected: add +plugin=NAME (installed plugins: {', '.join(available)})")
    for name in names:
        plugins.load(name)  # raises a one-line error naming the installed plugins


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
        check_command_line(argv)
    except SciMLError as exc:
        print(f"sciml: error: {exc}", file=sys.stderr)
        sys.exit(2)
    searchpath.register()
    sweepers.register()  # hydra/sweeper=optuna
    launchers.register()  # hydra/launcher=ray_jobs
    register_resolvers()
    _hydra_main()


if __name__ == "__main__":
    main()
