"""Search spaces written in Hydra's sweep syntax, turned into Optuna distributions.

    model.widths: choice([16,32],[32,64,64])      -> CategoricalDistribution (values encoded as override strings)
    model.kernel_size: range(3,9,2)               -> IntDistribution(3, 7, step=2)   (Hydra's range excludes stop)
    optimizer.lr: tag(log, interval(1e-4, 1e-2))  -> FloatDistribution(1e-4, 1e-2, log=True)
    model.hidden: 64                              -> fixed, passed to every trial unchanged

`interval` is continuous (Hydra parses its ends as floats); integer ranges are written with `range`.
"""
from __future__ import annotations

import math
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, Transformer
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from sciml.sweepers.errors import SweepError


def parse(lines: list[str]) -> tuple[dict[str, BaseDistribution], dict[str, str]]:
    """Override strings (`key=choice(...)`, `key=value`) to (distributions, fixed overrides by key)."""
    try:
        overrides = OverridesParser.create().parse_overrides(lines)
    except Exception as exc:  # Hydra's message names the bad override
        raise SweepError(f"search space: {' '.join(str(exc).split())}") from None
    space: dict[str, BaseDistribution] = {}
    fixed: dict[str, str] = {}
    for override in overrides:
        key = override.get_key_element()
        if override.is_sweep_override():
            space[key] = distribution(override)
        else:
            fixed[key] = override.get_value_element_as_str()
    return space, fixed


def distribution(override: Override) -> BaseDistribution:
    """The Optuna distribution of one sweep override (choice, range or interval)."""
    key, value = override.get_key_element(), override.value()
    if override.is_choice_sweep() or (override.is_range_sweep() and value.shuffle):
        choices = list(override.sweep_iterator(transformer=Transformer.encode))
        if len(set(choices)) != len(choices):
            raise SweepError(f"search space: {key} repeats a choice: {override.input_line}")
        return CategoricalDistribution(choices)
    if override.is_range_sweep():
        values = list(override.sweep_iterator())
        if not values:
            raise SweepError(f"search space: {override.input_line} is empty")
        if all(isinstance(v, int) for v in values):
            return IntDistribution(values[0], values[-1], step=int(value.step)) if value.step > 0 else \
                CategoricalDistribution(values)
        return FloatDistribution(min(values), max(values), step=abs(float(value.step)))
    if override.is_interval_sweep():
        start, end, log = value.start, value.end, "log" in value.tags
        if not start < end:
            raise SweepError(f"search space: {key} interval needs start < end, got {start}, {end}")
        if log and start <= 0:
            raise SweepError(f"search space: {key} log interval needs start > 0, got {start}")
        return FloatDistribution(float(start), float(end), log=log)  # Hydra's interval is continuous
    raise SweepError(f"search space: {override.input_line} is not choice(...), range(...) or interval(...)")


def override_value(value: Any) -> str:
    """A suggested value as it goes on the command line (categoricals are already override strings)."""
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)
