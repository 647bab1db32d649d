"""Settings that document themselves: each field of a settings dataclass carries its help text.

A field declared with :func:`setting` holds its default, what it means and, where the name on
the command line differs from the field's, that name. The Python API reads the same dataclass,
and the command line (:mod:`featurekit.cli`) builds its options from the fields with
:func:`add_settings` and the dataclass back from the parsed arguments with :func:`from_args`, so a
default, a list of choices or a help text is written once, beside the code that uses it. Modules
that declare settings import no torch: building the command line's parser must stay fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import MISSING, dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

__all__ = ["Option", "add_settings", "from_args", "given", "options", "parent", "setting", "weights_path_parent"]


@dataclass(frozen=True)
class Option:
    """How a setting reads on the command line.

    ``flag``: the option's name (default ``--field-name``); ``choices``: the values it takes;
    ``negate``: a setting that is on by default and switched off by the flag (``--quiet`` sets
    ``progress`` to False); ``parse``: turns the text given into the value (default: the field's type);
    ``given_only``: passed on only when given, else the library decides (the head parameters, whose
    default depends on the head); ``help_default``: what the help says the default is, where it
    is not one value; ``short``: a one-letter alias (``-k``).
    """

    help: str
    flag: str | None = None
    choices: Sequence[str] | None = None
    metavar: str | None = None
    negate: bool = False
    parse: Callable[[str], Any] | None = None
    given_only: bool = False
    help_default: str | None = None
    short: str | None = None

    def names(self, field_name: str) -> list[str]:
        """The option's names: ``flag`` (default ``--field-name``), then ``short`` (``-k``) if any."""
        return [self.flag or "--" + field_name.replace("_", "-"), *([self.short] if self.short else [])]


def setting(default: Any = MISSING, help: str = "", *, default_factory: Any = MISSING, **option: Any) -> Any:
    """A dataclass field with its :class:`Option` (``help`` and the keywords of :class:`Option`)."""
    metadata = {"option": Option(help, **option)}
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def options(cls: type) -> Iterator[tuple[dataclasses.Field, Option]]:
    """The fields of the settings dataclass ``cls`` that carry an :class:`Option`, in declaration order."""
    for field in dataclasses.fields(cls):
        if "option" in field.metadata:
            yield field, field.metadata["option"]


def default(field: dataclasses.Field) -> Any:
    """A field's default value (its factory called)."""
    return field.default_factory() if field.default_factory is not MISSING else field.default


# --------------------------------------------------------------------------- the command-line form


def add_settings(parser: argparse.ArgumentParser, cls: type, *names: str, skip: Iterable[str] = ()) -> None:
    """The options of the settings dataclass ``cls`` (those called ``names``, default all, less ``skip``)."""
    hints = typing.get_type_hints(cls)
    for field, option in options(cls):
        if (names and field.name not in names) or field.name in skip:
            continue
        parser.add_argument(*option.names(field.name), dest=field.name, **_argument(field, option, hints[field.name]))


def _argument(field: dataclasses.Field, option: Option, hint: Any) -> dict:
    value = default(field)
    shown = option.help_default or (" ".join(map(str, value)) if isinstance(value, tuple) else str(value))
    stated = option.given_only or option.help_default or isinstance(value, tuple)  # not argparse's default
    help = option.help + (f" (default: {shown})" if stated else "")
    kwargs: dict[str, Any] = {"help": help.replace("%", "%%"), "default": argparse.SUPPRESS if option.given_only
                              else value}
    if hint is bool:
        return {**kwargs, "action": "store_false" if option.negate else "store_true"}
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # X | None
        hint = next(kind for kind in typing.get_args(hint) if kind is not type(None))
    if typing.get_origin(hint) is tuple:  # repeatable; the default stays out of the list (from_args)
        kwargs.update(nargs="+", action="extend", default=kwargs["default"] if option.given_only else None)
        hint = typing.get_args(hint)[0]
    # a parse function runs in from_args, so that what it refuses is featurekit's one-line error, not argparse's
    kwargs["type"] = hint if hint in (int, float) and not option.parse else str
    if option.choices:
        kwargs["choices"] = list(option.choices)
    if option.metavar:
        kwargs["metavar"] = option.metavar
    return kwargs


def from_args(cls: type, args: argparse.Namespace, **values: Any) -> Any:
    """``cls`` with each of its options that ``args`` holds (tuples from lists), then ``values``."""
    return cls(**{**given(cls, args), **values})


def given(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The options of ``cls`` that ``args`` holds (all but those declared ``given_only`` and not given),
    each through its ``parse`` function; a repeatable option not given keeps the field's default."""
    values = {}
    for field, option in options(cls):
        value = getattr(args, field.name, None)
        if not hasattr(args, field.name) or (value is None and default(field) is not None):
            continue
        value = tuple(value) if isinstance(value, list) else value
        values[field.name] = option.parse(value) if option.parse and isinstance(value, str) else value
    return values


def parent(cls: type, *names: str) -> argparse.ArgumentParser:
    """A parser holding the options ``names`` of ``cls``, for commands that share them (argparse ``parents``)."""
    shared = argparse.ArgumentParser(add_help=False)
    add_settings(shared, cls, *names)
    return shared


def weights_path_parent() -> argparse.ArgumentParser:
    """``--weights-path [STORE=]FILE ...``: the same meaning in every command (backbones.weights.weights_files)."""
    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument("--weights-path", nargs="+", default=[], metavar="[STORE=]FILE",
                        help="a backbone's weights from a local file, by store name (FILE alone: the one backbone); "
                             "where a head records a weights file, this replaces its path (default: none)")
    return shared
