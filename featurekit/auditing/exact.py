"""Exact duplicates: rows whose files hold the same bytes, within and across splits.

Stores made since featurekit records digests hold each file's sha256 (``file_sha256``, hashed at
extraction from the bytes the decode read). For a store made before, and a row whose digest is not
known, the file is hashed here on demand, and only if it can have a copy: equal bytes mean equal
sizes, so only rows whose recorded size another row shares are read (caltech101: 3,213 of 8,677
files). A file changed since extraction (its size differs from the recorded one) is not hashed:
its bytes are no longer what was extracted. Grouping equal digests is one sort: N log N.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..errors import ImageDecodeError
from ..files import file_sha256
from ..images.decode import ImageSource, content_sha256, read_image_bytes

__all__ = ["Digests", "equal_groups", "row_digests"]


@dataclass
class Digests:
    """``sha256`` S64[N] of every row (b"" where unknown), and how they were had: ``recorded`` rows
    read from the stores, ``hashed`` rows hashed here (``hashed_bytes``), ``changed``: rows whose file
    changed since extraction (not hashed), ``unreadable``: rows whose file could not be read."""

    sha256: np.ndarray
    recorded: int = 0
    hashed: int = 0
    hashed_bytes: int = 0
    changed: list[int] = field(default_factory=list)
    unreadable: list[int] = field(default_factory=list)


def row_digests(recorded: Sequence[np.ndarray | None], lengths: Sequence[int], sizes: np.ndarray,
                sources: Sequence[ImageSource], workers: int = 4) -> Digests:
    """The digest of each row: ``recorded`` per split (S64[``lengths[s]``], or None for a store without
    digests), the rest hashed from ``sources`` when their recorded ``sizes`` int64[N] collide."""
    known = np.concatenate([np.zeros(n, "S64") if digests is None else digests.astype("S64")
                            for digests, n in zip(recorded, lengths)])
    values, counts = np.unique(sizes, return_counts=True)
    wanted = np.flatnonzero((known == b"") & np.isin(sizes, values[counts > 1]))
    result = Digests(known.copy(), recorded=int((known != b"").sum()))
    with ThreadPoolExecutor(workers) as pool:  # hashlib releases the GIL: files are read and hashed at once
        for row, (digest, size) in zip(wanted, pool.map(lambda r: _hash(sources[r], int(sizes[r])), wanted)):
            if digest is None:
                (result.changed if size >= 0 else result.unreadable).append(int(row))
            else:
                result.sha256[row] = digest.encode()
                result.hashed += 1
                result.hashed_bytes += size
    return result


def _hash(source: ImageSource, recorded_size: int) -> tuple[str | None, int]:
    """(sha256, size) of the file's bytes; (None, size) if it changed size since extraction, (None, -1)
    if it cannot be read."""
    try:
        if isinstance(source, (str, os.PathLike)):
            if os.stat(source).st_size != recorded_size:
                return None, 0
            return file_sha256(source), recorded_size
        data = read_image_bytes(source)
        return (content_sha256(data), len(data)) if len(data) == recorded_size else (None, 0)
    except (OSError, ImageDecodeError):
        return None, -1


def equal_groups(digests: np.ndarray) -> list[np.ndarray]:
    """Rows whose digests (S64[N]; b"" never groups) are equal, each group increasing, groups by first row:
    one stable sort of fixed-width keys (10^6 digests in about a second)."""
    order = np.argsort(digests, kind="stable")
    ordered = digests[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    sizes = np.diff(np.r_[starts, len(digests)])
    groups = [np.sort(order[s:s + c]) for s, c in zip(starts, sizes) if c > 1 and ordered[s] != b""]
    return sorted(groups, key=lambda group: int(group[0]))
