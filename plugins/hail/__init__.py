"""Hail: severe-hail forecasts from storm-centred patches (Gagne et al. 2019) and storm-object tables (Gagne et al.
2017), verified with AUC, Brier skill score, reliability and performance diagrams."""
from pathlib import Path

from sciml.plugins import Plugin

plugin = Plugin(
    name="hail",
    config_dir=Path(__file__).parent / "conf",
    description="severe hail from storm-centred netCDF patches or storm-object tables, Gagne et al. CNN",
)
