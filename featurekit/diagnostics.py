"""Where featurekit's diagnostics go: its log lines and warnings, one line each, on a stream.

The library logs progress and summaries through :mod:`logging` (logger ``featurekit`` and its
children) and warns of what a user should know (features of random weights, a choice decided by
a tie) with :class:`~featurekit.errors.FeaturekitWarning`; it never prints. Python users see the
warnings as Python shows any warning, and the log lines where they configure logging; the command
line, and anyone who wants what it shows, uses :func:`diagnostics`::

    with featurekit.diagnostics.diagnostics(sys.stderr):
        featurekit.extract(...)
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from typing import Iterator, TextIO

from .errors import FeaturekitWarning, one_line

__all__ = ["diagnostics"]


class OneLine(logging.Formatter):
    """Each record as one line of printable text (:func:`featurekit.errors.one_line`): names and
    values from files cannot split it or send a terminal escape sequences."""

    def format(self, record: logging.LogRecord) -> str:
        return one_line(super().format(record))


@contextlib.contextmanager
def diagnostics(stream: TextIO) -> Iterator[None]:
    """featurekit's log lines (logger ``featurekit``, INFO and up) and :class:`FeaturekitWarning` s on
    ``stream``, one line each, inside the block (``featurekit`` prints them to stderr while a command
    runs). Under torchrun, ranks other than 0 say only what is their own (``extra={"every_rank": True}``):
    rank 0 speaks for the job."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(OneLine("%(message)s"))
    logger, speaks = logging.getLogger("featurekit"), int(os.environ.get("RANK", "0")) == 0
    handler.addFilter(lambda record: speaks or getattr(record, "every_rank", False))
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    shown = warnings.showwarning

    def show(message, category, *where, **options):
        if not issubclass(category, FeaturekitWarning):
            return shown(message, category, *where, **options)
        if speaks:
            logger.warning(f"warning: {message}")

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", FeaturekitWarning)
            warnings.showwarning = show
            yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
