"""What several commands share: the help format, option groups and small helpers."""

from __future__ import annotations

import argparse
import sys
import textwrap

from ..backbones.registry import random_weights_warning
from ..errors import SettingsError


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written; every option's help ends with its default, unless it is
    a flag, required, or its help states the default itself (where the default is not one value)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (any(action.default is v for v in (None, False, argparse.SUPPRESS)) or action.required  # 0 is a default
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


def backbone_option(parser: argparse.ArgumentParser, help: str) -> None:
    """``--backbone`` in every command that names backbones (``--backbones`` is accepted too)."""
    parser.add_argument("--backbone", "--backbones", dest="backbone", nargs="+", required=True, metavar="NAME",
                        help=help)


def warn_random(store_names: list[str], log) -> None:
    if store_names:
        log(random_weights_warning(store_names))

def weights_paths(pairs: list[str]) -> dict[str, str]:
    """``--weights-path STORE=FILE ...`` as {store name: file} (predict and finetune)."""
    if any("=" not in pair for pair in pairs):
        raise SettingsError(f"--weights-path expects STORE=FILE, got {next(p for p in pairs if '=' not in p)!r}")
    return dict(pair.split("=", 1) for pair in pairs)


def stderr(line: str) -> None:
    print(line, file=sys.stderr)
