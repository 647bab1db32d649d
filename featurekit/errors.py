"""Every error and warning a user can cause, and how they read: one line that names the file and the reason.

Every such error derives from :class:`FeaturekitError`; the command line prints it (and any
``OSError``) as ``featurekit: error: <one line>`` and exits 1. Anything else is a bug in featurekit
and keeps its traceback. Subclasses that also derive from ``ValueError`` do so where Python or
scikit-learn convention expects it (bad argument values, bad input data).

What a user should know but that does not stop the work (features of random weights, a selection
decided by a tie) is a :class:`FeaturekitWarning`, issued with :func:`warnings.warn`, so Python
users see it too and can filter it; progress and summaries go to :mod:`logging`.

The errors, by the stage that raises them:

========================  ==========================================================================
images                    :class:`DataError` (the folder), :class:`ImageDecodeError` (one file)
views                     :class:`AugmentError`
store                     :class:`StoreError`, :class:`AlignmentError`
backbones                 :class:`BackboneError`, :class:`WeightsError`, :class:`HeadMismatchError`
heads                     :class:`HeadError`, :class:`HeadFileError`, :class:`AuditError` (an audit file)
finetuning                :class:`FinetuneError`
audit                     :class:`AuditError`
files (any output)        :class:`WriteError`, :class:`LockError`
options (any stage)       :class:`SettingsError`
========================  ==========================================================================
"""

from __future__ import annotations

import errno
import json

__all__ = [
    "AlignmentError", "AuditError", "AugmentError", "BackboneError", "DataError", "FeaturekitError",
    "FeaturekitWarning", "FinetuneError", "HeadError", "HeadFileError", "HeadMismatchError", "ImageDecodeError",
    "LockError", "SettingsError", "StoreError", "WeightsError", "WriteError", "describe_os_error", "first_line",
    "one_line", "os_reason", "short",
]


class FeaturekitError(Exception):
    """An error the user can cause and fix. ``str()`` is one line naming the file and the reason."""


class FeaturekitWarning(UserWarning):
    """Something the user should know that does not stop the work (random weights, a tie decided a choice)."""


class SettingsError(FeaturekitError, ValueError):
    """An option or parameter value that cannot work (unknown name, out of range, device absent)."""


class DataError(FeaturekitError, ValueError):
    """The data set folder itself is unusable (missing split, no classes, no images)."""


class ImageDecodeError(FeaturekitError):
    """One image could not be turned into RGB pixels. ``str()`` is ``"<path>: <reason>"``."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class AugmentError(SettingsError):
    """An unknown policy or test-time mode, or policy parameters that cannot work (one line)."""


class StoreError(FeaturekitError):
    """A store is missing, incomplete, stale or damaged. ``str()`` names the file and the reason."""


class AlignmentError(FeaturekitError, ValueError):
    """Stores that should describe the same images row for row, alike, do not. One line naming them."""


class BackboneError(FeaturekitError, ValueError):
    """An unknown backbone name or feature node. One line, with the closest names."""


class WeightsError(FeaturekitError):
    """Weights cannot be obtained or do not fit the architecture. One line, says what to do."""


class HeadMismatchError(FeaturekitError, ValueError):
    """The backbones available now would not make the features a head (or store) was made from."""


class HeadError(FeaturekitError, ValueError):
    """A head cannot be trained on these rows (one class only, validation labels it never saw)."""


class HeadFileError(FeaturekitError):
    """A head file or fine-tuned model cannot be read or is not a featurekit one. One line naming the file."""


class AuditError(FeaturekitError, ValueError):
    """An audit cannot run on these stores, or its file cannot be used to leave rows out. One line."""


class FinetuneError(FeaturekitError, ValueError):
    """A head, option or checkpoint that fine-tuning cannot work with. One line."""


class WriteError(FeaturekitError):
    """An output cannot be written (disk full, permissions). Names the file; nothing half written stays."""


class LockError(FeaturekitError):
    """Another process holds the output, or its lock file is not a plain file."""


def first_line(error: BaseException) -> str:
    """An exception's message cut to its first line, or its type name if it has no message."""
    lines = str(error).splitlines()
    return lines[0] if lines else type(error).__name__


def one_line(text: str) -> str:
    """``text`` as one line of printable characters: line breaks escaped (``\\n``), so a file name
    holding one cannot split a message, and every other unprintable character (a terminal's escape
    sequences in a file's content, an undecodable byte of a name) as ``\\xNN`` or ``\\uNNNN``."""
    if text.isprintable():
        return text
    return "".join(_printable(char) for char in text)


def _printable(char: str) -> str:
    if char in "\r\n":
        return "\\r" if char == "\r" else "\\n"
    if char.isprintable():
        return char
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte, as os.fsdecode holds it
        code -= 0xDC00
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def os_reason(error: OSError) -> str:
    """The reason of an OS error in lower case, without its file name or errno prefix (``[Errno 28] ...``
    names no file and says it twice). h5py drops the errno of a full disk, so its text is read too."""
    if error.errno == errno.ENOSPC or "No space left" in str(error):
        return "no space left on device"
    if isinstance(error, PermissionError):
        return "permission denied"
    text = error.strerror or first_line(error)
    return text[:1].lower() + text[1:]


def describe_os_error(error: OSError) -> str:
    """``<file>: <reason>`` for an OS error, as the command line prints it."""
    reason = os_reason(error)
    return f"{error.filename}: {reason}" if error.filename else reason


def short(value: object) -> str:
    """A value as messages show it (dicts and lists as sorted JSON)."""
    return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)
