"""Stage 5: the HDF5 feature store, the one place that knows its format and its life cycle.

One file per (split, backbone), ``<out>/<split>/<store_name>.h5``, with the datasets listed in
docs/store-format.md (``features`` float16|float32 [N, D], ``labels`` int64 [N], ``paths``, ...).
Its attributes are the fields of :class:`StoreHeader` (dicts as JSON), ``format``,
``format_version``, ``complete`` and, last, ``content_sha256`` (of every dataset and attribute).
:class:`StoreIdentity`, the part that decides the values, is what fingerprints, stale-cache
refusals, a head's records and the checks across joined stores all derive from.

:class:`StoreWriter` is the life cycle: a store is reused only if it is this very extraction and
whole; otherwise its chunks are committed (:mod:`featurekit.partial`) and joined into a file
written under a temporary name and renamed into place: a file under a final name is complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, ClassVar, Iterator, Mapping, NamedTuple

import h5py
import numpy as np

from .errors import first_line, short
from .files import FileLock, LockError, atomic_output, crash_point
from .images import SplitListing, listing_changes, printable_path
from .partial import Chunk, PartialStore, StoreError

FORMAT = "featurekit.store"
FORMAT_VERSION = 2  # 2: listing_sha256; identity and header as one schema

# Bumped whenever a change to featurekit alters the features computed from the same images, weights
# and settings (trunk construction, decoding, resizing). It is part of every store's identity, so a
# store made by an older build reads as stale instead of up to date. 2: the EfficientNet-Lite trunk fix.
FEATURES_VERSION = 2

STR = h5py.string_dtype("utf-8")
DIGEST_BLOCK_ROWS = 8192


@dataclass(frozen=True)
class StoreIdentity:
    """What, besides the image files, decides a store's values: equal identities over the same
    files give the same features. ``preprocessing``: :meth:`views.Preprocessing.to_dict`;
    ``decode``: :meth:`images.DecodePolicy.to_dict` with its backend resolved."""

    backbone: str
    node: str
    weights_sha256: str
    preprocessing: dict
    decode: dict
    precision: str  # fp32 | bf16 | fp16
    dtype: str  # storage: float16 | float32
    features_version: int

    # What one run shares among its stores: stores joined for a head (rebuilt together by predict) agree on it.
    RUN_FIELDS: ClassVar[tuple[str, ...]] = ("decode", "precision", "dtype", "features_version")

    def __post_init__(self) -> None:
        for name in ("preprocessing", "decode"):  # tuples -> lists, as JSON gives them back
            object.__setattr__(self, name, json.loads(json.dumps(getattr(self, name), sort_keys=True)))

    @property
    def identity(self) -> "StoreIdentity":
        return StoreIdentity(**{f.name: getattr(self, f.name) for f in fields(StoreIdentity)})

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(StoreIdentity)}

    @classmethod
    def from_dict(cls, values: Mapping) -> "StoreIdentity":
        """The identity fields of ``values`` (a header's, a head's record); extra keys are ignored."""
        return StoreIdentity(**{f.name: values[f.name] for f in fields(StoreIdentity)})

    def difference(self, other: "StoreIdentity", names: tuple[str, ...] | None = None) -> "Difference | None":
        """The first field (of ``names``, default all) that differs from ``other``'s, or None."""
        for name in names or tuple(f.name for f in fields(StoreIdentity)):
            if getattr(self, name) != getattr(other, name):
                return Difference(name, getattr(self, name), getattr(other, name))
        return None


class Difference(NamedTuple):
    """One field of two identities; ``str()`` reads ``field (mine != theirs)``."""

    field: str
    mine: object
    theirs: object

    def __str__(self) -> str:
        return f"{self.field.replace('_', ' ')} ({short(self.mine)} != {short(self.theirs)})"


