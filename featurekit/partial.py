"""The commit protocol of a store under construction: whole chunks in ``.<store>.partial/``.

Rows are committed in chunks: each chunk is an ``.npz`` written under a temporary name, fsynced
and renamed into the partial directory, whose ``manifest.json`` holds the store's fingerprint
(and identity, to say what changed when a later run differs). A run killed at any moment leaves
only whole chunks, and a rerun continues from them. Chunks are keyed by global row ranges, so
processes that each extract a contiguous range (torchrun ranks, ``--shard``) commit into one
directory, and one of them joins them (:meth:`featurekit.store.StoreWriter.finish`).

Temporary files (``.chunk-*.npz.tmp-PID``) left by a killed process are deleted by the next
writer that holds the store's lock; they are never reused, since they may be half written.
"""

from __future__ import annotations

import glob
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import FeaturekitError, first_line
from .files import atomic_output, atomic_write, crash_point, fsync_dir

MANIFEST_VERSION = 1


class StoreError(FeaturekitError):
    """A store is missing, incomplete, stale or damaged. ``str()`` names the file and the reason."""


@dataclass(frozen=True)
class Chunk:
    """Rows ``[start, stop)`` of the listing: features of the kept ones, reasons for the rest."""

    start: int
    stop: int
    kept: np.ndarray  # int64[n] global indices
    features: np.ndarray  # float16|float32 [n, D]
    skipped: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # int64[k]
    reasons: tuple[str, ...] = ()


@dataclass(frozen=True)
class JoinedRows:
    """All chunks of a store, joined: ``kept`` int64[N] rows with ``features`` [N, D], ``skipped``
    int64[K] rows with their ``reasons``."""

    kept: np.ndarray
    features: np.ndarray
    skipped: np.ndarray
    reasons: list[str]


