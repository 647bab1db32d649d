"""``featurekit verify``: is a store complete, sound, unedited, and still true to its image folder?

For each store: the completeness mark, the datasets' shapes and dtypes, finite features, the
content checksum written at finalize (any edited row, label, path or attribute changes it),
and the image folder it came from, listed again and compared file by file (added, removed or
modified images, changed class folders). Stores of the same split of the same folder must hold
the same rows in the same order, or heads that join them would pair the wrong images.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np

from ..errors import DataError, SettingsError, StoreError, first_line
from ..images.listing import listing_changes
from ..images.sources import relist
from .format import (
    DIGEST_BLOCK_ROWS,
    StoreHeader,
    content_sha256,
    fingerprint,
    is_labelled,
    open_h5,
    recorded_files,
    strings,
    structure_problems,
)

__all__ = ["verify_store", "verify_stores"]


@dataclass
class VerifyReport:
    """What :func:`verify_store` found: ``problems`` is empty for a sound, current store."""

    path: Path
    problems: list[str] = field(default_factory=list)
    rows: int = 0
    skipped: int = 0
    alignment: tuple[str, str, str] | None = None  # (data_root, split, sha256 of paths and labels)

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        """What ``featurekit verify`` prints of this store: OK with its rows, or one line per problem."""
        if self.ok:
            return [f"{self.path}: OK ({self.rows} rows, {self.skipped} skipped, matches its image folder)"]
        return [f"{self.path}: {problem}" for problem in self.problems]


def verify_stores(paths: Sequence[str | os.PathLike], data_root: str | os.PathLike | None = None) -> list[VerifyReport]:
    """Verify each store, then that stores of the same split of the same folder align row by row."""
    reports = [verify_store(path, data_root) for path in paths]
    first_of: dict[tuple[str, str], VerifyReport] = {}
    for report in reports:
        if report.alignment is None:
            continue
        first = first_of.setdefault(report.alignment[:2], report)
        if first.alignment != report.alignment:
            report.problems.append(f"rows not aligned with {first.path} (same split of the same folder, "
                                   "other images or order): their features cannot be joined")
    return reports


def verify_store(path: str | os.PathLike, data_root: str | os.PathLike | None = None) -> VerifyReport:
    """Check one store; ``data_root`` replaces the recorded folder (data moved to another place). The images
    are listed again by the rule the store recorded (a split folder, a cut class folder, a list, shards)."""
    report = VerifyReport(Path(path))
    try:
        with open_h5(path) as h5:
            header = StoreHeader.from_attrs(h5.attrs, path)
            report.problems = structure_problems(h5, header)
            if report.problems:  # the value and folder checks would only repeat the damage
                return report
            report.rows, report.skipped = len(h5["paths"]), len(h5["skipped_paths"])
            report.problems = _value_problems(h5, header)
            report.alignment = (header.data_root, header.split, _rows_sha256(h5))
            try:
                listing = relist(header.listing_rule, header.data_root, header.split, data_root)
            except (DataError, SettingsError) as error:
                report.problems.append(f"cannot check the image folder: {error}")
                return report
            digest = listing.sha256()
            if digest != header.listing_sha256:  # name what changed (dicts of every path: only then)
                classes = strings(h5["classes"])
                report.problems += listing_changes(recorded_files(h5), classes, listing)
            if not report.problems and fingerprint(header.identity, digest) != header.fingerprint:
                report.problems.append("recorded fingerprint does not match the folder and the recorded settings")
    except StoreError as error:
        report.problems.append(str(error).removeprefix(f"{path}: "))
    except (OSError, RuntimeError, KeyError, ValueError) as error:  # h5py on damaged blocks
        report.problems.append(f"unreadable data ({first_line(error)})")
    return report


# --------------------------------------------------------------------------- checks


def _value_problems(h5: h5py.File, header: StoreHeader) -> list[str]:
    problems = []
    for name in header.feature_shapes(0):
        features, bad_rows = h5[name], []
        for start in range(0, features.shape[0], DIGEST_BLOCK_ROWS):
            block = features[start:start + DIGEST_BLOCK_ROWS]
            finite = np.isfinite(block).all(axis=tuple(range(1, block.ndim)))
            bad_rows += (start + np.flatnonzero(~finite)).tolist()
        if bad_rows:
            first = h5["paths"][bad_rows[0]].decode("utf-8")
            what = "features" if name == "features" else f"{name} features"
            problems.append(f"NaN or Inf {what} in {len(bad_rows)} rows (first: row {bad_rows[0]}, {first})")
    recorded = h5.attrs.get("content_sha256")
    if recorded is None:
        problems.append("missing attribute content_sha256: edits cannot be ruled out")
    elif content_sha256(h5) != recorded:
        problems.append("content checksum mismatch: features, rows or attributes were changed after extraction")
    return problems


def _rows_sha256(h5: h5py.File) -> str:
    """sha256 of the paths and labels, read in blocks of rows (only compared within one verify run)."""
    digest = hashlib.sha256()
    for start in range(0, len(h5["paths"]), DIGEST_BLOCK_ROWS):
        digest.update(b"\0".join(h5["paths"][start:start + DIGEST_BLOCK_ROWS].tolist()) + b"\0")
    if is_labelled(h5):
        digest.update(h5["labels"][()].astype("<i8").tobytes())
    return digest.hexdigest()
