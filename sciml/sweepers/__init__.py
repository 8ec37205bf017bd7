"""Hydra sweepers of sciml: `hydra/sweeper=optuna` (conf/hydra/sweeper/optuna.yaml), an Optuna 5 search.

Hydra instantiates only sweepers whose class path starts with `hydra_plugins.`, and it finds them by scanning the
`hydra_plugins` namespace package, which breaks with editable installs (hydra #2359). So `register()` (called by
`python -m sciml` before Hydra starts, like the search-path plugin) publishes the sweeper as the module
`hydra_plugins.sciml_sweepers` and registers it with Hydra's plugin registry. No file of ours lives in the shared
`hydra_plugins` namespace.
"""
from __future__ import annotations

import importlib
import sys
import types

from hydra.core.plugins import Plugins

from sciml.sweepers.optuna_sweeper import OptunaSweeper as _OptunaSweeper

PLUGIN_MODULE = "hydra_plugins.sciml_sweepers"


class OptunaSweeper(_OptunaSweeper):
    """The Optuna sweeper under the name Hydra's `hydra/sweeper=optuna` config targets."""
    __doc__ = _OptunaSweeper.__doc__


OptunaSweeper.__module__ = PLUGIN_MODULE  # its class path: hydra_plugins.sciml_sweepers.OptunaSweeper


def register() -> None:
    """Make `hydra/sweeper=optuna` available to Hydra."""
    if PLUGIN_MODULE not in sys.modules:
        try:
            namespace = importlib.import_module("hydra_plugins")  # installed by any Hydra plugin package
        except ModuleNotFoundError:
            namespace = types.ModuleType("hydra_plugins")
            namespace.__path__ = []
            sys.modules["hydra_plugins"] = namespace
        module = types.ModuleType(PLUGIN_MODULE, __doc__)
        module.OptunaSweeper = OptunaSweeper
        sys.modules[PLUGIN_MODULE] = module
        namespace.sciml_sweepers = module
    Plugins.instance().register(OptunaSweeper)
