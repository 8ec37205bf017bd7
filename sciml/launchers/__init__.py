"""Hydra launchers of sciml: `hydra/launcher=ray_jobs` (conf/hydra/launcher/ray_jobs.yaml, `ray_jobs.py`).

Hydra instantiates only launchers whose class path starts with `hydra_plugins.` and that its plugin registry knows;
as for the sweepers (sciml/sweepers/__init__.py), `register()` publishes them as the module
`hydra_plugins.sciml_launchers` and registers them, before Hydra starts. Launchers whose engine is not installed
(the `launchers` extra) are left out.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types

from hydra.core.plugins import Plugins

PLUGIN_MODULE = "hydra_plugins.sciml_launchers"


def register() -> None:
    """Make `hydra/launcher=ray_jobs` available to Hydra when hydra-ray-launcher is installed."""
    if importlib.util.find_spec("hydra_plugins.hydra_ray_launcher") is None:
        return
    from sciml.launchers.ray_jobs import RayJobsLauncher

    if PLUGIN_MODULE not in sys.modules:
        namespace = importlib.import_module("hydra_plugins")  # there: hydra-ray-launcher lives in it
        module = types.ModuleType(PLUGIN_MODULE, __doc__)
        module.RayJobsLauncher = RayJobsLauncher
        sys.modules[PLUGIN_MODULE] = module
        namespace.sciml_launchers = module
    Plugins.instance().register(RayJobsLauncher)