class PartialStore:
    """The committed chunks of the store ``final``.

    Only a holder of the store's lock may call :meth:`start`, :meth:`remove_temporaries` and
    :meth:`discard`: they delete what a killed writer left. :meth:`write` also runs in processes
    that share the lock holder's run (torchrun ranks); each commits its own chunks.
    """

    def __init__(self, final: Path):
        self.final = final
        self.dir = final.with_name(f".{final.stem}.partial")

    @property
    def manifest(self) -> Path:
        return self.dir / "manifest.json"

    def recorded(self) -> dict | None:
        """The manifest of the chunks on disk: None when there is none, {} when it is unreadable."""
        if not self.manifest.is_file():
            return None
        try:
            recorded = json.loads(self.manifest.read_text())
        except (ValueError, OSError):
            return {}
        return recorded if isinstance(recorded, dict) else {}

    def holds(self, fingerprint: str) -> bool:
        """Whether the chunks on disk (if any) were committed for this very fingerprint."""
        return (self.recorded() or {}).get("fingerprint") == fingerprint

    def start(self, fingerprint: str, identity: dict) -> None:
        """Discard whatever is there and begin an empty set of chunks for ``fingerprint``."""
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        manifest = {"fingerprint": fingerprint, "identity": identity, "manifest_version": MANIFEST_VERSION}
        atomic_write(self.manifest, json.dumps(manifest, sort_keys=True))
        fsync_dir(self.dir.parent)
        crash_point("manifest-written")

    def temporaries(self) -> list[Path]:
        """Files being written (by the lock holder) or half written (by a killed writer)."""
        found = list(self.final.parent.glob(f".{glob.escape(self.final.name)}.tmp-*"))
        return found + (list(self.dir.glob(".*.tmp-*")) if self.dir.is_dir() else [])

    def remove_temporaries(self) -> int:
        """Delete half-written files of a killed writer of this store; returns how many."""
        leftovers = self.temporaries()
        for leftover in leftovers:
            leftover.unlink(missing_ok=True)
        return len(leftovers)

    def committed(self) -> list[tuple[int, int]]:
        """Ranges of the chunks on disk, sorted."""
        ranges = []
        for entry in self.dir.glob("chunk-*-*.npz"):
            bounds = entry.stem.split("-")[1:]
            if len(bounds) == 2 and all(b.isdigit() for b in bounds):
                ranges.append((int(bounds[0]), int(bounds[1])))
        return sorted(ranges)

    def chunk_path(self, start: int, stop: int) -> Path:
        return self.dir / f"chunk-{start:012d}-{stop:012d}.npz"

    def write(self, chunk: Chunk) -> None:
        """Commit one chunk atomically (temporary name, fsync, rename, fsync directory)."""
        bad = ~np.isfinite(chunk.features).all(axis=1)
        if bad.any():
            cause = ("overflow of float16: use --dtype float32" if chunk.features.dtype == np.float16
                     else "NaN/Inf from the model")
            raise StoreError(f"{self.final}: non-finite features for row {int(chunk.kept[bad.argmax()])} ({cause})")
        target = self.chunk_path(chunk.start, chunk.stop)
        with atomic_output(target, "cannot write chunk", crash_at="chunk-tmp-written") as temporary:
            with open(temporary, "wb") as handle:
                np.savez(handle, kept=chunk.kept, features=chunk.features, skipped=chunk.skipped,
                         reasons=np.array(chunk.reasons, dtype=str).reshape(-1))
        crash_point("chunk-committed")

    def read(self, n: int) -> list[Chunk]:
        """The committed chunks that tile rows ``[0, n)``, in order. Raises :class:`StoreError`
        when rows are missing, or removes a damaged chunk and says to run again."""
        chunks = []
        for start, stop in self._tiling(n):
            path = self.chunk_path(start, stop)
            try:
                with np.load(path, allow_pickle=False) as data:
                    chunks.append(Chunk(start, stop, data["kept"], data["features"], data["skipped"],
                                        tuple(data["reasons"].tolist())))
            except Exception as error:  # zipfile, numpy and OS errors alike mean the file is damaged
                path.unlink(missing_ok=True)
                raise StoreError(f"{path}: damaged chunk removed ({first_line(error)}); run the same command again "
                                 f"to recompute rows {start}-{stop}") from None
        return chunks

    def _tiling(self, n: int) -> list[tuple[int, int]]:
        """Committed ranges that cover ``[0, n)`` exactly once (runs with other chunk sizes may overlap)."""
        committed = self.committed()
        gaps = uncovered(committed, n)
        if gaps:
            start, stop = gaps[0]
            raise StoreError(f"{self.dir}: rows {start}-{stop} were never committed; run the same command again")
        next_stop: dict[int, int] = {n: n}
        for start, stop in sorted(committed, reverse=True):  # a stop is always decided before its start
            if stop in next_stop and start not in next_stop:
                next_stop[start] = stop
        if 0 not in next_stop:
            raise StoreError(f"{self.dir}: committed chunks overlap without tiling rows 0-{n}; "
                             "pass --overwrite to redo them")
        tiling, position = [], 0
        while position < n:
            tiling.append((position, next_stop[position]))
            position = next_stop[position]
        return tiling

    def join(self, n: int) -> "JoinedRows":
        """Every committed row of ``[0, n)``, in listing order."""
        chunks = self.read(n)
        return JoinedRows(np.concatenate([c.kept for c in chunks]), np.concatenate([c.features for c in chunks]),
                          np.concatenate([c.skipped for c in chunks]), [r for c in chunks for r in c.reasons])

    def discard(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def discard_finished(self, fingerprint: str) -> bool:
        """Delete what a writer killed between the final rename and its cleanup left: temporaries, and
        chunks of ``fingerprint`` (the finished store's; chunks of another run are someone's work)."""
        finished = self.dir.is_dir() and self.holds(fingerprint)
        if finished:
            self.discard()
        return bool(self.remove_temporaries()) or finished


def uncovered(ranges: Sequence[tuple[int, int]], n: int) -> list[tuple[int, int]]:
    """The row ranges of ``[0, n)`` that no range in ``ranges`` covers, in order."""
    gaps, position = [], 0
    for start, stop in sorted(ranges):
        if start > position:
            gaps.append((position, min(start, n)))
        position = max(position, stop)
    if position < n:
        gaps.append((position, n))
    return [(start, stop) for start, stop in gaps if start < stop]
