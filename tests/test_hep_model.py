"""The Kurth et al. network: configurable depth, widths, kernel and dropout; no batch norm."""
import pytest
import torch
from torch import nn

from sciml_plugins.hep.model import KurthCNN


def test_output_shape_and_architecture():
    model = KurthCNN((3, 40, 40), widths=(16, 32, 32, 64), kernel_size=5, hidden=32, dropout=0.3)
    assert model(torch.zeros(4, 3, 40, 40)).shape == (4, 2)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 32, 32, 64] and convs[0].kernel_size == (5, 5)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 4
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert all(m.p == 0.3 for m in model.modules() if isinstance(m, nn.Dropout))


def test_parameter_count_follows_configuration():
    def count(**kw):
        return sum(p.numel() for p in KurthCNN(**{"input_shape": (3, 40, 40), **kw}).parameters())
    assert count(widths=(8, 8)) < count(widths=(8, 16)) < count(widths=(32, 64, 64))
    assert count(hidden=0, widths=(8,), input_shape=(3, 16, 16)) == (3 * 9 * 8 + 8) + (8 * 8 * 8 * 2 + 2)
    # the shape comes from the data: channels and a non-square image
    assert count(hidden=0, widths=(8,), input_shape=(2, 33, 20)) == (2 * 9 * 8 + 8) + (8 * 16 * 10 * 2 + 2)


def test_invalid_configuration():
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        KurthCNN((3, 40, 40), kernel_size=4)
    with pytest.raises(ValueError, match="4 pooling units shrink a 8x40 image below one pixel"):
        KurthCNN((3, 8, 40), widths=(8, 8, 8, 8))
    with pytest.raises(ValueError, match=r"input_shape must be \(channels, height, width\)"):
        KurthCNN((40, 40))


def test_architecture_options_for_searches():
    model = KurthCNN((3, 16, 16), widths=[8, 16], kernel_size=[5, 3], pool="avg", batch_norm=True, hidden=0)
    assert model(torch.zeros(2, 3, 16, 16)).shape == (2, 2)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(5, 5), (3, 3)] and all(c.bias is None for c in convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 2
    assert sum(isinstance(m, nn.AvgPool2d) for m in model.modules()) == 2
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())


def test_default_network_is_the_reference_layout():
    """The search options add nothing to the default network: same layers, same parameter count as written out."""
    model = KurthCNN((3, 40, 40), widths=(32, 64, 64), hidden=64)
    names = [type(m).__name__ for m in model.features]
    assert names == ["Conv2d", "ReLU", "MaxPool2d"] * 3
    convs = (3 * 9 * 32 + 32) + (32 * 9 * 64 + 64) + (64 * 9 * 64 + 64)
    assert sum(p.numel() for p in model.parameters()) == convs + (64 * 5 * 5 * 64 + 64) + (64 * 2 + 2)


def test_invalid_search_options():
    with pytest.raises(ValueError, match="2 entries for 3 units"):
        KurthCNN((3, 40, 40), kernel_size=[3, 5])
    with pytest.raises(ValueError, match="model.pool must be one of max, avg"):
        KurthCNN((3, 40, 40), pool="min")
    with pytest.raises(ValueError, match="non-empty list"):
        KurthCNN((3, 40, 40), widths=[])
