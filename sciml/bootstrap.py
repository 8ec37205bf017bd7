"""Bootstrap confidence intervals of test metrics, resampling the units the field uses (events, storms, cases,
time steps) with replacement. Percentile intervals from `scipy.stats.bootstrap`, seeded so that a rerun gives the
same numbers.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping

import numpy as np
from scipy.stats import bootstrap


def intervals(statistic: Callable[[np.ndarray], Mapping[str, float]], n_units: int, resamples: int, seed: int = 0,
              confidence: float = 0.95) -> dict[str, tuple[float, float]]:
    """name -> (low, high) for every value `statistic(units)` returns, where `units` are indices into the
    `n_units` evaluated units (a bootstrap resample: drawn with replacement). A resample where a value is undefined
    (NaN, e.g. no positive among the drawn events) is left out of that value's interval; an interval with fewer
    than half the resamples defined is NaN."""
    if resamples <= 0 or n_units < 2:
        return {}
    names = list(statistic(np.arange(n_units)))
    if not names:
        return {}

    def vector(units: np.ndarray) -> np.ndarray:
        values = statistic(np.asarray(units, dtype=np.int64))
        return np.array([float(values.get(n, np.nan)) for n in names])

    with warnings.catch_warnings():  # scipy warns of NaN resamples; they are handled below
        warnings.simplefilter("ignore")
        result = bootstrap((np.arange(n_units),), vector, n_resamples=resamples, vectorized=False,
                           method="percentile", confidence_level=confidence, rng=np.random.default_rng(seed))
    distribution = np.atleast_2d(result.bootstrap_distribution)  # (values, resamples)
    alpha = (1 - confidence) / 2 * 100
    out = {}
    for name, samples in zip(names, distribution):
        finite = samples[np.isfinite(samples)]
        if len(finite) < resamples / 2:
            out[name] = (float("nan"), float("nan"))
        else:
            low, high = np.percentile(finite, [alpha, 100 - alpha])
            out[name] = (float(low), float(high))
    return out
