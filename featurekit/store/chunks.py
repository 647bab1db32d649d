"""The commit protocol of a store under construction: whole chunks in ``.<store>.partial/``.

Rows are committed in chunks: each chunk is an ``.npz`` written under a temporary name, fsynced
and renamed into the partial directory, whose ``manifest.json`` holds the store's fingerprint
(and identity, to say what changed when a later run differs); each chunk records the
fingerprint too. A run killed at any moment leaves only whole chunks, and a rerun continues from
them. Chunks are keyed by global row ranges, so processes that each extract a contiguous range
(torchrun ranks, ``--shard``) commit into one directory, and one of them joins them
(:meth:`featurekit.store.writer.StoreWriter.finish`).

Who may do what:

- anyone (shards of one run, started together on several hosts): :meth:`create` (makes the
  directory and manifest if absent, atomically, without a lock), :meth:`write`;
- the holder of the store's lock: :meth:`start` (replace the chunks of another run) and
  :meth:`discard` (after the join). Temporary files (``.chunk-*.npz.tmp-HOST-PID``) may be a live
  shard's on another host, so they are only ever deleted with the whole directory, by the join,
  when every chunk is committed; store temporaries (``.<store>.h5.tmp-*``), written only under the
  lock, are deleted by the next lock holder. Neither is ever reused: it may be half written.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from ..errors import LockError, StoreError, first_line
from ..files import FileLock, atomic_output, crash_point, fsync_dir, temporary_name, temporary_prefix
from .format import SHA256_DTYPE
from .layout import PLAIN

__all__ = ["Chunk", "PartialStore", "store_lock", "uncovered"]

MANIFEST_VERSION = 1
DIGEST_PREFIX = "file_"  # a chunk's file digests: file_sha256, file_skipped_sha256
SHORT_LOCK_S = 30  # how long a shard waits for a lock that others hold only to replace a manifest



@dataclass(frozen=True)
class Chunk:
    """Rows ``[start, stop)`` of the listing: features of the kept ones, reasons for the rest."""

    start: int
    stop: int
    kept: np.ndarray  # int64[n] global indices
    features: np.ndarray  # float16|float32 [n, D]
    skipped: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # int64[k]
    reasons: tuple[str, ...] = ()
    views: dict[str, np.ndarray] = field(default_factory=dict)  # view dataset -> float16|float32 [n, views, D]
    # sha256 (hex, S64) of the bytes each kept and skipped file's decode read ("" where none were read);
    # None: not known (chunks of an older featurekit): the store then records no digests
    sha256: np.ndarray | None = None
    skipped_sha256: np.ndarray | None = None


@dataclass(frozen=True)
class JoinedRows:
    """The rows of all chunks of a store, without their features: ``kept`` int64[N], ``skipped``
    int64[K] with their ``reasons``, and the ``tiling`` the features come from: (chunk start, chunk
    stop, first row, stop row), the rows ``[first, stop row)`` of chunk ``[start, stop)``;
    ``sha256``, ``skipped_sha256``: S64[N], S64[K] file digests, or None if a chunk recorded none."""

    kept: np.ndarray
    skipped: np.ndarray
    reasons: list[str]
    tiling: list[tuple[int, int, int, int]]
    sha256: np.ndarray | None = None
    skipped_sha256: np.ndarray | None = None


class PartialStore:
    """The committed chunks of the store ``final`` made with ``fingerprint`` (the rules of who may
    call what are in the module docstring). ``fingerprint`` may be empty for reading ranges only."""

    def __init__(self, final: Path, fingerprint: str = ""):
        self.final = final
        self.fingerprint = fingerprint
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

    def holds(self) -> bool:
        """Whether the chunks on disk (if any) were committed for this very fingerprint."""
        return (self.recorded() or {}).get("fingerprint") == self.fingerprint

    def create(self, identity: dict) -> bool:
        """Make the directory and its manifest unless there is one; whether it is this fingerprint's.
        Safe for any number of processes at once: the manifest is linked into place, never replaced."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self.manifest.exists():
            manifest = {"fingerprint": self.fingerprint, "identity": identity, "manifest_version": MANIFEST_VERSION}
            temporary = temporary_name(self.manifest)
            try:
                with atomic_output(temporary) as written:
                    written.write_text(json.dumps(manifest, sort_keys=True))
                _link_if_absent(temporary, self.manifest)
            finally:
                temporary.unlink(missing_ok=True)
            fsync_dir(self.dir)
            fsync_dir(self.dir.parent)
            crash_point("manifest-written")
        return self.holds()

    def resume(self, identity: dict, refuse: Callable[[], None]) -> str:
        """Lock holder: resume this fingerprint's chunks, or start afresh once ``refuse`` (which raises
        to keep another run's chunks) has passed. Returns what was done, for the log."""
        removed = self.remove_temporaries(chunks=False)  # a chunk temporary may be a live shard's
        committed = len(self.committed())
        if self.holds():
            return _with_removed(f"resumed ({committed} chunks committed)" if committed else "", removed)
        refuse()
        self.start(identity)
        return _with_removed(f"{committed} stale committed chunks discarded (--overwrite)" if committed else "",
                             removed)

    def share(self, identity: dict, refuse: Callable[[], None]) -> str:
        """A shard: use this fingerprint's chunks, creating them if absent, without keeping the lock.
        Another run's are replaced, under the lock, once ``refuse`` has passed. Returns what was done."""
        if self.create(identity):
            return ""
        refuse()
        with self.lock(wait=SHORT_LOCK_S):
            if self.holds():  # replaced meanwhile by another shard of this run
                return ""
            committed = len(self.committed())
            self.start(identity)
        return f"{committed} stale committed chunks discarded (--overwrite)" if committed else ""

    def refuse_foreign(self, difference: Callable[[dict], object]) -> None:
        """Raise :class:`StoreError` if chunks of another run are committed here, saying what
        differs: ``difference(recorded identity)`` (None when only the images differ)."""
        if self.holds() or not self.committed():
            return
        try:
            change = difference((self.recorded() or {}).get("identity", {}))
        except (KeyError, TypeError):
            change = "an unreadable manifest"
        why = f"used other {change}" if change else "saw other image files (added, removed or modified since)"
        raise StoreError(f"{self.final}: the {len(self.committed())} committed chunks in {self.dir} "
                         f"are from an unfinished run that {why}; pass --overwrite to discard them")

    def lock(self, wait: float = 0.0) -> FileLock:
        return store_lock(self.final, wait)

    def start(self, identity: dict) -> None:
        """Lock holder: discard whatever is there and begin an empty set of chunks for this fingerprint."""
        self.discard()
        if not self.create(identity):
            raise StoreError(f"{self.dir}: another run began committing chunks at the same moment; run again")

    def temporaries(self, chunks: bool = True) -> list[Path]:
        """Store temporaries beside the store, and (``chunks``) chunk temporaries in the directory:
        files being written, or half written by a killed process."""
        found = list(self.final.parent.glob(f"{glob.escape(temporary_prefix(self.final))}*"))
        return found + (list(self.dir.glob(".*.tmp-*")) if chunks and self.dir.is_dir() else [])

    def remove_temporaries(self, chunks: bool = True) -> int:
        """Delete the :meth:`temporaries`; returns how many."""
        leftovers = self.temporaries(chunks)
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
        for name, values in {"features": chunk.features, **chunk.views}.items():
            bad = ~np.isfinite(values).all(axis=tuple(range(1, values.ndim)))
            if bad.any():
                cause = ("overflow of float16: use --dtype float32" if values.dtype == np.float16
                         else "NaN/Inf from the model")
                what = "features" if name == "features" else f"{name} features"
                raise StoreError(f"{self.final}: non-finite {what} for row {int(chunk.kept[bad.argmax()])} ({cause})")
        target = self.chunk_path(chunk.start, chunk.stop)
        with atomic_output(target, "cannot write chunk", crash_at="chunk-tmp-written", tidy=False) as temporary:
            with open(temporary, "wb") as handle:
                digests = {} if chunk.sha256 is None else {"sha256": chunk.sha256,
                                                            "skipped_sha256": chunk.skipped_sha256}
                np.savez(handle, kept=chunk.kept, features=chunk.features, skipped=chunk.skipped, **chunk.views,
                         reasons=np.array(chunk.reasons, dtype=str).reshape(-1), fingerprint=np.array(self.fingerprint),
                         **{DIGEST_PREFIX + name: values for name, values in digests.items()})
        crash_point("chunk-committed")

    def rows(self, n: int) -> JoinedRows:
        """Every committed row of ``[0, n)``, in listing order, without the features (int64 per row)."""
        kept, skipped, reasons, tiling = [], [], [], self._tiling(n)
        digests: dict[str, list[np.ndarray]] | None = {"sha256": [], "skipped_sha256": []}
        for start, stop, first, last in tiling:
            with self._open_chunk(start, stop) as data:
                inside = {"": _within(data["kept"], first, last), "skipped_": _within(data["skipped"], first, last)}
                kept.append(data["kept"][inside[""]])
                skipped.append(data["skipped"][inside["skipped_"]])
                reasons.extend(data["reasons"].reshape(-1)[inside["skipped_"]].tolist())
                if digests is not None and DIGEST_PREFIX + "sha256" in data:
                    for name, parts in digests.items():
                        rows = inside["skipped_" if name.startswith("skipped_") else ""]
                        parts.append(data[DIGEST_PREFIX + name][rows].astype(SHA256_DTYPE))
                else:  # a chunk of an older featurekit: the store records no digests
                    digests = None
        joined = {name: np.concatenate(parts) for name, parts in digests.items()} if digests else {}
        return JoinedRows(np.concatenate(kept), np.concatenate(skipped), reasons, tiling, **joined)

    def copy_features(self, rows: JoinedRows, targets: Mapping[str, Any]) -> None:
        """Write each dataset ``name`` (``features``, and the view datasets) of every chunk of
        ``rows.tiling`` into ``targets[name]`` (an h5py dataset of [len(rows.kept), ...]) in order, each
        chunk opened once and one chunk in memory at a time."""
        position = 0
        for start, stop, first, last in rows.tiling:
            with self._open_chunk(start, stop) as data:
                inside = _within(data["kept"], first, last)
                arrays = {name: data[name][inside] for name in targets}
            for name, target in targets.items():
                features = arrays[name]
                if features.shape[1:] != target.shape[1:] or features.dtype != target.dtype:
                    raise RuntimeError(f"{self.final}: chunk {start}-{stop} holds {name} {features.dtype}"
                                       f"{list(features.shape)}, the store {target.dtype}{list(target.shape)}")
                target[position:position + len(features)] = features
            position += len(arrays[PLAIN])
        if any(position != len(target) for target in targets.values()):
            raise RuntimeError(f"{self.final}: the chunks hold {position} rows of features for "
                               f"{len(targets[PLAIN])} kept rows")

    @contextlib.contextmanager
    def lock_if_free(self) -> Iterator[bool]:
        """Hold the lock if no one does (True), else go on at once without it (False)."""
        try:
            lock = self.lock().__enter__()
        except LockError:
            yield False
            return
        try:
            yield True
        finally:
            lock.__exit__(None, None, None)

    @contextlib.contextmanager
    def _open_chunk(self, start: int, stop: int) -> Iterator[np.lib.npyio.NpzFile]:
        """A committed chunk, read; a damaged one, or one of another run, is removed with a
        :class:`StoreError` that says to run again."""
        path = self.chunk_path(start, stop)
        try:
            with np.load(path, allow_pickle=False) as data:
                theirs = str(data["fingerprint"]) if "fingerprint" in data else "none"
                problem = None if theirs == self.fingerprint else f"chunk of another run removed ({theirs[:12]})"
                if not problem:
                    yield data
        except Exception as error:  # zipfile, numpy and OS errors alike mean the file is damaged
            problem = f"damaged chunk removed ({first_line(error)})"
        if problem:
            path.unlink(missing_ok=True)
            raise StoreError(f"{path}: {problem}; run the same command again to recompute rows {start}-{stop}")

    def _tiling(self, n: int) -> list[tuple[int, int, int, int]]:
        """Where each row of ``[0, n)`` is taken from, once: (chunk start, chunk stop, first row, stop row).
        Runs with other chunk sizes (or shards with other batch sizes) commit overlapping ranges:
        whole chunks that tile the rows are taken if there are such, else each next row from the
        chunk holding it that reaches furthest."""
        committed = self.committed()
        gaps = uncovered(committed, n)
        if gaps:
            start, stop = gaps[0]
            raise StoreError(f"{self.dir}: rows {start}-{stop} were never committed; run the same command again")
        next_stop: dict[int, int] = {n: n}
        for start, stop in sorted(committed, reverse=True):  # a stop is always decided before its start
            if stop in next_stop and start not in next_stop:
                next_stop[start] = stop
        tiling, position = [], 0
        while position < n:
            start, stop = ((position, next_stop[position]) if 0 in next_stop else
                           max((r for r in committed if r[0] <= position < r[1]), key=lambda r: r[1]))
            tiling.append((start, stop, position, min(stop, n)))
            position = min(stop, n)
        return tiling

    def discard(self) -> int:
        """Delete the directory; returns how many temporary files (of killed writers) went with it."""
        leftovers = len(self.temporaries())
        shutil.rmtree(self.dir, ignore_errors=True)
        return leftovers

    def discard_finished(self) -> bool:
        """Lock holder: delete what a writer killed between the final rename and its cleanup left:
        store temporaries, and the chunks if they are this fingerprint's (the finished store's;
        chunks of another run are someone's work)."""
        finished = self.dir.is_dir() and self.holds()
        if finished:
            self.discard()
        return bool(self.remove_temporaries(chunks=False)) or finished

    def tidy_finished(self) -> bool:
        """:meth:`discard_finished` if the lock is free (someone else may be writing); whether it deleted."""
        if not (self.dir.exists() or self.temporaries(chunks=False)):
            return False
        with contextlib.suppress(LockError, OSError), self.lock():
            return self.discard_finished()
        return False


def _link_if_absent(source: Path, target: Path) -> None:
    """Put ``source``'s content at ``target`` unless ``target`` exists (then another process was first).
    Without hard links (some FUSE and SMB mounts) a rename does it, exclusive only between checks."""
    try:
        os.link(source, target)
    except FileExistsError:
        pass
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS):
            raise
        if not target.exists():
            os.replace(source, target)


def store_lock(final: Path, wait: float = 0.0) -> FileLock:
    """The lock of the store ``final``: ``.<name>.lock`` beside it, removed on release."""
    return FileLock(final.with_name(f".{final.stem}.lock"), str(final), wait)


def _with_removed(state: str, removed: int) -> str:
    if removed:
        state += f"{'; ' if state else ''}{removed} temporary file(s) of a killed run deleted"
    return state


def _within(rows: np.ndarray, first: int, stop: int) -> np.ndarray:
    """bool[len(rows)]: which of the global row indices ``rows`` lie in ``[first, stop)``."""
    return (rows >= first) & (rows < stop)


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
