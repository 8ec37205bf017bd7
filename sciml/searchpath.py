"""Put every plugin's config directory on Hydra's search path.

Hydra's own discovery (the `hydra_plugins` namespace package) breaks with editable installs (hydra #2359), so the
search-path plugin is registered programmatically before Hydra composes.
"""
from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.plugins import Plugins
from hydra.plugins.search_path_plugin import SearchPathPlugin

from sciml import plugins


class PluginConfigSearchPath(SearchPathPlugin):
    """Hydra search-path plugin: the selected plugins' config directories."""

    selected: list[str] | None = None  # None: every installed plugin

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        chosen = plugins.load_all() if self.selected is None else [plugins.load(n) for n in self.selected]
        for plugin in chosen:
            search_path.append(provider=f"sciml-plugin-{plugin.name}", path=f"file://{plugin.config_dir}")


def register(names: list[str] | None = None) -> None:
    """Only the selected plugins are imported (a broken third-party plugin cannot break another's run)."""
    PluginConfigSearchPath.selected = None if names is None else list(names)
    Plugins.instance().register(PluginConfigSearchPath)
