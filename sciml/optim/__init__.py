"""Optimizers and learning-rate schedules for large-batch training."""
from sciml.optim.lamb import LAMB
from sciml.optim.lars import LARS, lars_param_groups

__all__ = ["LARS", "LAMB", "lars_param_groups"]
