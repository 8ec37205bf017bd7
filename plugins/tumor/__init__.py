"""Tumor: brain tumour segmentation in multi-modal MRI (BraTS case folders, NIfTI), a 2-D U-Net on axial slices."""
from pathlib import Path

from sciml.plugins import Plugin

plugin = Plugin(
    name="tumor",
    config_dir=Path(__file__).parent / "conf",
    description="brain tumour segmentation in BraTS MRI case folders (NIfTI), MONAI U-Net, Dice/HD95 per region",
)
