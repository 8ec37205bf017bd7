"""The Kurth et al. network: configurable depth, widths, kernel and dropout; no batch norm."""
import pytest
import torch
from torch import nn

from sciml_plugins.hep.model import KurthCNN


def test_output_shape_and_architecture():
    model = KurthCNN(image_size=40, widths=(16, 32, 32, 64), kernel_size=5, hidden=32, dropout=0.3)
    assert model(torch.zeros(4, 3, 40, 40)).shape == (4, 2)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 32, 32, 64] and convs[0].kernel_size == (5, 5)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 4
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert all(m.p == 0.3 for m in model.modules() if isinstance(m, nn.Dropout))


def test_parameter_count_follows_configuration():
    def count(**kw):
        return sum(p.numel() for p in KurthCNN(**kw).parameters())
    assert count(widths=(8, 8)) < count(widths=(8, 16)) < count(widths=(32, 64, 64))
    assert count(hidden=0, widths=(8,), image_size=16) == (3 * 9 * 8 + 8) + (8 * 8 * 8 * 2 + 2)


def test_invalid_configuration():
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        KurthCNN(kernel_size=4)
    with pytest.raises(ValueError, match="below one pixel"):
        KurthCNN(image_size=8, widths=(8, 8, 8, 8))
