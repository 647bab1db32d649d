"""Stage 5: the HDF5 feature store, the one place that knows its format.

One file per (split, backbone): ``<out>/<split>/<store_name>.h5``.

========================  ===========================  ======================================
dataset                   shape, dtype                 meaning
========================  ===========================  ======================================
``features``              float16 (or float32) [N, D]  one row per kept image, listing order
``labels``                int64 [N]                    index into ``classes``
``paths``                 UTF-8 str [N]                relative to ``<root>/<split>``
``classes``               UTF-8 str [C]                class folder names, string order
``file_size``             int64 [N]                    bytes, at extraction time
``file_mtime_ns``         int64 [N]                    modification time, at extraction time
``skipped_paths``         UTF-8 str [K]                images left out (``--on-error skip``)
``skipped_reasons``       UTF-8 str [K]                why each was left out
``skipped_file_size``     int64 [K]                    bytes of each skipped file (-1: unreadable)
``skipped_file_mtime_ns`` int64 [K]                    its modification time (-1: unreadable)
========================  ===========================  ======================================

Attributes: ``format``, ``format_version``, ``split``, ``backbone``, ``node``, ``feature_dim``,
``dtype``, ``weights``, ``weights_sha256``, ``weights_source``, ``weights_report``,
``preprocessing`` (JSON), ``decode`` (JSON), ``precision``, ``features_version``, ``device``, ``versions`` (JSON),
``fingerprint``, ``n_listed``, ``data_root``, ``created``, ``complete``, and ``content_sha256``
(written last: sha256 of every dataset and attribute, so ``featurekit verify`` notices edits).

Writing is crash-safe by construction. Rows are committed in chunks: each chunk is an ``.npz``
written under a temporary name, fsynced and renamed into ``.<store_name>.partial/``, whose
``manifest.json`` holds the fingerprint. A run killed at any moment leaves only whole chunks,
and a rerun continues from them. When every chunk is there, :func:`finalize` writes the HDF5
file under a temporary name, fsyncs it and renames it into place: a file under a final name is
always complete. Chunks are keyed by global index ranges, so processes that each extract a
contiguous range (torchrun ranks) can commit into one partial directory and one of them joins.

Temporary files (``.chunk-*.npz.tmp-PID``, ``.<name>.h5.tmp-PID``) left by a killed process are
deleted by the next writer that holds the store's :class:`StoreLock`; they are never reused, since
a killed writer may have left them half written.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np

from .images import SplitListing, first_line, printable_path

FORMAT = "featurekit.store"
FORMAT_VERSION = 1
STR = h5py.string_dtype("utf-8")


class StoreError(RuntimeError):
    """A store is missing, incomplete, stale or damaged. ``str()`` names the file and the reason."""


def store_path(out_dir: str | os.PathLike, split: str, store_name: str) -> Path:
    return Path(out_dir) / split / f"{store_name}.h5"


def partial_dir(final: Path) -> Path:
    return final.with_name(f".{final.stem}.partial")


# What, besides the file list, determines a store's values; extract.identity() builds this dict.
IDENTITY_KEYS = ("backbone", "node", "weights_sha256", "preprocessing", "decode", "precision", "dtype", "features_version")

# Testing hook: FEATUREKIT_CRASH_AT=<point>[:<n>] SIGKILLs the process the n-th time it reaches a
# point of the commit protocol, so tests can stop a real extraction exactly there.
CRASH_ENV = "FEATUREKIT_CRASH_AT"
CRASH_POINTS = ("manifest-written", "chunk-tmp-written", "chunk-committed", "finalize-tmp-written", "finalize-renamed")
_crash_counts: dict[str, int] = {}


def crash_point(point: str) -> None:
    wanted = os.environ.get(CRASH_ENV)
    if not wanted or wanted.partition(":")[0] != point:
        return
    _crash_counts[point] = _crash_counts.get(point, 0) + 1
    if _crash_counts[point] == int(wanted.partition(":")[2] or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def identity_change(recorded: dict, current: dict) -> str | None:
    """How the extraction identity of a store or partial differs from the current one, or None."""
    current = json.loads(json.dumps(current))  # tuples -> lists, as stored
    for key in IDENTITY_KEYS:
        if recorded.get(key) != current.get(key):
            return f"other {key.replace('_', ' ')} ({recorded.get(key)} != {current.get(key)})"
    return None


def fingerprint(listing: SplitListing, identity: dict) -> str:
    """sha256 of what determines a store's content: the file list (path, size, mtime) and the
    extraction identity (backbone, node, weights sha256, preprocessing, decode policy, dtype, precision,
    features version)."""
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode())
    digest.update(json.dumps(listing.classes).encode())
    for record in listing.records:
        digest.update(f"{printable_path(record.path)}\0{record.label}\0{record.size}\0{record.mtime_ns}\n".encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class Chunk:
    """Rows ``[start, stop)`` of the listing: features of the kept ones, reasons for the rest."""

    start: int
    stop: int
    kept: np.ndarray  # int64[n] global indices
    features: np.ndarray  # float16|float32 [n, D]
    skipped: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # int64[k]
    reasons: tuple[str, ...] = ()


class PartialStore:
    """The committed chunks of one store under construction.

    Only a holder of the store's :class:`StoreLock` may call :meth:`open` and :func:`finalize`:
    they delete what a killed writer left behind. :meth:`write` also runs in the other ranks of a
    torchrun job whose rank 0 holds the lock (each commits its own chunks under its own names).
    """

    def __init__(self, final: Path, store_fingerprint: str, identity: dict | None = None):
        self.final = final
        self.dir = partial_dir(final)
        self.fingerprint = store_fingerprint
        self.identity = identity or {}

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

    def open(self, discard_stale: bool = False) -> str:
        """Reuse chunks of the same fingerprint, or start afresh. Returns what it did.

        Committed chunks of another fingerprint are discarded only with ``discard_stale``
        (``--overwrite``); otherwise :class:`StoreError` says what changed.
        """
        removed = self.remove_temporaries()
        tidied = f"; {removed} temporary file(s) of a killed run deleted" if removed else ""
        committed = len(self.committed()) if self.dir.is_dir() else 0
        if self.resumable():
            return (f"resumed ({committed} chunks committed)" if committed else "started") + tidied
        self.check_no_stale_chunks(discard_stale)
        state = f"{committed} stale committed chunks discarded (--overwrite)" if committed else "started"
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        manifest = {"fingerprint": self.fingerprint, "identity": self.identity, "format_version": FORMAT_VERSION}
        _atomic_write(self.manifest, json.dumps(manifest, sort_keys=True).encode())
        _fsync_dir(self.dir.parent)
        crash_point("manifest-written")
        return state + tidied

    def temporaries(self) -> list[Path]:
        """Files being written (by the lock holder) or half written (by a killed writer)."""
        found = list(self.final.parent.glob(f".{glob_escape(self.final.name)}.tmp-*"))
        return found + (list(self.dir.glob(".*.tmp-*")) if self.dir.is_dir() else [])

    def resumable(self) -> bool:
        """Whether the chunks on disk (if any) were committed for this very fingerprint."""
        return (self.recorded() or {}).get("fingerprint") == self.fingerprint

    def check_no_stale_chunks(self, discard_stale: bool = False) -> None:
        """Raise :class:`StoreError` naming what changed if chunks of another fingerprint are
        committed, unless ``discard_stale``. Safe without the lock: it only reads."""
        if discard_stale or self.resumable() or not self.dir.is_dir() or not self.committed():
            return
        change = identity_change((self.recorded() or {}).get("identity", {}), self.identity)
        why = f"used {change}" if change else "saw other image files (added, removed or modified since)"
        raise StoreError(f"{self.final}: the {len(self.committed())} committed chunks in {self.dir} are from an "
                         f"unfinished run that {why}; pass --overwrite to discard them")

    def remove_temporaries(self) -> int:
        """Delete half-written files of a killed writer of this store; returns how many."""
        leftovers = self.temporaries()
        for leftover in leftovers:
            leftover.unlink(missing_ok=True)
        return len(leftovers)

    def committed(self) -> list[tuple[int, int]]:
        """Ranges of the chunks already on disk, sorted."""
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
            raise StoreError(
                f"{self.final}: non-finite features for row {int(chunk.kept[bad.argmax()])} "
                f"({'overflow of float16: use --dtype float32' if chunk.features.dtype == np.float16 else 'NaN/Inf from the model'})"
            )
        target = self.chunk_path(chunk.start, chunk.stop)
        temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        with _cleaned_on_failure(temporary, f"{target}: cannot write chunk"):
            with open(temporary, "wb") as handle:
                np.savez(handle, kept=chunk.kept, features=chunk.features, skipped=chunk.skipped,
                         reasons=np.array(chunk.reasons, dtype=str).reshape(-1))
                handle.flush()
                os.fsync(handle.fileno())
            crash_point("chunk-tmp-written")
            os.replace(temporary, target)
            _fsync_dir(self.dir)
        crash_point("chunk-committed")

    def read(self, n: int) -> list[Chunk]:
        """The committed chunks that tile rows ``[0, n)``, in order. Raises :class:`StoreError`
        when rows are missing, or removes a damaged chunk and says to run again."""
        chunks = []
        for start, stop in self._tiling(n):
            path = self.chunk_path(start, stop)
            try:
                with np.load(path, allow_pickle=False) as data:
                    chunk = Chunk(start, stop, data["kept"], data["features"], data["skipped"], tuple(data["reasons"].tolist()))
            except Exception as error:  # zipfile, numpy and OS errors alike mean the file is damaged
                path.unlink(missing_ok=True)
                raise StoreError(f"{path}: damaged chunk removed ({first_line(error)}); run the same command again "
                                 f"to recompute rows {start}-{stop}") from None
            chunks.append(chunk)
        return chunks

    def _tiling(self, n: int) -> list[tuple[int, int]]:
        """Committed ranges that cover ``[0, n)`` exactly once (runs with other chunk sizes may overlap)."""
        committed = self.committed()
        gaps = uncovered(committed, n)
        if gaps:
            start, stop = gaps[0]
            raise StoreError(f"{self.dir}: rows {start}-{stop} were never committed; run the same command again to finish")
        next_stop: dict[int, int] = {n: n}
        for start, stop in sorted(committed, reverse=True):  # a stop is always decided before its start
            if stop in next_stop and start not in next_stop:
                next_stop[start] = stop
        if 0 not in next_stop:
            raise StoreError(f"{self.dir}: committed chunks overlap without tiling rows 0-{n}; pass --overwrite to redo them")
        tiling, position = [], 0
        while position < n:
            tiling.append((position, next_stop[position]))
            position = next_stop[position]
        return tiling

    def discard(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def discard_if_finished(self) -> bool:
        """Delete what a writer killed between its final rename and its cleanup left behind.

        Only chunks of this fingerprint (the finished store's) go: chunks of another run are
        someone's unfinished work. Returns whether anything was deleted.
        """
        finished = self.dir.is_dir() and self.resumable()
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


def finalize(partial: PartialStore, listing: SplitListing, attrs: dict) -> Path:
    """Join the chunks into ``partial.final`` (complete, or not there at all)."""
    chunks = partial.read(len(listing))
    kept = np.concatenate([c.kept for c in chunks])
    if not kept.size:
        raise StoreError(f"{partial.final}: every image of {listing.split_dir} was skipped; nothing to store")
    features = np.concatenate([c.features for c in chunks])
    skipped = [listing.records[i] for c in chunks for i in c.skipped]
    reasons = [r for c in chunks for r in c.reasons]
    records = [listing.records[i] for i in kept]
    final = partial.final
    temporary = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    with _cleaned_on_failure(temporary, f"{final}: cannot write store", f"; committed chunks kept in {partial.dir}"):
        with h5py.File(temporary, "w") as h5:
            h5.create_dataset("features", data=features)
            h5.create_dataset("labels", data=np.array([r.label for r in records], dtype=np.int64))
            _write_records(h5, "", records)
            h5.create_dataset("classes", data=[printable_path(c) for c in listing.classes], dtype=STR)
            h5.create_dataset("skipped_reasons", data=[printable_path(r) for r in reasons], dtype=STR)
            _write_records(h5, "skipped_", skipped)
            for key, value in {**attrs, "format": FORMAT, "format_version": FORMAT_VERSION,
                               "feature_dim": features.shape[1], "dtype": str(features.dtype),
                               "n_listed": len(listing), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}.items():
                h5.attrs[key] = value if isinstance(value, (str, int, float, bool, np.integer)) else json.dumps(value, sort_keys=True)
            h5.attrs["complete"] = True
            h5.attrs["content_sha256"] = content_sha256(h5)
            h5.flush()
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        crash_point("finalize-tmp-written")
        os.replace(temporary, final)
        _fsync_dir(final.parent)
    crash_point("finalize-renamed")
    partial.discard()
    return final


def _write_records(h5: h5py.File, prefix: str, records: list) -> None:
    """``<prefix>paths``, ``<prefix>file_size`` and ``<prefix>file_mtime_ns`` of listing records."""
    h5.create_dataset(f"{prefix}paths", data=[printable_path(r.path) for r in records], dtype=STR)
    h5.create_dataset(f"{prefix}file_size", data=np.array([r.size for r in records], dtype=np.int64))
    h5.create_dataset(f"{prefix}file_mtime_ns", data=np.array([r.mtime_ns for r in records], dtype=np.int64))


DIGEST_BLOCK_ROWS = 8192


def content_sha256(h5: h5py.File) -> str:
    """sha256 of every dataset (read in row blocks) and every attribute but this one."""
    digest = hashlib.sha256()
    for name in sorted(h5.keys()):
        data = h5[name]
        digest.update(f"{name}\0{data.dtype.str}\0{data.shape}\0".encode())
        for start in range(0, data.shape[0], DIGEST_BLOCK_ROWS):
            block = data[start:start + DIGEST_BLOCK_ROWS]
            if block.dtype == object:  # strings come back as bytes
                digest.update(b"\0".join(block.tolist()) + b"\0")
            else:
                digest.update(np.ascontiguousarray(block, dtype=block.dtype.newbyteorder("<")).tobytes())
    for key in sorted(k for k in h5.attrs.keys() if k != "content_sha256"):
        value = h5.attrs[key]
        digest.update(f"{key}\0{value.item() if isinstance(value, np.generic) else value!r}\0".encode())
    return digest.hexdigest()


@contextlib.contextmanager
def _cleaned_on_failure(temporary: Path, what: str, hint: str = ""):
    """Delete ``temporary`` if the block fails; OS errors become one-line :class:`StoreError`."""
    try:
        yield
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise StoreError(f"{what} ({_os_reason(error)}){hint}") from None
        raise


def _atomic_write(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with _cleaned_on_failure(temporary, f"{path}: cannot write"):
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _os_reason(error: OSError) -> str:
    if error.errno == errno.ENOSPC or "No space left" in str(error):  # h5py drops the errno
        return "no space left on device"
    return error.strerror or first_line(error)


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


class StoreLock:
    """An exclusive, non-blocking lock on one store name (``.<name>.lock`` beside it).

    flock is advisory and may not work on NFS; on local disks it keeps two extract processes
    from writing the same store.
    """

    def __init__(self, final: Path):
        self.path = final.with_name(f".{final.stem}.lock")
        self._handle = None

    def __enter__(self) -> "StoreLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "?"
            handle.close()
            raise StoreError(f"{self.path.with_name(self.path.stem[1:] + '.h5')}: another featurekit process (pid {owner}) is writing this store") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._handle = handle
        return self

    def __exit__(self, *exc) -> None:
        if self._handle:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None


# --------------------------------------------------------------------------- reading

JSON_ATTRS = ("preprocessing", "decode", "versions")


@dataclass
class StoreContents:
    """A whole store in memory. ``features``: float16|float32 [N, D]."""

    path: Path
    features: np.ndarray
    labels: np.ndarray
    paths: list[str]
    classes: list[str]
    attrs: dict
    skipped: list[tuple[str, str]]


def read_attrs(path: str | os.PathLike) -> dict:
    """The attributes of a complete store, JSON ones decoded. Raises :class:`StoreError`."""
    with open_h5(path) as h5:
        return decoded_attrs(h5)


def read_store(path: str | os.PathLike, features: bool = True) -> StoreContents:
    """Load a complete store into memory (``features=False`` skips the big array)."""
    with open_h5(path) as h5:
        return StoreContents(
            Path(path),
            h5["features"][()] if features else np.zeros((0, 0), np.float16),
            h5["labels"][()],
            [p.decode("utf-8") for p in h5["paths"][()]],
            [c.decode("utf-8") for c in h5["classes"][()]],
            decoded_attrs(h5),
            list(zip((p.decode() for p in h5["skipped_paths"][()]), (r.decode() for r in h5["skipped_reasons"][()]))),
        )


def open_h5(path: str | os.PathLike) -> h5py.File:
    """Open a store read-only after checking it is a complete featurekit store."""
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"{path}: no such store")
    try:
        h5 = h5py.File(path, "r")
    except OSError as error:
        raise StoreError(f"{path}: not a readable HDF5 file ({first_line(error)})") from None
    problem = None
    if h5.attrs.get("format") != FORMAT:
        problem = "not a featurekit store (no format attribute)"
    elif int(h5.attrs.get("format_version", -1)) > FORMAT_VERSION:
        problem = f"store format {h5.attrs['format_version']} is newer than this featurekit reads ({FORMAT_VERSION})"
    elif not h5.attrs.get("complete", False):
        problem = "incomplete store (no completeness mark)"
    if problem:
        h5.close()
        raise StoreError(f"{path}: {problem}")
    return h5


def decoded_attrs(h5: h5py.File) -> dict:
    """The attributes of an open store, JSON ones decoded, numpy scalars as Python values."""
    attrs = {}
    for key, value in h5.attrs.items():
        if isinstance(value, np.generic):
            value = value.item()
        attrs[key] = json.loads(value) if key in JSON_ATTRS and isinstance(value, str) else value
    return attrs
