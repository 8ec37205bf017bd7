"""The opt-in speed options (callbacks.speed): channels-last layout and torch.compile keep the network's results
and parameter names (checkpoints load into the plain network)."""
import torch

from sciml.callbacks import SpeedOptions
from sciml_plugins.hep.model import KurthCNN


class Stub:
    def __init__(self, model):
        self.model = model


def test_channels_last_same_outputs_and_names():
    torch.manual_seed(0)
    model = KurthCNN(input_shape=(3, 16, 16), widths=[4, 4], hidden=8, dropout=0).eval()
    x = torch.rand(2, 3, 16, 16)
    expected, names = model(x), list(model.state_dict())
    options = SpeedOptions(channels_last=True)
    options.setup(None, Stub(model), "fit")
    assert model.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    batch = {"x": x.clone()}
    options.on_train_batch_start(None, None, batch, 0)
    assert batch["x"].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(model(batch["x"]), expected)
    assert list(model.state_dict()) == names


def test_compile_keeps_parameter_names():
    model = KurthCNN(input_shape=(3, 16, 16), widths=[4], hidden=0, dropout=0)
    names = list(model.state_dict())
    SpeedOptions(compile=True).setup(None, Stub(model), "fit")
    assert list(model.state_dict()) == names and model._compiled_call_impl is not None
