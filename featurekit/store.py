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
========================  ===========================  ======================================

Attributes: ``format``, ``format_version``, ``split``, ``backbone``, ``node``, ``feature_dim``,
``dtype``, ``weights``, ``weights_sha256``, ``weights_source``, ``weights_report``,
``preprocessing`` (JSON), ``decode`` (JSON), ``precision``, ``device``, ``versions`` (JSON),
``fingerprint``, ``n_listed``, ``data_root``, ``created``, and ``complete`` (written last).

Writing is crash-safe by construction. Rows are committed in chunks: each chunk is an ``.npz``
written under a temporary name, fsynced and renamed into ``.<store_name>.partial/``, whose
``manifest.json`` holds the fingerprint. A run killed at any moment leaves only whole chunks,
and a rerun continues from them. When every chunk is there, :func:`finalize` writes the HDF5
file under a temporary name, fsyncs it and renames it into place: a file under a final name is
always complete. Chunks are keyed by global index ranges, so processes that each extract a
contiguous range (torchrun ranks) can commit into one partial directory and one of them joins.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from .images import SplitListing, printable_path

FORMAT = "featurekit.store"
FORMAT_VERSION = 1
STR = h5py.string_dtype("utf-8")


class StoreError(RuntimeError):
    """A store is missing, incomplete, stale or damaged. ``str()`` names the file and the reason."""


def store_path(out_dir: str | os.PathLike, split: str, store_name: str) -> Path:
    return Path(out_dir) / split / f"{store_name}.h5"


def partial_dir(final: Path) -> Path:
    return final.with_name(f".{final.stem}.partial")


