"""Seeded train/validation/test splits of rows, or of groups of rows, and per-rank shards."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sciml.errors import SciMLError


def _count(size, n: int, key: str) -> int:
    """sklearn's convention: a float in [0, 1) is a fraction of `n`, an int >= 0 a count."""
    if isinstance(size, bool) or not isinstance(size, (int, float)):
        raise SciMLError(f"data.{key}: expected a fraction in [0, 1) or a count, got {size!r}")
    if isinstance(size, float) and not size.is_integer():
        if not 0 <= size < 1:
            raise SciMLError(f"data.{key}={size}: a fraction must be in [0, 1)")
        return int(round(size * n))
    if size < 0 or size > n:
        raise SciMLError(f"data.{key}={int(size)}: a count between 0 and {n}")
    return int(size)


def split(n: int, val_size, test_size, seed: int, groups: np.ndarray | None = None, order: str = "random",
          test_groups: Sequence[str] | None = None, where: str = "data.path") -> dict[str, np.ndarray]:
    """Sorted row numbers of 'train', 'val' and 'test' among `n` rows.

    Without `groups` rows are split; with `groups` (a key per row) whole groups are, so that correlated rows (one
    day's storms, one case's slices) never straddle splits, and sizes count groups. `order`: `random` (seeded) or
    `last` (groups or rows in sorted order, the last ones test and those before them validate: time order).
    `test_groups` names the test groups instead (e.g. leave one day out); validation then takes `val_size` of the
    others.
    """
    if order not in ("random", "last"):
        raise SciMLError(f"data.split_order: '{order}' is not one of random, last")
    keys = np.arange(n) if groups is None else np.asarray(groups).astype(str)
    unique = np.unique(keys)
    what = "rows" if groups is None else "groups"
    if test_groups is not None:
        if groups is None:
            raise SciMLError("data.test_groups needs data.group_by (the key the groups are named by)")
        test_groups = [str(g) for g in test_groups]
        unknown = [g for g in test_groups if g not in unique]
        if unknown:
            raise SciMLError(f"data.test_groups: {', '.join(unknown)} not in {where} (groups: "
                             f"{', '.join(unique[:12])}{' ...' if len(unique) > 12 else ''})")
        test = np.array(test_groups)
        rest = unique[~np.isin(unique, test)]
    else:
        n_test = _count(test_size, len(unique), "test_size")
        ranked = unique if order == "last" else np.random.default_rng(seed).permutation(unique)
        test, rest = ranked[len(ranked) - n_test:], ranked[:len(ranked) - n_test]
        if order == "random":
            rest = np.sort(rest)
    n_val = _count(val_size, len(unique), "val_size")
    if n_val > len(rest):
        raise SciMLError(f"data.val_size: {n_val} {what} for validation, but only {len(rest)} are left after test")
    if order == "random":
        rest = np.random.default_rng([seed, 1]).permutation(rest)
    val, train = rest[len(rest) - n_val:], rest[:len(rest) - n_val]
    if len(train) == 0:
        raise SciMLError(f"{where}: no {what} left for training ({len(unique)} {what}; data.val_size={val_size}, "
                         f"data.test_size={test_size})")
    if groups is None:
        return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}
    return {name: np.flatnonzero(np.isin(keys, chosen)) for name, chosen in
            (("train", train), ("val", val), ("test", test))}


def shard(rows: np.ndarray, rank: int, world: int, equal: bool) -> np.ndarray:
    """Rank `rank`'s share of `rows` among `world` ranks: every `world`-th row from offset `rank`, so the shares are
    disjoint and together hold all of `rows`. `equal`: cut every share to `len(rows) // world` rows (at most
    `world - 1` rows of the split are left out), so that every rank runs the same number of batches."""
    mine = rows[rank::world]
    return mine[:len(rows) // world] if equal else mine
