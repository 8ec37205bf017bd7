from torch import nn


def mlp(input_shape: tuple[int, ...], hidden: int = 16, num_classes: int = 2) -> nn.Module:
    """`input_shape` is handed over by sciml from the data: (features,)."""
    return nn.Sequential(nn.Linear(input_shape[0], hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
