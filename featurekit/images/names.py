"""Names of image files as featurekit stores and prints them: one line, UTF-8, injective.

OS paths may hold bytes that are not UTF-8 (``os.fsdecode`` keeps them as surrogate escapes) and
characters that would split a message. :func:`printable_path` is the one form stores record and
messages show; :func:`fs_path` turns it back into the OS path.
"""

from __future__ import annotations

import os
import re

__all__ = ["NAMES_SHOWN", "counted", "fs_path", "printable_path"]

NAMES_SHOWN = 5  # names per notice line; the rest are counted

# --------------------------------------------------------------------------- names


def printable_path(path: str) -> str:
    """An OS path (non-UTF-8 bytes held as ``os.fsdecode``'s surrogate escapes) -> the one-line
    UTF-8 form featurekit stores and prints.

    Printable characters stay as they are; a backslash becomes ``\\\\``, an undecodable byte or an
    ASCII control character ``\\xNN`` (the byte), any other unprintable character (line separators,
    C1 controls, format characters) ``\\uNNNN``. The form is injective; :func:`fs_path` inverts it.
    """
    if path.isprintable() and "\\" not in path:
        return path
    return "".join(_printable_char(char) for char in path)


def _printable_char(char: str) -> str:
    if char == "\\":
        return "\\\\"
    if char.isprintable():  # surrogates are not
        return char
    code = ord(char)
    if code < 0x80:
        return f"\\x{code:02x}"
    if 0xDC80 <= code <= 0xDCFF:  # the undecodable byte code - 0xDC00
        return f"\\x{code - 0xDC00:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


_ESCAPE = re.compile(r"\\(\\|x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8})")


def fs_path(printed: str) -> str:
    """A :func:`printable_path` (a stored or printed name) -> the OS path it came from.

    ``\\xNN`` is the byte NN, so names with undecodable bytes come back as ``os.fsdecode`` makes
    them; a backslash that starts no escape (names stored before backslashes were doubled) stays.
    """
    if "\\" not in printed:
        return printed
    raw, position = bytearray(), 0
    for escape in _ESCAPE.finditer(printed):
        raw += printed[position:escape.start()].encode("utf-8", "surrogateescape")
        token = escape.group(1)
        if token == "\\":
            raw += b"\\"
        elif token[0] == "x":
            raw.append(int(token[1:], 16))
        else:
            raw += chr(int(token[1:], 16)).encode("utf-8", "surrogatepass")
        position = escape.end()
    raw += printed[position:].encode("utf-8", "surrogateescape")
    return os.fsdecode(bytes(raw))


def counted(paths, singular: str, plural: str, predicate: str, shown: int = NAMES_SHOWN) -> str:
    """``"2 <plural> <predicate>: a, b"``: one line, at most ``shown`` names, the rest counted."""
    paths = list(paths)
    more = f" and {len(paths) - shown} more" if len(paths) > shown else ""
    noun = singular if len(paths) == 1 else plural
    return f"{len(paths)} {noun} {predicate}: {', '.join(paths[:shown])}{more}"
