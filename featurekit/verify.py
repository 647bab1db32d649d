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

from .errors import first_line
from .images import DataError, fs_path, list_split, listing_changes
from .store import (
    DIGEST_BLOCK_ROWS,
    StoreError,
    StoreHeader,
    content_sha256,
    fingerprint,
    open_h5,
    recorded_files,
)

DATASETS = ("features", "labels", "paths", "classes", "file_size", "file_mtime_ns", "skipped_paths", "skipped_reasons",
            "skipped_file_size", "skipped_file_mtime_ns")


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
    """Check one store; ``data_root`` replaces the recorded folder (data moved to another place)."""
    report = VerifyReport(Path(path))
    try:
        with open_h5(path) as h5:
            header = StoreHeader.from_attrs(h5.attrs, path)
            report.problems = _structure_problems(h5, header)
            if report.problems:  # the value and folder checks would only repeat the damage
                return report
            report.rows, report.skipped = len(h5["paths"]), len(h5["skipped_paths"])
            report.problems = _value_problems(h5)
            report.alignment = (header.data_root, header.split, _rows_sha256(h5))
            root = Path(data_root) if data_root is not None else Path(fs_path(header.data_root))
            try:
                listing = list_split(root, header.split)
            except DataError as error:
                report.problems.append(f"cannot check the image folder: {error}")
                return report
            classes = [c.decode("utf-8") for c in h5["classes"][()]]
            report.problems += listing_changes(recorded_files(h5), classes, listing)
            if not report.problems and fingerprint(header.identity, listing.sha256()) != header.fingerprint:
                report.problems.append("recorded fingerprint does not match the folder and the recorded settings")
    except StoreError as error:
        report.problems.append(str(error).removeprefix(f"{path}: "))
    except (OSError, RuntimeError, KeyError, ValueError) as error:  # h5py on damaged blocks
        report.problems.append(f"unreadable data ({first_line(error)})")
    return report


# --------------------------------------------------------------------------- checks


def _structure_problems(h5: h5py.File, header: StoreHeader) -> list[str]:
    missing = [name for name in DATASETS if name not in h5]
    if missing:
        return [f"missing {', '.join(missing)}"]
    features = h5["features"]
    n, problems = len(h5["paths"]), []
    if features.ndim != 2 or features.dtype not in (np.float16, np.float32):
        problems.append(f"features are {features.dtype}{list(features.shape)}, expected float16 or float32 [N, D]")
    elif features.shape != (n, header.feature_dim) or str(features.dtype) != header.dtype:
        problems.append(f"features are {features.dtype}{list(features.shape)} but the store records "
                        f"{header.dtype}[{n}, {header.feature_dim}]")
    k = len(h5["skipped_paths"])
    for prefix, rows in (("", n), ("skipped_", k)):
        for name in (f"{prefix}file_size", f"{prefix}file_mtime_ns") + (("labels",) if not prefix else ()):
            if h5[name].shape != (rows,) or h5[name].dtype != np.int64:
                problems.append(f"{name} is {h5[name].dtype}{list(h5[name].shape)}, expected int64[{rows}]")
    if h5["skipped_reasons"].shape != (k,):
        problems.append(f"{k} skipped paths but {len(h5['skipped_reasons'])} reasons")
    if n + k != header.n_listed:
        problems.append(f"{n} rows + {k} skipped != {header.n_listed} images listed")
    labels = h5["labels"][()]
    if labels.size and not problems and (labels.min() < 0 or labels.max() >= len(h5["classes"])):
        problems.append(f"labels outside 0-{len(h5['classes']) - 1}")
    return problems


def _value_problems(h5: h5py.File) -> list[str]:
    features, bad_rows = h5["features"], []
    for start in range(0, features.shape[0], DIGEST_BLOCK_ROWS):
        finite = np.isfinite(features[start:start + DIGEST_BLOCK_ROWS]).all(axis=1)
        bad_rows += (start + np.flatnonzero(~finite)).tolist()
    problems = []
    if bad_rows:
        first = h5["paths"][bad_rows[0]].decode("utf-8")
        problems.append(f"NaN or Inf features in {len(bad_rows)} rows (first: row {bad_rows[0]}, {first})")
    recorded = h5.attrs.get("content_sha256")
    if recorded is None:
        problems.append("missing attribute content_sha256: edits cannot be ruled out")
    elif content_sha256(h5) != recorded:
        problems.append("content checksum mismatch: features, rows or attributes were changed after extraction")
    return problems


def _rows_sha256(h5: h5py.File) -> str:
    digest = hashlib.sha256(b"\0".join(h5["paths"][()].tolist()))
    digest.update(h5["labels"][()].astype("<i8").tobytes())
    return digest.hexdigest()

