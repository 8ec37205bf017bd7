"""The composed config checked before anything is built or read: keys and value types of every node that names a
`_target_` (against the callable's signature and annotations), of the core's own groups, and the output location.

A problem is one line naming the key, the value and what was expected (`trainer.max_epochs=abc: expected int or
None`); an unknown key gets the closest known one (`unknown key optimizer.lrr, did you mean optimizer.lr?`).

A target class may declare its config keys itself with a classmethod `config_parameters(node) -> dict[str,
inspect.Parameter]` (annotated parameters); the check then uses it instead of the signature, e.g. for a datamodule
whose extra keys go to a reader class the node names.
"""
from __future__ import annotations

import difflib
import inspect
import os
import tempfile
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from sciml.errors import SciMLError

# Hydra's own keys in a node with _target_.
_HYDRA_KEYS = {"_target_", "_recursive_", "_convert_", "_partial_", "_args_"}
# Arguments that sciml passes when it instantiates these nodes (not set in the config).
_RUNTIME_ARGS = {"task": {"model", "optimizer", "scheduler"}, "trainer": {"callbacks", "logger", "strategy"},
                 "optimizer": {"params"}}
# Keys of the optimizer node that sciml consumes (sciml.optim.factory) and their types.
_OPTIMIZER_KEYS = {"base_batch_size": int | None, "lr_scaling": typing.Literal["linear", "sqrt", "none"],
                   "exclude_from_decay": bool}
# The core's groups and top-level keys without a _target_.
_SCHEDULER_KEYS = {"name": typing.Literal["none", "warmup_poly", "cosine"], "warmup_epochs": float,
                   "power": float, "end_lr": float, "min_lr": float}
_TOP_KEYS = {"name": str, "seed": int, "train": bool, "ckpt_path": str | None, "objective": str,
             "malloc_keep_mb": int | None,
             "objective_mode": typing.Literal["min", "max"], "monitor": str,
             "monitor_mode": typing.Literal["min", "max"]}


def check(cfg: DictConfig, unresolved_ok: bool = False) -> None:
    """Raise a SciMLError naming the first bad key of `cfg` (the composed run config). `unresolved_ok`: values whose
    interpolation cannot be resolved yet (before Hydra starts the job) are skipped rather than reported."""
    checker = _Checker(unresolved_ok)
    checker.keys(cfg, "", _TOP_KEYS, closed=False)
    for group, node in cfg.items():
        if group in ("hydra", "paths") or not isinstance(node, DictConfig):
            continue
        if group == "scheduler":
            checker.keys(node, "scheduler", _SCHEDULER_KEYS)
        elif group == "strategy" and "_target_" not in node:
            checker.keys(node, "strategy", {"name": str})
        elif group in ("callbacks", "logger"):
            for name, child in node.items():
                if isinstance(child, DictConfig) and "_target_" in child:
                    checker.target(child, f"{group}.{name}")
        elif "_target_" in node:
            checker.target(node, group, extra=_OPTIMIZER_KEYS if group == "optimizer" else None)


def check_output_dir(path: str | Path, key: str = "hydra.run.dir") -> None:
    """The run directory can be created and written (as root, permission bits say little: try it)."""
    target = Path(path).absolute()
    try:
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=target):
            pass
    except OSError as exc:
        raise SciMLError(f"{key}: cannot write the run directory '{target}': {exc.strerror or exc}") from None


