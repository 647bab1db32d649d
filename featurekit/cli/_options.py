"""What the commands share: the help format, ``--backbone``, and output (options from settings:
:mod:`featurekit.options`)."""

from __future__ import annotations

import argparse
import importlib
import sys
import textwrap
from typing import Iterable

from ..errors import one_line

__all__ = ["HelpFormatter", "add_backbones", "command", "library", "say"]


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written; every option's help ends with its default, unless it is
    a flag, required, or its help states the default itself (where the default is not one value)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (any(action.default is v for v in (None, False, argparse.SUPPRESS)) or action.required  # 0 is a default
                or action.nargs == 0  # a flag
                or "default" in text
                or not (action.option_strings or action.nargs in ("?", "*"))):
            return text
        default = action.default
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


def command(commands, name: str, summary: str, **kwargs) -> argparse.ArgumentParser:
    """A subcommand whose one-line ``summary`` is both its line in ``featurekit --help`` and its description."""
    description = kwargs.pop("description", summary[0].upper() + summary[1:] + ".")
    return commands.add_parser(name, help=summary, description=textwrap.fill(description, 100),
                               formatter_class=HelpFormatter, **kwargs)


def add_backbones(parser: argparse.ArgumentParser, help: str, required: bool = True) -> None:
    """``--backbone`` in every command that names backbones (``--backbones`` is accepted too)."""
    parser.add_argument("--backbone", "--backbones", dest="backbone", nargs="+", required=required, metavar="NAME",
                        help=help)


def say(lines: str | Iterable[str], error: bool = False) -> None:
    """Print a result (stdout) or, with ``error``, a line beside the results (stderr), each as one line
    of printable text (:func:`featurekit.errors.one_line`: names from files cannot hold terminal escapes)."""
    for line in [lines] if isinstance(lines, str) else lines:
        for part in line.split("\n"):  # line breaks the library wrote; names in it hold none (printable_path)
            print(one_line(part), file=sys.stderr if error else sys.stdout)


def library(name: str):
    """A library module, imported when its command runs (building the parser imports no torch)."""
    return importlib.import_module(f"featurekit.{name}")
