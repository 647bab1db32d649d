"""Settings that document themselves: each field of a settings dataclass carries its help text.

A field declared with :func:`setting` holds its default, what it means and, where the name on
the command line differs from the field's, that name. The Python API reads the same dataclass,
and the command line (:mod:`featurekit.cli`) builds its options from the fields, so a default,
a list of choices or a help text is written once, beside the code that uses it. Modules that
declare settings import no torch: building the command line's parser must stay fast.
"""

from __future__ import annotations

import dataclasses
from dataclasses import MISSING, dataclass
from typing import Any, Callable, Iterator, Sequence

__all__ = ["Option", "options", "setting"]


@dataclass(frozen=True)
class Option:
    """How a setting reads on the command line.

    ``flag``: the option's name (default ``--field-name``); ``choices``: the values it takes;
    ``negate``: a setting that is on by default and switched off by the flag (``--quiet`` sets
    ``progress`` to False); ``parse``: turns the text given into the value (default: the field's type);
    ``given_only``: passed on only when given, else the library decides (the head parameters, whose
    default depends on the head); ``help_default``: what the help says the default is, where it
    is not one value.
    """

    help: str
    flag: str | None = None
    choices: Sequence[str] | None = None
    metavar: str | None = None
    negate: bool = False
    parse: Callable[[str], Any] | None = None
    given_only: bool = False
    help_default: str | None = None

    def name(self, field_name: str) -> str:
        return self.flag or "--" + field_name.replace("_", "-")


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
