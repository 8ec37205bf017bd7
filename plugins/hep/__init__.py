"""HEP: top-quark vs QCD jet classification on calorimeter images (Kurth et al. 2017, "Deep Learning at 15PF")."""
from pathlib import Path

from sciml.plugins import Plugin

plugin = Plugin(
    name="hep",
    config_dir=Path(__file__).parent / "conf",
    description="signal vs background calorimeter jet images (HDF5), Kurth et al. CNN",
)