def fingerprint(listing: SplitListing, identity: dict) -> str:
    """sha256 of what determines a store's content: the file list (path, size, mtime) and the
    extraction identity (backbone, node, weights sha256, preprocessing, decode policy, dtype, precision)."""
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
    """The committed chunks of one store under construction."""

    def __init__(self, final: Path, store_fingerprint: str):
        self.final = final
        self.dir = partial_dir(final)
        self.fingerprint = store_fingerprint

    def open(self) -> str:
        """Create, reuse, or (stale fingerprint) clear the partial directory. Returns what it did."""
        manifest = self.dir / "manifest.json"
        if manifest.is_file():
            try:
                recorded = json.loads(manifest.read_text())["fingerprint"]
            except (ValueError, KeyError, OSError):
                recorded = None
            if recorded == self.fingerprint:
                return "resumed" if self.committed() else "started"
            shutil.rmtree(self.dir)
            state = "stale partial discarded"
        else:
            shutil.rmtree(self.dir, ignore_errors=True)
            state = "started"
        self.dir.mkdir(parents=True)
        _atomic_write(manifest, json.dumps({"fingerprint": self.fingerprint, "format_version": FORMAT_VERSION}).encode())
        return state

    def committed(self) -> list[tuple[int, int]]:
        """Ranges of the chunks already on disk, sorted."""
        ranges = []
        for entry in self.dir.glob("chunk-*.npz"):
            start, stop = entry.stem.split("-")[1:3]
            ranges.append((int(start), int(stop)))
        return sorted(ranges)

    def write(self, chunk: Chunk) -> None:
        """Commit one chunk atomically (temporary name, fsync, rename, fsync directory)."""
        bad = ~np.isfinite(chunk.features).all(axis=1)
        if bad.any():
            raise StoreError(
                f"{self.final}: non-finite features for row {int(chunk.kept[bad.argmax()])} "
                f"({'overflow of float16: use --dtype float32' if chunk.features.dtype == np.float16 else 'NaN/Inf from the model'})"
            )
        target = self.dir / f"chunk-{chunk.start:012d}-{chunk.stop:012d}.npz"
        temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        try:
            with open(temporary, "wb") as handle:
                np.savez(handle, kept=chunk.kept, features=chunk.features, skipped=chunk.skipped,
                         reasons=np.array(chunk.reasons, dtype=object).astype(str))
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, target)
            _fsync_dir(self.dir)
        except OSError as error:
            temporary.unlink(missing_ok=True)
            raise StoreError(f"{target}: cannot write chunk ({_os_reason(error)})") from None

    def read(self) -> list[Chunk]:
        chunks = []
        for start, stop in self.committed():
            path = self.dir / f"chunk-{start:012d}-{stop:012d}.npz"
            with np.load(path, allow_pickle=False) as data:
                chunks.append(Chunk(start, stop, data["kept"], data["features"], data["skipped"], tuple(data["reasons"].tolist())))
        return chunks

    def discard(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def finalize(partial: PartialStore, listing: SplitListing, attrs: dict) -> Path:
    """Join the chunks into ``partial.final`` (complete, or not there at all)."""
    chunks = partial.read()
    _check_coverage(partial, chunks, len(listing))
    kept = np.concatenate([c.kept for c in chunks])
    features = np.concatenate([c.features for c in chunks]) if kept.size else None
    if features is None:
        raise StoreError(f"{partial.final}: every image of {listing.split_dir} was skipped; nothing to store")
    skipped = np.concatenate([c.skipped for c in chunks])
    reasons = [r for c in chunks for r in c.reasons]
    records = [listing.records[i] for i in kept]
    final = partial.final
    temporary = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        with h5py.File(temporary, "w") as h5:
            h5.create_dataset("features", data=features)
            h5.create_dataset("labels", data=np.array([r.label for r in records], dtype=np.int64))
            h5.create_dataset("paths", data=[printable_path(r.path) for r in records], dtype=STR)
            h5.create_dataset("classes", data=list(listing.classes), dtype=STR)
            h5.create_dataset("file_size", data=np.array([r.size for r in records], dtype=np.int64))
            h5.create_dataset("file_mtime_ns", data=np.array([r.mtime_ns for r in records], dtype=np.int64))
            h5.create_dataset("skipped_paths", data=[printable_path(listing.records[i].path) for i in skipped], dtype=STR)
            h5.create_dataset("skipped_reasons", data=reasons, dtype=STR)
            for key, value in {**attrs, "format": FORMAT, "format_version": FORMAT_VERSION,
                               "feature_dim": features.shape[1], "dtype": str(features.dtype),
                               "n_listed": len(listing), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}.items():
                h5.attrs[key] = value if isinstance(value, (str, int, float, bool, np.integer)) else json.dumps(value, sort_keys=True)
            h5.attrs["complete"] = True
            h5.flush()
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, final)
        _fsync_dir(final.parent)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise StoreError(f"{final}: cannot write store ({_os_reason(error)}); committed chunks kept in {partial.dir}") from None
    partial.discard()
    return final


def _check_coverage(partial: PartialStore, chunks: list[Chunk], n: int) -> None:
    position = 0
    for chunk in chunks:
        if chunk.start != position:
            raise StoreError(f"{partial.dir}: rows {position}-{chunk.start} were never committed; run extract again to finish")
        position = chunk.stop
    if position != n:
        raise StoreError(f"{partial.dir}: rows {position}-{n} were never committed; run extract again to finish")


def _atomic_write(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
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
    if error.errno == errno.ENOSPC:
        return "no space left on device"
    return error.strerror or str(error)


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
        return _attrs(h5)


def read_store(path: str | os.PathLike, features: bool = True) -> StoreContents:
    """Load a complete store into memory (``features=False`` skips the big array)."""
    with open_h5(path) as h5:
        return StoreContents(
            Path(path),
            h5["features"][()] if features else np.zeros((0, 0), np.float16),
            h5["labels"][()],
            [p.decode("utf-8") for p in h5["paths"][()]],
            [c.decode("utf-8") for c in h5["classes"][()]],
            _attrs(h5),
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
        raise StoreError(f"{path}: not a readable HDF5 file ({str(error).splitlines()[0]})") from None
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


def _attrs(h5: h5py.File) -> dict:
    attrs = {}
    for key, value in h5.attrs.items():
        if isinstance(value, np.generic):
            value = value.item()
        attrs[key] = json.loads(value) if key in JSON_ATTRS and isinstance(value, str) else value
    return attrs
