"""The command line.

    python -m sciml +plugin=NAME [overrides]         train, test and predict (Hydra; `-m` for sweeps)
    python -m sciml predict CKPT INPUT... [-o DIR] [overrides]
                                                     predict (and score, when labelled) files with a checkpoint
    python -m sciml export CKPT --format onnx|torchscript [-o FILE]
                                                     the network with its input normalisation, for use outside sciml
    python -m sciml --list-plugins
"""
from __future__ import annotations

import os
import sys
from pathlib import Path


def _own_package() -> None:
    """`python -m sciml` run in the folder that holds the clone (also named sciml) imports that folder as a namespace
    package, whose `plugins` is the clone's plugins/ folder. Bind the name to this package instead; nothing has
    been imported from the namespace yet at this point."""
    import importlib.util
    from pathlib import Path

    package = sys.modules.get("sciml")
    if package is None or getattr(package, "__file__", None):
        return
    here = Path(__file__).resolve().parent
    spec = importlib.util.spec_from_file_location("sciml", here / "__init__.py", submodule_search_locations=[str(here)])
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["sciml"] = module
    spec.loader.exec_module(module)


_own_package()

import hydra  # noqa: E402 -- after the package binding above
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from sciml import launchers, plugins, searchpath, sweepers  # noqa: E402
from sciml.errors import SciMLError  # noqa: E402

# Hydra flags that only print information: they need no plugin.
_INFO_FLAGS = {"--help", "-h", "--hydra-help", "--info", "-i", "--cfg", "-c", "--version", "--shell-completion", "-sc"}


def _plugin_names(argv: list[str]) -> list[str] | None:
    """Plugin names requested on the command line (several under a sweep), None when no `plugin` override."""
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType
    from hydra.errors import OverrideParseException

    try:
        args, _ = get_args_parser().parse_known_args(argv)
        overrides = OverridesParser.create().parse_overrides(args.overrides)
    except OverrideParseException as exc:  # Hydra's own words, on one line
        raise SciMLError(f"malformed override: {'; '.join(str(exc).splitlines())}") from None
    except Exception:  # let Hydra report other malformed command lines itself
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
    """Register sciml's OmegaConf resolvers (`sciml.launch_id`)."""
    # At import as well as in main(): launchers that run jobs in other processes (Ray workers, submitit's SLURM
    # jobs) unpickle the task function from this module and then resolve the job's config, which needs the resolver
    # registered there too (its cached value comes with the config).
    OmegaConf.register_new_resolver("sciml.launch_id", launch_id, replace=True, use_cache=True)


register_resolvers()


