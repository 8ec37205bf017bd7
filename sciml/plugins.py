"""Plugin discovery through the `sciml.plugins` entry-point group.

Built-in and third-party plugins register the same way: an entry point naming a `Plugin` object. Entry points are
listed without importing anything; a plugin's package is imported only when its config directory is needed.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cache
from importlib.metadata import entry_points
from pathlib import Path

from sciml.errors import SciMLError

GROUP = "sciml.plugins"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plugin:
    """What the core must know of a plugin: its name and the folder with its Hydra configs.

    `config_dir` holds `plugin/<name>.yaml` (a `# @package _global_` config that sets data, model, task and
    objective) and any config groups of the plugin's own.
    """

    name: str
    config_dir: Path
    description: str = ""

    def __post_init__(self):
        object.__setattr__(self, "config_dir", Path(self.config_dir).resolve())


def installed() -> list[str]:
    """Names of the installed plugins, sorted, without importing them."""
    return sorted({ep.name for ep in entry_points(group=GROUP)})


@cache
def load(name: str) -> Plugin:
    """Import one plugin's entry point and check it is well-formed."""
    eps = [ep for ep in entry_points(group=GROUP) if ep.name == name]
    if not eps:
        raise SciMLError(f"unknown plugin '{name}'; installed plugins: {', '.join(installed()) or 'none'}")
    try:
        plugin = eps[0].load()
    except Exception as exc:  # a broken third-party package must not hide behind a traceback
        raise SciMLError(f"plugin '{name}' ({eps[0].value}) failed to import: {exc}") from exc
    if not isinstance(plugin, Plugin):
        raise SciMLError(f"plugin '{name}': entry point {eps[0].value} is a {type(plugin).__name__}, "
                         "expected a sciml.plugins.Plugin")
    if not (plugin.config_dir / "plugin" / f"{name}.yaml").is_file():
        raise SciMLError(f"plugin '{name}': {plugin.config_dir}/plugin/{name}.yaml not found")
    return plugin


def load_all() -> list[Plugin]:
    """Every installed plugin that loads; broken ones are reported and skipped so they cannot break the rest."""
    plugins = []
    for name in installed():
        try:
            plugins.append(load(name))
        except SciMLError as exc:
            log.warning("%s", exc)
    return plugins
