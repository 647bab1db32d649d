"""A list of image files as a split: a text file of paths, or a CSV with ``path[,label]`` columns.

- text: one path per line; blank lines and lines starting with ``#`` are skipped;
- CSV (a ``.csv`` file, or standard input whose first line is a CSV header, with a comma, naming ``path``):
  a header row with a ``path`` column and, optionally, a ``label`` column (class names: every row
  has one, or the list is unlabelled).

Paths are relative to the list's folder (the working folder for standard input, ``-``); absolute
paths stay as they are. Rows are in the list's order. The list's sha256 is its identity: stores
record it (with each file's size and mtime, as for a folder), so an edited list reads as stale.
A listed file that does not exist is kept as a row that cannot be read, named with its line
number, so ``--on-error`` decides (skip: recorded with that reason; fail: stopped before any work).
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import sys
from pathlib import Path
from typing import BinaryIO

from ..errors import DataError, os_reason
from .decode import Unavailable
from .listing import ImageRecord, SplitListing
from .names import printable_path

__all__ = ["STDIN", "is_list_reference", "read_list"]

STDIN = "-"


def is_list_reference(path: str | os.PathLike) -> bool:
    """Whether a path given as an input names a list: ``@FILE`` (``@-``: standard input)."""
    return isinstance(path, str) and path.startswith("@") and len(path) > 1


def read_list(path: str | os.PathLike, split: str = "", stdin: BinaryIO | None = None) -> SplitListing:
    """The listing of the list file ``path`` (``-``: ``stdin``, default standard input) as split ``split``.

    Raises :class:`DataError` (one line, naming the list and the line) for a list that cannot be
    read, a CSV without a ``path`` column, a path listed twice, a row without a label in a labelled
    list, or a list of no path at all."""
    from_stdin = str(path) == STDIN
    shown = "standard input" if from_stdin else printable_path(str(path))
    try:
        data = (stdin or sys.stdin.buffer).read() if from_stdin else Path(path).read_bytes()
    except OSError as error:
        raise DataError(f"{shown}: cannot read the list ({os_reason(error)})") from None
    folder = Path.cwd() if from_stdin else Path(path).resolve().parent
    text = data.decode("utf-8", "surrogateescape")
    entries = _csv_entries(text, shown) if _is_csv(str(path), text) else _text_entries(text)
    if not entries:
        raise DataError(f"{shown}: lists no image path")
    labels = [label for _, _, label in entries]
    labelled = labels[0] is not None  # a CSV with a label column
    unlabelled_row = next(((line, entry) for line, entry, label in entries if label == ""), None)
    if unlabelled_row:
        raise DataError(f"{shown}: line {unlabelled_row[0]}: {printable_path(unlabelled_row[1])} has no label "
                        "(the list has a label column: every row needs one)")
    classes = sorted(set(labels)) if labelled else []
    index = {name: i for i, name in enumerate(classes)}
    records, readers, missing, first_line = [], [], [], {}
    for line, entry, label in entries:
        relative = Path(os.path.normpath(entry)).as_posix()
        if relative in first_line:
            raise DataError(f"{shown}: line {line}: {printable_path(relative)} listed twice (first on line "
                            f"{first_line[relative]})")
        first_line[relative] = line
        record, reason = _record(folder, relative, index[label] if labelled else -1)
        records.append(record)
        readers.append(Unavailable(f"{reason} ({shown} line {line})") if reason else None)
        if reason:
            missing.append((f"line {line} {printable_path(relative)}", reason))
    source = {"kind": "list", "list": STDIN if from_stdin else printable_path(str(Path(path).resolve())),
              "list_sha256": hashlib.sha256(data).hexdigest()}
    return SplitListing(folder, split, tuple(classes), tuple(records), source=source, folder=folder,
                        labelled=labelled, readers=tuple(readers) if missing else None, missing=tuple(missing),
                        name=shown)


def _is_csv(path: str, text: str) -> bool:
    """A ``.csv`` file, or standard input whose first line is a header naming a ``path`` column."""
    if path.lower().endswith(".csv"):
        return True
    first = text.split("\n", 1)[0].strip()
    return path == STDIN and "," in first and "path" in next(csv.reader([first]))


def _text_entries(text: str) -> list[tuple[int, str, None]]:
    """(line number, path, no label) of each path line."""
    lines = (line.strip() for line in text.splitlines())
    return [(number, line, None) for number, line in enumerate(lines, 1) if line and not line.startswith("#")]


def _csv_entries(text: str, shown: str) -> list[tuple[int, str, str | None]]:
    """(line number, path, label or None) of each CSV row; its header must name a ``path`` column."""
    rows = csv.reader(io.StringIO(text, newline=""))
    header = [name.strip() for name in next(rows, [])]
    if "path" not in header:
        raise DataError(f"{shown}: a CSV list without a path column (its header: {', '.join(header) or 'empty'})")
    where, label_at = header.index("path"), header.index("label") if "label" in header else None
    entries = []
    for row in rows:
        if not any(cell.strip() for cell in row):
            continue
        line = rows.line_num
        if len(row) <= max(where, label_at or 0):
            raise DataError(f"{shown}: line {line}: {len(row)} columns, the header has {len(header)}")
        entries.append((line, row[where].strip(), row[label_at].strip() if label_at is not None else None))
    return entries


def _record(folder: Path, relative: str, label: int) -> tuple[ImageRecord, str | None]:
    """The record of a listed file, and why it cannot be read (None if it can be opened)."""
    try:
        info = os.stat(folder / relative)
    except OSError as error:
        reason = "no such file" if isinstance(error, FileNotFoundError) else os_reason(error)
        return ImageRecord(relative, label, -1, -1), reason
    return ImageRecord(relative, label, info.st_size, info.st_mtime_ns), None
