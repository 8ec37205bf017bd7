"""Weighted ROC metrics against scikit-learn's implementation (an independent reference)."""
import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from sciml.errors import DegenerateDataError
from sciml.metrics import WeightedBinaryClassification, weighted_roc


@pytest.fixture
def sample():
    rng = np.random.default_rng(1)
    n = 4000
    labels = rng.integers(0, 2, n)
    scores = 1 / (1 + np.exp(-(rng.normal(size=n) + 1.5 * labels)))
    scores = np.round(scores, 3)  # ties, as real classifiers produce
    weights = rng.uniform(0.2, 3.0, n)
    return scores, labels, weights


def test_weighted_roc_matches_sklearn(sample):
    scores, labels, weights = sample
    fpr, tpr = weighted_roc(torch.tensor(scores), torch.tensor(labels), torch.tensor(weights))
    ref_fpr, ref_tpr, _ = roc_curve(labels, scores, sample_weight=weights, drop_intermediate=False)
    np.testing.assert_allclose(fpr.numpy(), ref_fpr, atol=1e-12)
    np.testing.assert_allclose(tpr.numpy(), ref_tpr, atol=1e-12)


def test_metric_values_against_references(sample):
    scores, labels, weights = sample
    metric = WeightedBinaryClassification(working_points=True)
    for part in np.array_split(np.arange(len(scores)), 7):  # accumulated over batches
        metric.update(torch.tensor(scores[part]), torch.tensor(labels[part]), torch.tensor(weights[part]))
    values = {k: float(v) for k, v in metric.compute().items()}

    assert values["auc"] == pytest.approx(roc_auc_score(labels, scores, sample_weight=weights), abs=1e-9)
    correct = (scores >= 0.5) == (labels == 1)
    assert values["acc"] == pytest.approx(np.sum(weights * correct) / np.sum(weights), abs=1e-9)
    fpr, tpr, _ = roc_curve(labels, scores, sample_weight=weights, drop_intermediate=False)
    assert values["sig_eff_at_bkg_eff_1e-2"] == pytest.approx(np.interp(1e-2, fpr, tpr), abs=1e-9)
    assert values["sig_eff_at_bkg_eff_1e-3"] == pytest.approx(np.interp(1e-3, fpr, tpr), abs=1e-9)
    assert values["bkg_rej_at_sig_eff_0.5"] == pytest.approx(1 / np.interp(0.5, tpr, fpr), rel=1e-9)


def test_weights_change_the_result(sample):
    scores, labels, weights = sample
    weighted, unweighted = WeightedBinaryClassification(), WeightedBinaryClassification()
    weighted.update(torch.tensor(scores), torch.tensor(labels), torch.tensor(weights * (1 + labels * scores)))
    unweighted.update(torch.tensor(scores), torch.tensor(labels))
    assert float(weighted.compute()["auc"]) != pytest.approx(float(unweighted.compute()["auc"]), abs=1e-4)
    assert float(unweighted.compute()["auc"]) == pytest.approx(roc_auc_score(labels, scores), abs=1e-9)


def test_perfect_separation_rejection_is_finite_lower_bound():
    metric = WeightedBinaryClassification(working_points=True)
    metric.update(torch.tensor([0.1, 0.2, 0.8, 0.9]), torch.tensor([0, 0, 1, 1]))
    values = metric.compute()
    assert float(values["auc"]) == 1.0
    assert float(values["bkg_rej_at_sig_eff_0.5"]) == 2.0  # 1 / (smallest resolvable background fraction)


def test_one_class_only_is_an_error():
    metric = WeightedBinaryClassification()
    metric.update(torch.tensor([0.1, 0.2]), torch.tensor([1, 1]))
    with pytest.raises(DegenerateDataError, match="all 2 evaluated events are signal"):
        metric.compute()


def test_working_points_are_opt_in(sample):
    scores, labels, weights = sample
    plain, hep = WeightedBinaryClassification(), WeightedBinaryClassification(working_points=True)
    for metric in (plain, hep):
        metric.update(torch.tensor(scores), torch.tensor(labels), torch.tensor(weights))
    assert set(plain.compute()) == {"auc", "acc"}
    values = hep.compute()
    assert {"sig_eff_at_bkg_eff_1e-2", "sig_eff_at_bkg_eff_1e-3", "bkg_rej_at_sig_eff_0.5"} <= set(values)
    n_eff = weights[labels == 0].sum() ** 2 / (weights[labels == 0] ** 2).sum()
    assert float(values["bkg_events_at_bkg_eff_1e-3"]) == pytest.approx(1e-3 * n_eff)


def test_bootstrap_intervals_cover_the_value_and_are_seeded(sample):
    scores, labels, weights = sample
    metric = WeightedBinaryClassification()
    metric.update(torch.tensor(scores), torch.tensor(labels), torch.tensor(weights))
    auc = float(metric.compute()["auc"])
    ci = metric.bootstrap(100, seed=3)
    low, high = ci["auc"]
    assert low < auc < high and high - low < 0.1
    assert metric.bootstrap(100, seed=3) == ci and metric.bootstrap(100, seed=4) != ci
