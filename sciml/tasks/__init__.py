"""Generic LightningModules, one per task type: they own loss, metrics, logging and plots; a plugin supplies the
network (an nn.Module) and the data (a LightningDataModule)."""
from sciml.tasks.base import SciMLTask
from sciml.tasks.classification import ClassificationTask
from sciml.tasks.regression import RegressionTask
from sciml.tasks.segmentation import SegmentationTask

__all__ = ["SciMLTask", "ClassificationTask", "RegressionTask", "SegmentationTask"]
