"""The life cycle of a store: :class:`StoreWriter` (reuse, refuse, lock, resume or start, commit, join).

A store is reused only if it is this very extraction and whole; otherwise its chunks are
committed (:mod:`featurekit.store.chunks`) and joined into a file written under a temporary name and
renamed into place: a file under a final name is complete. The format it writes: :mod:`featurekit.store`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from pathlib import Path

import h5py
import numpy as np

from ..errors import StoreError, short
from ..files import crash_point, hdf5_output
from ..images.listing import SplitListing, listing_changes
from ..images.names import printable_path
from .chunks import Chunk, PartialStore, store_lock, uncovered
from .format import (
    SHA256_DTYPE,
    STR,
    StoreHeader,
    StoreIdentity,
    check_content,
    content_sha256,
    read_header,
    reading,
    recorded_files,
    store_path,
    strings,
)

__all__ = ["StoreWriter"]

logger = logging.getLogger(__name__)


class StoreWriter:
    """The life cycle of one store of one run: reuse it, or lock, resume or start, commit, join.

    ``header`` is the store as it will be written (``created`` is set when it is joined). A store
    is reused only if its fingerprint is this run's and its content checksum holds; a store or
    committed chunks made from other inputs stop the run with what changed, unless ``overwrite``
    (then the old store stays readable until its successor is renamed over it).
    """

    def __init__(self, out_dir: str | os.PathLike, listing: SplitListing, store_name: str, header: StoreHeader,
                 overwrite: bool = False):
        self.final = store_path(out_dir, listing.split, store_name)
        self.store_name = store_name
        self.listing = listing
        self.header = header
        self.overwrite = overwrite
        self.partial = PartialStore(self.final, header.fingerprint)

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

    def begin(self, locks: contextlib.ExitStack | None) -> bool:
        """Get the store's chunks ready; False: already current. ``locks``: hold the store's lock
        there for the whole run. None: one shard of a run, committing beside the others without
        keeping the lock (:meth:`PartialStore.share`); it ends with :meth:`join_once`."""
        if self.is_current():  # checked without the lock: readers never wait
            self._report("leftovers of a killed run deleted" if self.partial.tidy_finished() else "")
            return False
        if locks is None:
            self._report(self.partial.share(self.header.identity.to_dict(), self._check_chunks))
            return True
        locks.enter_context(store_lock(self.final))
        if self.is_current():  # finished by another process meanwhile
            self.partial.discard_finished()
            return False
        self._report(self.partial.resume(self.header.identity.to_dict(), self._check_chunks))
        return True

    def committed(self) -> list[tuple[int, int]]:
        return self.partial.committed()

    def commit(self, chunk: Chunk) -> None:
        self.partial.write(chunk)

    def join_once(self) -> str:
        """After a shard's commits: join the chunks if every row is committed, once however many shards
        finish at once. The store's state: written (here), up to date, partial, being joined by another process."""
        crash_point("shard-committed")
        if self.is_current():
            return "up to date"
        if uncovered(self.committed(), len(self.listing)):
            return "partial"
        with self.partial.lock_if_free() as locked:
            if not locked:
                return "being joined by another process"
            crash_point("join-locked")
            if self.is_current():  # joined by a shard that released the lock just before
                return "up to date"
            if not self.partial.holds():
                raise StoreError(f"{self.partial.dir}: replaced by another run (--overwrite) while this shard ran")
            try:
                self.finish()
            except StoreError:  # its chunks gone: joined meanwhile by a host that flock does not reach?
                if not self.is_current():
                    raise
                return "up to date"
        return "written"

    def finish(self) -> Path:
        """Lock holder: join the chunks into the final store (whole, or not there), one chunk in memory at a time."""
        rows = self.partial.rows(len(self.listing))
        if not rows.kept.size:
            raise StoreError(f"{self.final}: every image of {self.listing.display} was skipped; nothing to store")
        kept, skipped = ([self.listing.records[i] for i in rows_of] for rows_of in (rows.kept, rows.skipped))
        reasons = [printable_path(reason) for reason in rows.reasons]
        header = dataclasses.replace(self.header, created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        self.partial.remove_temporaries(chunks=False)  # of a joiner killed before its rename
        with hdf5_output(self.final, "cannot write store", f"; committed chunks kept in {self.partial.dir}",
                         "finalize-tmp-written") as h5:
            self.partial.copy_features(rows, {name: h5.create_dataset(name, shape, self.header.dtype)
                                              for name, shape in self.header.feature_shapes(len(kept)).items()})
            if self.listing.labelled:  # an unlabelled store has no labels, not -1 pretending to be a class
                h5.create_dataset("labels", data=np.array([r.label for r in kept], dtype=np.int64))
            _write_records(h5, "", kept)
            h5.create_dataset("classes", data=[printable_path(c) for c in self.listing.classes], dtype=STR)
            h5.create_dataset("skipped_reasons", data=reasons, dtype=STR)
            _write_records(h5, "skipped_", skipped)
            if rows.sha256 is not None:  # provenance, not identity: not in the fingerprint
                h5.create_dataset("file_sha256", data=rows.sha256.astype(SHA256_DTYPE))
                h5.create_dataset("skipped_file_sha256", data=rows.skipped_sha256.astype(SHA256_DTYPE))
            h5.attrs.update(header.to_attrs())
            h5.attrs["complete"] = True
            h5.attrs["content_sha256"] = content_sha256(h5)
        crash_point("finalize-renamed")
        removed = self.partial.discard()
        self._report(f"{removed} temporary file(s) of a killed run deleted" if removed else "")
        return self.final

    def _report(self, state: str) -> None:
        if state:
            logger.info(f"{self.final}: {state}")

    def _check_chunks(self) -> None:
        """Refuse committed chunks of another run, unless ``overwrite``."""
        if not self.overwrite:
            self.partial.refuse_foreign(lambda recorded: StoreIdentity.from_dict(recorded).difference(self.header))

    def _what_changed(self) -> str:
        header = read_header(self.final)
        change = header.identity.difference(self.header.identity)
        if change:
            return f"was made with other {change}"
        if header.listing_rule != self.header.listing_rule:
            return f"was listed by another rule ({short(header.listing_rule)} != {short(self.header.listing_rule)})"
        with reading(self.final) as h5:
            changes = listing_changes(recorded_files(h5), strings(h5["classes"]), self.listing)
        changes = changes or ["same files, other recorded fingerprint"]
        return f"was made from another state of {self.listing.display} ({'; '.join(changes)})"


def _write_records(h5: h5py.File, prefix: str, records: list) -> None:
    """``<prefix>paths``, ``<prefix>file_size`` and ``<prefix>file_mtime_ns`` of listing records."""
    h5.create_dataset(f"{prefix}paths", data=[printable_path(r.path) for r in records], dtype=STR)
    h5.create_dataset(f"{prefix}file_size", data=np.array([r.size for r in records], dtype=np.int64))
    h5.create_dataset(f"{prefix}file_mtime_ns", data=np.array([r.mtime_ns for r in records], dtype=np.int64))
