"""Typed records read from files that may come from anyone: every field checked before it is used.

A head file's metadata, a fine-tuned model's ``model.json`` and a store's attributes are JSON-like
values written by featurekit, but a file travels between people and can be edited. :func:`parse`
turns such values into a frozen dataclass, checking that every required field is there and that
each value has its annotated type (``str``, ``int``, ``float``, ``bool``, ``dict``, ``list[T]``,
``tuple[T, ...]``, ``X | None``, nested record dataclasses); a violation is one line naming the
file and the field, raised as the artifact's own error class. Extra keys are kept out, so a newer
file with more fields still reads.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, Mapping, TypeVar

from .errors import FeaturekitError, HeadFileError

__all__ = ["missing", "parse", "to_dict"]

R = TypeVar("R")


def parse(cls: type[R], values: object, where: str, error: type[FeaturekitError] = HeadFileError,
          field: str = "") -> R:
    """``cls`` (a dataclass) from ``values`` (a mapping of JSON values), every field checked.
    ``where``: the file, for messages; ``field``: the path of ``values`` inside it (nested records)."""
    if not isinstance(values, Mapping):
        raise error(f"{where}: {field or 'the record'} is {_kind(values)}, not a mapping")
    given = {}
    for item in dataclasses.fields(cls):
        name = f"{field}.{item.name}" if field else item.name
        if item.name not in values:
            if item.name in missing(cls, values):
                raise error(f"{where}: no field {name!r}")
            continue
        given[item.name] = _value(values[item.name], _hints(cls)[item.name], where, error, name)
    return cls(**given)


def missing(cls: type, values: Mapping) -> list[str]:
    """The fields of ``cls`` without a default that ``values`` lacks, in declaration order."""
    return [item.name for item in dataclasses.fields(cls) if item.name not in values
            and item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING]


def to_dict(record: object) -> dict:
    """A record as JSON values (nested records as mappings, tuples as lists)."""
    return dataclasses.asdict(record)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _value(value: object, hint: Any, where: str, error: type[FeaturekitError], name: str) -> object:
    origin, arguments = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in arguments:
            return None
        options = [option for option in arguments if option is not type(None)]
        for option in options:
            try:
                return _value(value, option, where, error, name)
            except error:
                continue
        raise error(f"{where}: field {name!r} is {_kind(value)}, not {' or '.join(map(_name, arguments))}")
    if dataclasses.is_dataclass(hint):
        return parse(hint, value, where, error, name)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise error(f"{where}: field {name!r} is {_kind(value)}, not a list")
        item = arguments[0] if arguments else Any
        items = [_value(v, item, where, error, f"{name}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    expected = origin or hint
    if expected is Any or _is(value, expected):
        return float(value) if expected is float else value
    raise error(f"{where}: field {name!r} is {_kind(value)}, not {_name(hint)}")


def _is(value: object, expected: type) -> bool:
    if expected is float:  # JSON writes 1.0 as 1
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def _name(hint: Any) -> str:
    return "none" if hint is type(None) else getattr(typing.get_origin(hint) or hint, "__name__", str(hint))


def _kind(value: object) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"