@dataclass(frozen=True)
class StoreHeader(StoreIdentity):
    """Every attribute of a store: its identity and where, from what and how it was made."""

    split: str
    data_root: str  # resolved path of the folder holding <split>/
    listing_sha256: str  # classes and every listed file's path, label, size, mtime (SplitListing.sha256)
    weights: str
    weights_source: str
    weights_report: str
    device: str
    on_error: str
    fingerprint: str  # sha256 of the identity and the listing: equal means "this very extraction"
    feature_dim: int
    n_listed: int
    versions: dict
    created: str = ""

    def backbone_record(self) -> dict:
        """What a consumer of these features (a head) records to rebuild the trunk that made them."""
        return {**self.identity.to_dict(), "weights": self.weights, "weights_source": self.weights_source,
                "feature_dim": self.feature_dim}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_attrs(self) -> dict:
        """HDF5 attributes: dict fields as JSON, the rest as they are."""
        encoded = {k: json.dumps(v, sort_keys=True) if isinstance(v, dict) else v for k, v in self.to_dict().items()}
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **encoded}

    @classmethod
    def from_attrs(cls, attrs: Mapping, path: str | os.PathLike) -> "StoreHeader":
        """Parse a store's attributes (a missing one: :class:`StoreError`; bad JSON: ValueError, see reading)."""
        missing = [f.name for f in fields(cls) if f.name not in attrs and f.default is dataclasses.MISSING]
        if missing:
            raise StoreError(f"{path}: missing attribute{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
        values = {}
        for f in fields(cls):
            value = attrs.get(f.name, f.default)
            value = value.item() if isinstance(value, np.generic) else value
            values[f.name] = json.loads(value) if f.type == "dict" else value
        return cls(**values)


def store_path(out_dir: str | os.PathLike, split: str, store_name: str) -> Path:
    return Path(out_dir) / split / f"{store_name}.h5"


def store_lock(final: Path) -> FileLock:
    """The lock one writer of the store ``final`` holds: ``.<name>.lock`` beside it, removed on release."""
    return FileLock(final.with_name(f".{final.stem}.lock"), str(final))


def fingerprint(identity: StoreIdentity, listing_digest: str) -> str:
    """sha256 of everything that determines a store's content: identity and listing."""
    return hashlib.sha256(json.dumps([identity.to_dict(), listing_digest], sort_keys=True).encode()).hexdigest()


@dataclass
class StoreContents:
    """A whole store in memory. ``features``: float16|float32 [N, D]; ``labels``: int64[N]."""

    path: Path
    header: StoreHeader
    features: np.ndarray
    labels: np.ndarray
    paths: list[str]
    classes: list[str]
    skipped: list[tuple[str, str]]


def open_h5(path: str | os.PathLike) -> h5py.File:
    """Open a store read-only after checking it is a complete featurekit store of this format."""
    path = Path(path)
    if not path.is_file():
        raise StoreError(f"{path}: no such store")
    h5, problem = None, None
    try:
        h5 = h5py.File(path, "r")
        version, complete = int(h5.attrs.get("format_version", -1)), h5.attrs.get("complete", False)
        if h5.attrs.get("format") != FORMAT:
            problem = "not a featurekit store (no format attribute)"
        elif version != FORMAT_VERSION:
            newer = version > FORMAT_VERSION
            problem = (f"store format {version} is {'newer' if newer else 'older'} than this featurekit's "
                       f"({FORMAT_VERSION}); {'upgrade featurekit' if newer else 're-extract it: extract --overwrite'}")
        elif not complete:
            problem = "incomplete store (no completeness mark)"
    except (OSError, RuntimeError, KeyError, ValueError) as error:  # h5py on a file that is not (whole) HDF5
        problem = f"not a readable HDF5 file ({first_line(error)})"
    if problem:
        if h5 is not None:
            h5.close()
        raise StoreError(f"{path}: {problem}")
    return h5


@contextlib.contextmanager
def reading(path: str | os.PathLike) -> Iterator[h5py.File]:
    """:func:`open_h5` as a context; h5py's errors on damaged blocks or missing datasets inside it
    become one :class:`StoreError` naming the file."""
    with open_h5(path) as h5:
        try:
            yield h5
        except (OSError, RuntimeError, KeyError, ValueError) as error:
            raise StoreError(f"{path}: unreadable store ({first_line(error)})") from None


def read_header(path: str | os.PathLike) -> StoreHeader:
    with reading(path) as h5:
        return StoreHeader.from_attrs(h5.attrs, path)


def read_store(path: str | os.PathLike, features: bool = True) -> StoreContents:
    """Load a complete store into memory (``features=False`` skips the big array). Labels outside
    ``classes`` are refused: they would index the wrong class, or none."""
    with reading(path) as h5:
        header = StoreHeader.from_attrs(h5.attrs, path)
        classes, labels = _strings(h5["classes"]), h5["labels"][()]
        if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
            raise StoreError(f"{path}: labels outside 0-{len(classes) - 1} (the store is damaged)")
        return StoreContents(Path(path), header, h5["features"][()] if features else np.zeros((0, 0), np.float16),
                             labels, _strings(h5["paths"]), classes,
                             list(zip(_strings(h5["skipped_paths"]), _strings(h5["skipped_reasons"]))))


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


def check_content(path: str | os.PathLike) -> None:
    """Raise :class:`StoreError` unless the store's content checksum matches (nothing edited or damaged)."""
    with reading(path) as h5:
        if content_sha256(h5) != h5.attrs.get("content_sha256"):
            raise StoreError(f"{path}: content checksum mismatch (edited or damaged since extraction)")


def recorded_files(h5: h5py.File) -> dict[str, tuple[int, int]]:
    """Every image listed when the store was made, kept or skipped: printable path -> (size, mtime_ns)."""
    files = {}
    for prefix in ("", "skipped_"):
        sizes, mtimes = h5[f"{prefix}file_size"][()].tolist(), h5[f"{prefix}file_mtime_ns"][()].tolist()
        files.update(zip(_strings(h5[f"{prefix}paths"]), zip(sizes, mtimes)))
    return files


class StoreWriter:
    """The life cycle of one store of one run: reuse it, or lock, resume or start, commit, join.

    ``header`` is the store as it will be written (``created`` is set when it is joined). A store
    is reused only if its fingerprint is this run's and its content checksum holds; a store or
    committed chunks made from other inputs stop the run with what changed, unless ``overwrite``
    (then the old store stays readable until its successor is renamed over it).
    """

    def __init__(self, out_dir: str | os.PathLike, listing: SplitListing, store_name: str, header: StoreHeader,
                 overwrite: bool = False, log: Callable[[str], None] | None = None):
        self.final = store_path(out_dir, listing.split, store_name)
        self.store_name = store_name
        self.listing = listing
        self.header = header
        self.overwrite = overwrite
        self.partial = PartialStore(self.final)
        self.log = log or (lambda message: print(message, file=sys.stderr))

    def is_current(self) -> bool:
        """Whether the final store is this very extraction, whole. Raises :class:`StoreError` when
        another store is there, unless ``overwrite``."""
        if not self.final.exists():
            return False
        try:
            if read_header(self.final).fingerprint == self.header.fingerprint:
                check_content(self.final)
                return True
            why = self._what_changed()
        except StoreError as error:
            why = f"is damaged ({str(error).removeprefix(f'{self.final}: ')})"
        if not self.overwrite:
            raise StoreError(f"{self.final}: exists but {why}; pass --overwrite to re-extract it")
        return False

    def check_reusable(self) -> None:
        """Raise :class:`StoreError` now, before any work, if :meth:`begin` would refuse. Only reads."""
        if not self.is_current():
            self._check_chunks()

    def begin(self, locks: contextlib.ExitStack) -> bool:
        """Take the store's lock (held in ``locks``) and get its chunks ready. False: already current."""
        if self.is_current():  # checked without the lock: readers never wait
            self._tidy_finished()
            return False
        locks.enter_context(store_lock(self.final))
        if self.is_current():  # finished by another process meanwhile
            self.partial.discard_finished(self.header.fingerprint)
            return False
        removed = self.partial.remove_temporaries()
        committed = len(self.partial.committed()) if self.partial.dir.is_dir() else 0
        if self.partial.holds(self.header.fingerprint):
            state = f"resumed ({committed} chunks committed)" if committed else ""
        else:
            self._check_chunks()
            self.partial.start(self.header.fingerprint, self.header.identity.to_dict())
            state = f"{committed} stale committed chunks discarded (--overwrite)" if committed else ""
        if removed:
            state += f"{'; ' if state else ''}{removed} temporary file(s) of a killed run deleted"
        if state:
            self.log(f"{self.final}: {state}")
        return True

    def committed(self) -> list[tuple[int, int]]:
        return self.partial.committed()

    def commit(self, chunk: Chunk) -> None:
        self.partial.write(chunk)

    def finish(self) -> Path:
        """Join the committed chunks into the final store (complete, or not there at all)."""
        rows = self.partial.join(len(self.listing))
        if not rows.kept.size:
            raise StoreError(f"{self.final}: every image of {self.listing.split_dir} was skipped; nothing to store")
        if rows.features.shape[1] != self.header.feature_dim or str(rows.features.dtype) != self.header.dtype:
            raise RuntimeError(f"{self.final}: chunks hold {rows.features.dtype}[{rows.features.shape[1]}], header "
                               f"says {self.header.dtype}[{self.header.feature_dim}]")
        records = self.listing.records
        kept, skipped = [records[i] for i in rows.kept], [records[i] for i in rows.skipped]
        reasons = [printable_path(reason) for reason in rows.reasons]
        header = dataclasses.replace(self.header, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        with atomic_output(self.final, "cannot write store", f"; committed chunks kept in {self.partial.dir}",
                           "finalize-tmp-written") as temporary:
            with h5py.File(temporary, "w") as h5:
                h5.create_dataset("features", data=rows.features)
                h5.create_dataset("labels", data=np.array([r.label for r in kept], dtype=np.int64))
                _write_records(h5, "", kept)
                h5.create_dataset("classes", data=[printable_path(c) for c in self.listing.classes], dtype=STR)
                h5.create_dataset("skipped_reasons", data=reasons, dtype=STR)
                _write_records(h5, "skipped_", skipped)
                h5.attrs.update(header.to_attrs())
                h5.attrs["complete"] = True
                h5.attrs["content_sha256"] = content_sha256(h5)
        crash_point("finalize-renamed")
        self.partial.discard()
        return self.final

    def _check_chunks(self) -> None:
        """Refuse committed chunks of another run, unless ``overwrite``."""
        if self.overwrite or self.partial.holds(self.header.fingerprint) or not self.partial.committed():
            return
        recorded = (self.partial.recorded() or {}).get("identity", {})
        try:
            change = StoreIdentity.from_dict(recorded).difference(self.header.identity)
        except (KeyError, TypeError):
            change = "an unreadable manifest"
        why = f"used other {change}" if change else "saw other image files (added, removed or modified since)"
        raise StoreError(f"{self.final}: the {len(self.partial.committed())} committed chunks in {self.partial.dir} "
                         f"are from an unfinished run that {why}; pass --overwrite to discard them")

    def _what_changed(self) -> str:
        change = read_header(self.final).identity.difference(self.header.identity)
        if change:
            return f"was made with other {change}"
        with reading(self.final) as h5:
            changes = listing_changes(recorded_files(h5), _strings(h5["classes"]), self.listing)
        changes = changes or ["same files, other recorded fingerprint"]
        return f"was made from another state of {self.listing.split_dir} ({'; '.join(changes)})"

    def _tidy_finished(self) -> None:
        """Delete what a writer killed just after its final rename left, unless someone is writing."""
        if not (self.partial.dir.exists() or self.partial.temporaries()):
            return
        with contextlib.suppress(LockError, OSError), store_lock(self.final):
            if self.partial.discard_finished(self.header.fingerprint):
                self.log(f"{self.final}: leftovers of a killed run deleted")


def _write_records(h5: h5py.File, prefix: str, records: list) -> None:
    """``<prefix>paths``, ``<prefix>file_size`` and ``<prefix>file_mtime_ns`` of listing records."""
    h5.create_dataset(f"{prefix}paths", data=[printable_path(r.path) for r in records], dtype=STR)
    h5.create_dataset(f"{prefix}file_size", data=np.array([r.size for r in records], dtype=np.int64))
    h5.create_dataset(f"{prefix}file_mtime_ns", data=np.array([r.mtime_ns for r in records], dtype=np.int64))


def _strings(dataset: h5py.Dataset) -> list[str]:
    return [value.decode("utf-8") for value in dataset[()]]

