"""The climate network on any grid, its auto-encoder branch, and the switch that turns it on."""
import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra

from sciml import searchpath
from sciml_plugins.climate.model import ClimateUNet


@pytest.mark.parametrize("shape", [(96, 144), (35, 57), (8, 9)])
def test_any_grid_gives_logits_on_that_grid(shape):
    net = ClimateUNet(input_shape=(4, *shape), widths=[4, 8, 8]).eval()
    x = torch.randn(2, 4, *shape)
    assert net(x).shape == (2, 3, *shape)
    # the padding is on the far edges only: the top-left region sees the same field as in a larger input
    big = torch.randn(1, 4, 40, 40)
    small = big[..., :37, :38]
    with torch.no_grad():
        torch.testing.assert_close(net(big)[..., :20, :20], net(small)[..., :20, :20])


def test_reconstruction_branch_sees_only_the_bottleneck():
    net = ClimateUNet(input_shape=(4, 16, 20), widths=[4, 8], reconstruction=True).eval()
    x = torch.randn(1, 4, 16, 20)
    out = net(x)
    assert out["logits"].shape == (1, 3, 16, 20) and out["reconstruction"].shape == x.shape
    supervised = ClimateUNet(input_shape=(4, 8, 8), widths=[4, 8])
    assert not any(p.requires_grad and "reconstruction" in n for n, p in supervised.named_parameters())


@pytest.mark.parametrize("overrides, semi", [([], False), (["data.labeled_fraction=0.1"], True),
                                             (["data.labeled_fraction=0.1", "data.unlabeled=drop"], False)])
def test_labeled_fraction_switches_the_auto_encoder(overrides, semi):
    searchpath.register()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="sciml.conf", version_base="1.3"):
        cfg = compose("config", overrides=["+plugin=climate", *overrides])
    assert cfg.model.reconstruction is semi
    assert cfg.task.reconstruction_weight == (1.0 if semi else 0.0)
    assert cfg.data.class_names == ["background", "tc", "ar"]
