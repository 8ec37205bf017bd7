"""Climate: tropical cyclones and atmospheric rivers segmented in ClimateNet-layout netCDF fields (Kashinath et al.
2021; Kurth et al. 2018), supervised or semi-supervised (Racah et al. 2017)."""
from pathlib import Path

from omegaconf import OmegaConf

from sciml.plugins import Plugin


def _when_semi_supervised(labeled_fraction, unlabeled, value):
    """`value` when unlabelled training rows feed the auto-encoder (labeled_fraction < 1, unlabeled=reconstruct),
    otherwise its zero (false / 0.0): `data.labeled_fraction=0.1` alone switches the semi-supervised branch on."""
    semi = float(labeled_fraction) < 1 and str(unlabeled) == "reconstruct"
    return value if semi else type(value)(0)


# Used by conf/plugin/climate.yaml; registered on import, which happens before Hydra composes the plugin's config.
OmegaConf.register_new_resolver("climate.when_semi_supervised", _when_semi_supervised, replace=True)

plugin = Plugin(
    name="climate",
    config_dir=Path(__file__).parent / "conf",
    description="tropical cyclone and atmospheric river segmentation in netCDF climate fields (ClimateNet layout)",
)
