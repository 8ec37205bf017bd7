"""Put every plugin's config directory on Hydra's search path.

Hydra's own discovery (the `hydra_plugins` namespace package) breaks with editable installs (hydra #2359), so the
search-path plugin is registered programmatically before Hydra composes.
"""
from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.plugins import Plugins
from hydra.plugins.search_path_plugin import SearchPathPlugin

from sciml import plugins


class PluginConfigSearchPath(SearchPathPlugin):
    """Hydra search-path plugin: every installed plugin's config directory."""
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        for plugin in plugins.load_all():
            search_path.append(provider=f"sciml-plugin-{plugin.name}", path=f"file://{plugin.config_dir}")


def register() -> None:
    """Register the search-path plugin with Hydra (before Hydra composes)."""
    Plugins.instance().register(PluginConfigSearchPath)
