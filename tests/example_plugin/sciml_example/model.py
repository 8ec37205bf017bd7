from torch import nn


def mlp(features: int = 4, hidden: int = 16, num_classes: int = 2) -> nn.Module:
    return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
