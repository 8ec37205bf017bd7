"""The generic regression task against references written out in numpy."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sciml.errors import SciMLError
from sciml.tasks import RegressionTask


class Fixed(torch.nn.Module):
    """Returns a given output whatever the input: the task's arithmetic is then checked alone."""

    def __init__(self, out):
        super().__init__()
        self.out = torch.as_tensor(out, dtype=torch.float32)

    def forward(self, x):
        return self.out[: len(x)]


def test_gaussian_nll_in_normalised_units_and_metrics_in_physical_units():
    rng = np.random.default_rng(0)
    n, offset, scale = 50, 20.0, 8.0
    mean, log_var = rng.normal(size=n), rng.normal(scale=0.5, size=n)
    y = rng.normal(20, 8, size=n)
    w = rng.uniform(0.5, 2, size=n)
    task = RegressionTask(Fixed(np.stack([mean, log_var], 1)), loss="gaussian_nll", target_offset=offset,
                          target_scale=scale)
    batch = {"x": torch.zeros(n, 1), "y": torch.tensor(y), "w": torch.tensor(w, dtype=torch.float32)}
    task.log = lambda *a, **k: None
    loss = task.training_step(batch, 0).item()
    t = (y - offset) / scale
    nll = 0.5 * (log_var + (t - mean) ** 2 / np.exp(log_var) + math.log(2 * math.pi))
    assert loss == pytest.approx((nll * w).sum() / w.sum(), rel=1e-5)

    task.evaluate_batch(batch, "test")
    values = task.epoch_metrics("test")
    predicted = mean * scale + offset
    assert values["mae"].item() == pytest.approx(np.abs(predicted - y).mean(), rel=1e-5)
    assert values["rmse"].item() == pytest.approx(np.sqrt(((predicted - y) ** 2).mean()), rel=1e-5)
    r2 = 1 - ((predicted - y) ** 2).sum() / ((y - y.mean()) ** 2).sum()
    assert values["r2"].item() == pytest.approx(r2, rel=1e-4)

    out = task.predict_step({"x": torch.zeros(n, 1), "y": torch.tensor(y)}, 0)
    np.testing.assert_allclose(out["prediction"][:, 0].numpy(), predicted, rtol=1e-5)
    np.testing.assert_allclose(out["std"][:, 0].numpy(), np.exp(0.5 * log_var) * scale, rtol=1e-5)


@pytest.mark.parametrize("loss, reference", [
    ("mse", lambda d: d ** 2),
    ("l1", np.abs),
    ("huber", lambda d: np.where(np.abs(d) < 1, 0.5 * d ** 2, np.abs(d) - 0.5)),
])
def test_point_losses(loss, reference):
    rng = np.random.default_rng(1)
    pred, y = rng.normal(size=(30, 2)), rng.normal(scale=2, size=(30, 2))
    task = RegressionTask(Fixed(pred), num_targets=2, loss=loss)
    task.log = lambda *a, **k: None
    got = task.training_step({"x": torch.zeros(30, 1), "y": torch.tensor(y)}, 0).item()
    assert got == pytest.approx(reference(pred - y).mean(), rel=1e-5)


def test_wrong_output_or_target_shape_is_named():
    task = RegressionTask(Fixed(np.zeros((4, 1))), loss="gaussian_nll")
    task.log = lambda *a, **k: None
    with pytest.raises(SciMLError, match=r"needs \(batch, 2\)"):
        task.training_step({"x": torch.zeros(4, 1), "y": torch.zeros(4)}, 0)
    task = RegressionTask(Fixed(np.zeros((4, 1))))
    with pytest.raises(SciMLError, match="task.num_targets=1"):
        task.training_step({"x": torch.zeros(4, 1), "y": torch.zeros(4, 3)}, 0)
    with pytest.raises(SciMLError, match="task.loss"):
        RegressionTask(Fixed(np.zeros((4, 1))), loss="poisson")
