"""The errors a user can cause, and how they read: one line that names the file and the reason.

Every such error derives from :class:`FeaturekitError`; the command line prints it (and any
``OSError``) as ``featurekit: error: <one line>`` and exits 1. Anything else is a bug in featurekit
and keeps its traceback. Subclasses that also derive from ``ValueError`` do so where Python or
scikit-learn convention expects it (bad argument values, bad input data).
"""

from __future__ import annotations

import json


class FeaturekitError(Exception):
    """An error the user can cause and fix. ``str()`` is one line naming the file and the reason."""


class SettingsError(FeaturekitError, ValueError):
    """An option or parameter value that cannot work (unknown name, out of range, device absent)."""


def first_line(error: BaseException) -> str:
    """An exception's message cut to its first line, or its type name if it has no message."""
    lines = str(error).splitlines()
    return lines[0] if lines else type(error).__name__


def one_line(text: str) -> str:
    """``text`` with line breaks escaped, so a file name holding one cannot split a message."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


def describe_os_error(error: OSError) -> str:
    """``<file>: <reason>`` for an OS error (``[Errno 28] ...`` names no file and says it twice)."""
    reason = "no space left on device" if error.errno == 28 else (error.strerror or first_line(error))
    return f"{error.filename}: {reason}" if error.filename else reason


def short(value: object) -> str:
    """A value as messages show it (dicts and lists as sorted JSON)."""
    return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)