@hydra.main(config_path="pkg://sciml.conf", config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float | None:
    from sciml.run import run_job  # heavy imports (torch, Lightning) only once a job really runs

    return run_job(cfg)


USAGE = """\
sciml: train neural networks on scientific data, from a laptop to a supercomputer.

usage:
  python -m sciml +plugin=NAME [KEY=VALUE ...]         train, test the best checkpoint, predict the test split
  python -m sciml -m +plugin=NAME KEY=A,B [...]        a sweep: one job per value, summary.csv in the sweep folder
  python -m sciml predict CKPT INPUT... [...]          predict files with a trained checkpoint alone
  python -m sciml export CKPT --format onnx|torchscript    the trained network for use outside sciml
  python -m sciml compare RUN_DIR... [--baseline SCORES.h5] [--out DIR]
                                                       overlay ROC curves and metrics of runs, write a table
  python -m sciml --list-plugins                       the installed domain plugins
  python -m sciml +plugin=NAME --cfg job               print the composed config

+plugin=NAME selects the domain (with the +). Installed plugins: {plugins}.
Any config value is overridden as KEY=VALUE (trainer.max_epochs=20 data.path=/data/run1/ optimizer=lars);
every pytorch_lightning.Trainer argument is trainer.KEY=VALUE.

Run directory (hydra.run.dir=DIR to choose it; default outputs/<plugin>/<date>/<time>/):
  config.yaml  metrics.json  checkpoints/  plots/  predictions/  logs/

More: README.md and docs/ (architecture, writing-a-plugin, one page per plugin, distributed, sweeps);
the override grammar: https://hydra.cc/docs/advanced/override_grammar/basic/

Hydra's help follows.
"""


def main() -> None:
    """The `sciml` console script and `python -m sciml`."""
    argv = sys.argv[1:]
    if argv[:1] == ["--list-plugins"]:
        for plugin in plugins.load_all():
            print(f"{plugin.name:12s} {plugin.description}")
        return
    if argv[:1] == ["compare"]:
        from sciml.compare import main as compare

        sys.exit(compare(argv[1:]))
    if argv[:1] == ["export"]:
        from sciml.export import main as export

        sys.exit(export(argv[1:]))
    if argv[:1] in (["--help"], ["-h"]):
        print(USAGE.format(plugins=", ".join(plugins.installed()) or "none"))
    try:
        if argv[:1] == ["predict"]:
            argv = predict_command(argv[1:])
            sys.argv = [sys.argv[0], *argv]  # Hydra reads sys.argv; DDP children re-run it
        names = check_command_line(argv)
    except SciMLError as exc:
        print(f"sciml: error: {exc}", file=sys.stderr)
        sys.exit(2)
    setup(names)
    sys.argv[1:] = precheck(argv)
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


def precheck(argv: list[str]) -> list[str]:
    """Compose the config as Hydra will and check it (sciml.config_check) before Hydra creates the run directory or
    anything is read: one line and exit 2 on a problem. Returns the command line to run, with `+` added to overrides
    of keys that the config does not list but the node's `_target_` accepts (`trainer.limit_train_batches=300`).
    Sweeps (-m) and information flags pass unchecked here; every job checks its config when it starts."""
    from sciml import config_check

    if any(a.split("=")[0] in _INFO_FLAGS for a in argv) or any(a in ("-m", "--multirun") for a in argv):
        return argv
    try:
        argv = _add_plus_for_target_keys(argv)
        cfg = _compose(argv)
        config_check.check(cfg, unresolved_ok=True)
        config_check.check_output_dir(OmegaConf.select(cfg, "hydra.run.dir"))
    except SciMLError as exc:
        print(f"sciml: error: {exc}", file=sys.stderr)
        sys.exit(2)
    return argv


def _overrides(argv: list[str]) -> list[str]:
    from hydra._internal.utils import get_args_parser

    return list(get_args_parser().parse_known_args(argv)[0].overrides)


def _compose(argv: list[str]) -> DictConfig:
    """The job's config as Hydra composes it (with the hydra node), or a SciMLError in one line."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="sciml.conf", version_base="1.3"):
            return compose(config_name="config", overrides=_overrides(argv), return_hydra_config=True)
    except HydraException as exc:
        raise SciMLError(_composition_message(exc, argv)) from None
    finally:
        GlobalHydra.instance().clear()


def _composition_message(exc: Exception, argv: list[str]) -> str:
    """Hydra's composition error in one line; an override of a key the config does not have gets the closest
    known key instead of Hydra's hint to add it with '+'."""
    import re

    text = str(exc)
    match = re.search(r"Could not override '([^']+)'", text)
    if match and "not in struct" in str(exc.__cause__ or text):
        key = match.group(1)
        candidates = _known_keys(argv, key)
        if candidates is not None:
            from sciml.config_check import _unknown

            return _unknown(key, key.rsplit(".", 1)[-1], candidates)
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _known_keys(argv: list[str], key: str) -> list[str] | None:
    """The keys a node accepts: those it lists and its `_target_`'s parameters (config without the override)."""
    from sciml.config_check import target_parameters

    parent_path = key.rsplit(".", 1)[0] if "." in key else ""
    rest = [a for a in argv if not a.startswith(f"{key}=")]
    try:
        cfg = _compose(rest)
    except SciMLError:
        return None
    parent = OmegaConf.select(cfg, parent_path) if parent_path else cfg
    if not isinstance(parent, DictConfig):
        return None
    known = [str(k) for k in parent if not str(k).startswith("_")]
    if "_target_" in parent:
        try:
            known += list(target_parameters(parent, parent_path)[0])
        except SciMLError:
            pass
    return sorted(set(known))


def _add_plus_for_target_keys(argv: list[str]) -> list[str]:
    """`group.KEY=VALUE` for a KEY that the composed node lacks but its `_target_` accepts becomes `+group.KEY=VALUE`
    (Hydra's struct mode otherwise refuses it), so every Trainer or datamodule argument can be set directly."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType

    from sciml.config_check import target_parameters

    parsed = OverridesParser.create().parse_overrides(_overrides(argv))
    candidates = [o for o in parsed if o.type == OverrideType.CHANGE and "." in o.key_or_group
                  and o.package is None and not o.key_or_group.startswith("hydra.")]
    if not candidates:
        return argv
    try:
        cfg = _compose([a for a in argv if a not in {o.input_line for o in candidates}])
    except SciMLError:
        return argv  # the composition error is reported with the full command line
    out = list(argv)
    for override in candidates:
        parent_path, key = override.key_or_group.rsplit(".", 1)
        parent = OmegaConf.select(cfg, parent_path)
        if not isinstance(parent, DictConfig) or key in parent or "_target_" not in parent:
            continue
        try:
            params, _ = target_parameters(parent, parent_path)
        except SciMLError:
            continue
        if key in params:
            line = str(override.input_line)  # set for every override parsed from a command line
            out[out.index(line)] = "+" + line
    return out


if __name__ == "__main__":
    main()
