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

from .images import DataError, SplitListing, counted, first_line, fs_path, list_split, printable_path
from .store import DIGEST_BLOCK_ROWS, IDENTITY_KEYS, StoreError, content_sha256, decoded_attrs, fingerprint, open_h5

NAMES_SHOWN = 10  # per kind of change; the count is always complete
REQUIRED_ATTRS = tuple(dict.fromkeys(("fingerprint", "data_root", "split", "feature_dim", "dtype", "n_listed") + IDENTITY_KEYS))


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
            report.problems = _structure_problems(h5)
            if report.problems:  # the value and folder checks would only repeat the damage
                return report
            report.rows, report.skipped = len(h5["paths"]), len(h5["skipped_paths"])
            report.problems = _value_problems(h5)
            attrs = decoded_attrs(h5)
            report.alignment = (attrs["data_root"], attrs["split"], _rows_sha256(h5))
            root = Path(data_root) if data_root is not None else Path(fs_path(attrs["data_root"]))
            try:
                listing = list_split(root, attrs["split"])
            except DataError as error:
                report.problems.append(f"cannot check the image folder: {error}")
                return report
            report.problems += _folder_changes(h5, listing)
    except StoreError as error:
        report.problems.append(str(error).removeprefix(f"{path}: "))
    except (OSError, RuntimeError, KeyError, ValueError) as error:  # h5py on damaged blocks
        report.problems.append(f"unreadable data ({first_line(error)})")
    return report


def folder_changes(store: str | os.PathLike, listing: SplitListing) -> list[str]:
    """How ``listing`` differs from the folder ``store`` was extracted from; empty when it does not."""
    with open_h5(store) as h5:
        return _folder_changes(h5, listing)


# --------------------------------------------------------------------------- checks


def _structure_problems(h5: h5py.File) -> list[str]:
    missing = [name for name in ("features", "labels", "paths", "classes", "file_size", "file_mtime_ns",
                                 "skipped_paths", "skipped_reasons") if name not in h5]
    missing_attrs = [key for key in REQUIRED_ATTRS if key not in h5.attrs]
    if missing or missing_attrs:
        return [f"missing {', '.join(missing + [f'attribute {key}' for key in missing_attrs])}"]
    features = h5["features"]
    n, problems = len(h5["paths"]), []
    if features.ndim != 2 or features.dtype not in (np.float16, np.float32):
        problems.append(f"features are {features.dtype}{list(features.shape)}, expected float16 or float32 [N, D]")
    elif features.shape != (n, h5.attrs["feature_dim"]) or str(features.dtype) != h5.attrs["dtype"]:
        problems.append(f"features are {features.dtype}{list(features.shape)} but the store records "
                        f"{h5.attrs['dtype']}[{n}, {h5.attrs['feature_dim']}]")
    for name in ("labels", "file_size", "file_mtime_ns"):
        if h5[name].shape != (n,) or h5[name].dtype != np.int64:
            problems.append(f"{name} is {h5[name].dtype}{list(h5[name].shape)}, expected int64[{n}]")
    k = len(h5["skipped_paths"])
    if h5["skipped_reasons"].shape != (k,):
        problems.append(f"{k} skipped paths but {len(h5['skipped_reasons'])} reasons")
    if n + k != h5.attrs["n_listed"]:
        problems.append(f"{n} rows + {k} skipped != {h5.attrs['n_listed']} images listed")
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
        problems.append("no content checksum (not written by featurekit finalize): edits cannot be ruled out")
    elif content_sha256(h5) != recorded:
        problems.append("content checksum mismatch: features, rows or attributes were changed after extraction")
    return problems


def _folder_changes(h5: h5py.File, listing: SplitListing) -> list[str]:
    stored = _stored_files(h5)
    current = {printable_path(record.path): (record.size, record.mtime_ns) for record in listing.records}
    changes = [
        _named("added since extraction", sorted(current.keys() - stored.keys())),
        _named("removed since extraction", sorted(stored.keys() - current.keys())),
        _named("modified since extraction (size or mtime)",
               sorted(p for p in stored.keys() & current.keys() if stored[p] not in (None, current[p]))),
    ]
    classes = [c.decode("utf-8") for c in h5["classes"][()]]
    current_classes = [printable_path(c) for c in listing.classes]
    if classes != current_classes:
        changes.append(f"class folders changed ({', '.join(classes)} -> {', '.join(current_classes)})")
    changes = [change for change in changes if change]
    if not changes:
        attrs = decoded_attrs(h5)
        identity = {key: attrs[key] for key in IDENTITY_KEYS}
        if fingerprint(listing, identity) != h5.attrs["fingerprint"]:
            changes.append("recorded fingerprint does not match the folder and the recorded settings")
    return changes


def _stored_files(h5: h5py.File) -> dict[str, tuple[int, int] | None]:
    """Every listed image: printable path -> (size, mtime_ns), None where it was not recorded."""
    files: dict[str, tuple[int, int] | None] = dict(zip(
        (p.decode("utf-8") for p in h5["paths"][()]), zip(h5["file_size"][()].tolist(), h5["file_mtime_ns"][()].tolist())))
    skipped = [p.decode("utf-8") for p in h5["skipped_paths"][()]]
    if "skipped_file_size" in h5 and "skipped_file_mtime_ns" in h5:
        files.update(zip(skipped, zip(h5["skipped_file_size"][()].tolist(), h5["skipped_file_mtime_ns"][()].tolist())))
    else:
        files.update(dict.fromkeys(skipped))
    return files


def _named(kind: str, paths: list[str]) -> str:
    return counted(paths, "image", "images", kind, shown=NAMES_SHOWN) if paths else ""


def _rows_sha256(h5: h5py.File) -> str:
    digest = hashlib.sha256(b"\0".join(h5["paths"][()].tolist()))
    digest.update(h5["labels"][()].astype("<i8").tobytes())
    return digest.hexdigest()

