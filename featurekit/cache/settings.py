"""What ``featurekit clean`` may remove: :class:`CleanSettings` (no torch here)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import SettingsError
from ..options import setting

__all__ = ["CleanSettings", "parse_age"]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_age(text: str) -> float:
    """``"90"``, ``"90s"``, ``"30m"``, ``"2h"``, ``"7d"`` -> seconds; else a one-line :class:`SettingsError`."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([smhd]?)\s*", str(text))
    if not match:
        raise SettingsError(f"--older-than {text!r}: expected a number of seconds, or one with s, m, h or d (e.g. 2h)")
    return float(match.group(1)) * _UNITS[match.group(2) or "s"]


@dataclass(frozen=True)
class CleanSettings:
    """``older_than``: seconds since a leftover was last written past which it goes even if its store is
    unfinished (None: only the leftovers of finished runs); ``dry_run``: say what would go, remove nothing."""

    older_than: float | None = setting(None, "also remove the chunks of unfinished runs not written to for this long "
                                       "(90s, 30m, 2h, 7d); runs holding their lock are never touched",
                                       metavar="AGE", parse=parse_age, help_default="only finished runs' leftovers")
    dry_run: bool = setting(False, "say what would be removed, remove nothing")

    def __post_init__(self) -> None:
        if isinstance(self.older_than, str):  # "2h" from Python too
            object.__setattr__(self, "older_than", parse_age(self.older_than))
