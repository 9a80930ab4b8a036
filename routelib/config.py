"""Notebook parameters -> a dataclass config, rejecting anything misspelt.

papermill injects ``-p name value`` as a new cell of assignments after the cell tagged
``parameters``; an unknown name is only a warning there, so a typo (``-p lerning_rate 1e-3``)
would silently run the default. ``from_namespace`` closes that hole: called in the cell right after
the parameters, it takes every user-defined scalar in the notebook's namespace and requires each to
be a field of the config.

    cfg = from_namespace(MoEStudyConfig, globals())
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Mapping, TypeVar

from routelib.errors import ConfigError

C = TypeVar("C")

# Names IPython and the notebook machinery put in a kernel's globals.
_KERNEL_NAMES = {"In", "Out", "get_ipython", "exit", "quit", "open"}
# Parameter values are flat scalars (papermill's -p parses only these; lists go through YAML).
_SCALARS = (bool, int, float, str, type(None), list, tuple, dict)


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against a field's annotation, casting int -> float where that is lossless."""
    if isinstance(annotation, str):  # postponed annotations ("from __future__ import annotations")
        annotation = eval(annotation, dict(vars(typing)), {})  # noqa: S307 -- field types only
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(name, value, option)
            except ConfigError:
                continue
        raise ConfigError(f"parameter {name!r}={value!r} is not a {annotation}")
    if origin is typing.Literal:
        if value not in typing.get_args(annotation):
            raise ConfigError(f"parameter {name!r}={value!r}: choose one of {typing.get_args(annotation)}")
        return value
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin in (list, tuple) and isinstance(value, (list, tuple)):
        return origin(value)
    check = origin or annotation
    if isinstance(check, type) and check is not typing.Any:
        if annotation is int and isinstance(value, bool) or not isinstance(value, check):
            raise ConfigError(
                f"parameter {name!r}={value!r} has type {type(value).__name__}, expected {check.__name__}"
            )
    return value


def from_params(cls: type[C], params: Mapping[str, Any]) -> C:
    """Build dataclass ``cls`` from ``params``; an unknown name or a wrongly typed value raises
    ConfigError naming it (with the closest valid name as a hint). Missing names keep defaults."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [name for name in params if name not in fields]
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, list(fields), n=1)
            hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(
            f"unknown parameter(s) for {cls.__name__}: {', '.join(hints)}; valid names: {', '.join(fields)}"
        )
    hints_by_name = typing.get_type_hints(cls)
    values = {name: _coerce(name, value, hints_by_name.get(name, Any)) for name, value in params.items()}
    return cls(**values)


def from_namespace(cls: type[C], namespace: Mapping[str, Any]) -> C:
    """Build ``cls`` from the parameters living in a notebook's ``globals()``.

    Every public scalar in the namespace counts as a parameter (modules, functions, classes and
    IPython's own names are skipped), so call this in the cell right after the parameters cell,
    before other variables exist.
    """
    params = {
        name: value
        for name, value in namespace.items()
        if not name.startswith("_")
        and name not in _KERNEL_NAMES
        and isinstance(value, _SCALARS)
    }
    return from_params(cls, params)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a dataclass config (for metrics files and model cards)."""
    return dataclasses.asdict(cfg)
