"""Rows an audit flagged, left out of training: ``train-head --exclude audit.json[:KINDS]``.

``featurekit audit`` writes a ``flagged`` section into its ``audit.json``; this module is the one
place that knows it (the audit builds it with :class:`Flagged`): per kind of finding (:data:`KINDS`),
per split, the stored paths of the rows flagged, and the stores the audit read (split, store name,
fingerprint, listing sha256). train-head leaves out the flagged rows of its *training* split only:
an audit of a held-out split never changes what is trained. Before that it checks that its training
stores are the ones the audit read (the same fingerprint; another backbone's store: the same listing),
since a store re-extracted since may hold other rows under the same names; a flagged row that is not
in the store is refused too. Either is one line, and nothing is trained. No torch here.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import AuditError
from ..files import file_sha256
from ..records import parse, to_dict

__all__ = ["KINDS", "AuditedStore", "Exclusion", "Flagged", "excluded_rows", "parse_exclude", "read_flagged"]

# exact: a later copy (same bytes) of a row of the same split; near: a later member of a near-duplicate
# cluster within a split; leakage: a row with an exact or near copy in another split; labels: a likely
# label error; outliers: far from every other row
KINDS = ("exact", "near", "leakage", "labels", "outliers")


@dataclass(frozen=True)
class AuditedStore:
    """A store an audit read: which split, which backbone's, and what it held (fingerprint, listing)."""

    split: str
    store_name: str
    fingerprint: str
    listing_sha256: str


@dataclass(frozen=True)
class Flagged:
    """audit.json's ``flagged``: ``rows[kind][split]`` the stored paths flagged, ``stores`` those read."""

    stores: list[AuditedStore]
    rows: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"stores": [to_dict(store) for store in self.stores],
                "rows": {kind: {split: sorted(paths) for split, paths in self.rows.get(kind, {}).items()}
                         for kind in KINDS}}


@dataclass(frozen=True)
class Exclusion:
    """What a head records of the rows it was trained without (``HeadRecord.excluded``): the audit file
    and its sha256, the kinds, how many training rows each left out and the sha256 of their sorted paths
    (the paths themselves are in train-head's report.json)."""

    audit: str
    audit_sha256: str
    kinds: list[str]
    rows: int
    by_kind: dict
    paths_sha256: str


def parse_exclude(spec: str) -> tuple[Path, tuple[str, ...]]:
    """``audit.json`` or ``audit.json:labels,outliers`` -> (file, kinds); every kind when none are named."""
    head, _, tail = str(spec).rpartition(":")
    if not head or Path(spec).exists():
        return Path(spec), KINDS
    kinds = tuple(kind.strip() for kind in tail.split(",") if kind.strip())
    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown or not kinds:
        raise AuditError(f"--exclude {spec}: unknown kind {', '.join(unknown) or '(none)'} (choose from "
                         f"{', '.join(KINDS)}, comma-separated, after a colon)")
    return Path(head), kinds


def read_flagged(path: str | Path) -> Flagged:
    """The ``flagged`` section of an audit.json, every field checked (one line naming the file and field)."""
    try:
        values = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise AuditError(f"{path}: not a readable audit file ({error.__class__.__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else ''})") from None
    if not isinstance(values, dict) or "flagged" not in values:
        raise AuditError(f"{path}: not an audit.json of featurekit audit (no 'flagged' section)")
    flagged = parse(Flagged, values["flagged"], str(path), AuditError, "flagged")
    for kind, splits in flagged.rows.items():
        if kind not in KINDS or not isinstance(splits, dict) or not all(
                isinstance(paths, list) and all(isinstance(p, str) for p in paths) for paths in splits.values()):
            raise AuditError(f"{path}: field 'flagged.rows.{kind}' is not a mapping of split to paths")
    return flagged


def excluded_rows(path: str | Path, kinds: Sequence[str], split: str, stores: Sequence[tuple[str, str, str]],
                  paths: Sequence[str]) -> tuple[np.ndarray, Exclusion]:
    """bool[N]: the rows of ``split`` (stored ``paths``, in order) that the audit at ``path`` flags under
    ``kinds``, and what to record of it. ``stores``: the training stores, (store name, fingerprint,
    listing sha256) each; they must be what the audit read, and every flagged row must be there
    (:class:`AuditError` otherwise)."""
    flagged = read_flagged(path)
    audited = [store for store in flagged.stores if store.split == split]
    for name, fingerprint, listing in stores if audited else ():
        same_store = [store for store in audited if store.store_name == name]
        if (same_store and same_store[0].fingerprint != fingerprint) or (
                not same_store and all(store.listing_sha256 != listing for store in audited)):
            raise AuditError(f"{path}: audited another extraction of split {split!r} ({name}: re-extracted since "
                             "the audit?); run the audit again on these stores")
    where = {stored: row for row, stored in enumerate(paths)}
    mask, by_kind = np.zeros(len(paths), dtype=bool), {}
    for kind in kinds:
        named = flagged.rows.get(kind, {}).get(split, [])
        missing = [stored for stored in named if stored not in where]
        if missing:
            raise AuditError(f"{path}: {len(missing)} row(s) flagged under {kind} are not in split {split!r} "
                             f"(first: {missing[0]}): re-extracted since the audit? run the audit again")
        rows = np.array([where[stored] for stored in named], dtype=np.int64)
        by_kind[kind] = int((~mask[rows]).sum()) if len(rows) else 0
        mask[rows] = True
    left_out = sorted(paths[row] for row in np.flatnonzero(mask))
    digest = hashlib.sha256("\n".join(left_out).encode()).hexdigest()
    return mask, Exclusion(str(path), file_sha256(path), list(kinds), int(mask.sum()), by_kind, digest)