def target_parameters(node: DictConfig, path: str) -> tuple[dict[str, inspect.Parameter], bool]:
    """The parameters a node's `_target_` accepts (annotations resolved) and whether it takes **kwargs."""
    from hydra._internal.utils import _locate

    try:
        obj = _locate(str(node._target_))
    except Exception as exc:  # noqa: BLE001 -- any import failure is the user's to see, in one line
        raise SciMLError(f"{path}._target_: cannot import '{node._target_}' ({' '.join(str(exc).split())})") from None
    declared = getattr(obj, "config_parameters", None)
    if inspect.isclass(obj) and callable(declared):
        params = dict(declared(node))
        return params, False
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):  # a builtin without a signature: nothing to check against
        return {}, True
    try:
        hints = typing.get_type_hints(obj.__init__ if inspect.isclass(obj) else obj)
    except Exception:  # noqa: BLE001 -- unresolvable annotations: fall back to the signature's own
        hints = {}
    params = {name: p.replace(annotation=hints.get(name, p.annotation)) for name, p in signature.parameters.items()}
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    params = {k: p for k, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    return params, var_kw


class _Checker:
    def __init__(self, unresolved_ok: bool):
        self.unresolved_ok = unresolved_ok

    def value(self, node: DictConfig, key: str, path: str):
        """The resolved value, or _SKIP when it cannot be known yet."""
        try:
            return node[key]
        except MissingMandatoryValue:
            raise SciMLError(f"{path}: needs a value (it is ??? in the config)") from None
        except OmegaConfBaseException as exc:
            if self.unresolved_ok:
                return _SKIP
            raise SciMLError(f"{path}: {str(exc).splitlines()[0]}") from None

    def keys(self, node: DictConfig, path: str, types_: Mapping[str, Any], closed: bool = True) -> None:
        for key in node:
            full = f"{path}.{key}" if path else str(key)
            if key not in types_:
                if closed:
                    raise SciMLError(_unknown(full, key, list(types_)))
                continue
            value = self.value(node, key, full)
            if value is not _SKIP and not matches(value, types_[key]):
                raise SciMLError(f"{full}={_show(value)}: expected {describe(types_[key])}")

    def target(self, node: DictConfig, path: str, extra: Mapping[str, Any] | None = None) -> None:
        params, var_kw = target_parameters(node, path)
        extra = dict(extra or {})
        runtime = _RUNTIME_ARGS.get(path, set())
        for key in node:
            full = f"{path}.{key}"
            if key in _HYDRA_KEYS:
                continue
            if key in extra:
                expected = extra[key]
            elif key in params and key not in runtime:
                expected = _expected(params[key])
            elif var_kw:
                expected = Any
            else:
                raise SciMLError(_unknown(full, key, [k for k in (*params, *extra) if k not in runtime]))
            value = self.value(node, key, full)
            if value is _SKIP:
                continue
            if isinstance(value, DictConfig) and "_target_" in value:
                self.target(value, full)  # instantiated in turn: its own keys are checked
                continue
            if not matches(value, expected):
                raise SciMLError(f"{full}={_show(value)}: expected {describe(expected)}")


_SKIP = object()


def _expected(param: inspect.Parameter) -> Any:
    """The annotation; an unannotated parameter takes anything (its default's type is no contract: `val_cases=1`
    also takes 'all' or a list)."""
    return Any if param.annotation is inspect.Parameter.empty else param.annotation


def _unknown(full: str, key: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(str(key), [str(c) for c in candidates], n=1, cutoff=0.6)
    prefix = full.rsplit(".", 1)[0] + "." if "." in full else ""
    if close:
        return f"unknown key {full}, did you mean {prefix}{close[0]}?"
    known = ", ".join(sorted(map(str, candidates)))
    return f"unknown key {full}" + (f"; known keys: {known}" if known else "")


def _show(value: Any) -> str:
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=False)
    return str(value)


def matches(value: Any, expected: Any) -> bool:
    """Whether a config value fits an annotation. Types this check cannot judge (classes other than the builtins,
    callables, type variables) pass: the target's own validation sees them."""
    if expected is Any or expected is inspect.Parameter.empty or isinstance(expected, (typing.TypeVar, str)):
        return True
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    origin = typing.get_origin(expected)
    args = typing.get_args(expected)
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, a) for a in args)
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if expected is type(None) or expected is None:
        return value is None
    if origin is typing.Annotated:
        return matches(value, args[0])
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is str:
        return isinstance(value, str)
    if expected in (Path, os.PathLike) or (inspect.isclass(expected) and issubclass(expected, os.PathLike)):
        return isinstance(value, (str, os.PathLike))
    container = origin or expected
    if container in (list, tuple, set, frozenset, Sequence, typing.Sequence):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(matches(v, a) for v, a in zip(value, args))
        return not args or all(matches(v, args[0]) for v in value)
    if container in (dict, Mapping, typing.Mapping):
        return isinstance(value, dict)
    return True


def describe(expected: Any) -> str:
    """An annotation in words: `int or None`, `one of 'min', 'max'`, `list of int`."""
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin in (typing.Union, types.UnionType):
        literals = [a for a in args if typing.get_origin(a) is typing.Literal]
        others = [a for a in args if a not in literals]
        parts = []
        if literals:
            parts.append("one of " + ", ".join(repr(v) for lit in literals for v in typing.get_args(lit)))
        parts += [describe(a) for a in others]
        return " or ".join(parts)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if expected is type(None) or expected is None:
        return "None"
    if origin in (list, tuple, set, Sequence) and args:
        return f"list of {describe(args[0])}"
    if origin in (dict, Mapping) or expected in (dict, Mapping, typing.Mapping):
        return "a mapping"
    return getattr(expected, "__name__", str(expected).replace("typing.", ""))
