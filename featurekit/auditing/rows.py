"""The rows an audit reads: every audited split of the backbones, checked as train-head checks them,
their features left on disk and streamed; where each row's bytes are (hashing, header reads, sheets).

A split's stores pass :func:`~featurekit.store.dataset.load_features`'s checks (whole, unedited, of
that split, the same rows from the same files, made alike) and the splits
:func:`~featurekit.store.dataset.check_same_extraction`'s: the refusals of train-head, word for word.
The splits' rows are joined end to end (the first split first) into one
:class:`~featurekit.heads.nearest.Rows`; several backbones' columns side by side, each backbone's
columns scaled to unit length and the whole divided by sqrt(backbones) (:class:`PerBackboneUnit`),
so a similarity is the mean of the backbones' cosines (one backbone: the plain cosine).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import DataError, SettingsError
from ..heads.nearest import Rows, unit_rows
from ..images.decode import ImageSource, Unavailable
from ..images.names import fs_path, printable_path
from ..images.sources import relist
from ..store.dataset import FeatureSet, check_same_extraction, load_features, open_features
from ..store.format import StoreHeader, read_store

__all__ = ["AuditedSplit", "Joined", "PerBackboneUnit", "audited_rows", "open_splits", "row_sources"]


@dataclass
class AuditedSplit:
    """One split of the audited backbones: ``rows`` (paths, labels, classes, store headers; no features
    in memory), ``parts`` each store's features on disk (float16|float32 [N, D]), the files' recorded
    ``sizes`` int64[N] and ``sha256`` S64[N] (None: made before stores recorded digests), and the
    skipped files: (path, reason) and their digests."""

    split: str
    rows: FeatureSet
    parts: list
    sizes: np.ndarray
    sha256: np.ndarray | None
    skipped: list[tuple[str, str]]
    skipped_sha256: np.ndarray | None

    def __len__(self) -> int:
        return len(self.rows.paths)

    @property
    def header(self) -> StoreHeader:
        return self.rows.stores[0].header


def open_splits(features_dir: str | os.PathLike, store_names: Sequence[str],
                splits: Sequence[str]) -> list[AuditedSplit]:
    """The audited splits, in order, each checked (module docstring); features stay on disk."""
    opened: list[AuditedSplit] = []
    for split in splits:
        rows = load_features(features_dir, split, store_names, columns=[])  # the checks, no features read
        if opened:
            check_same_extraction(opened[0].rows, rows)
        first = read_store(rows.stores[0].path, features=False)
        opened.append(AuditedSplit(split, rows, [open_features(info.path) for info in rows.stores], first.file_size,
                                   first.file_sha256, first.skipped, first.skipped_file_sha256))
    return opened


class Joined:
    """Several stores' features of one split side by side, read by row ranges or increasing row indices."""

    def __init__(self, parts: Sequence):
        self.parts = list(parts)
        self.shape = (int(self.parts[0].shape[0]), sum(int(p.shape[1]) for p in self.parts))

    def __getitem__(self, rows) -> np.ndarray:
        return np.concatenate([np.asarray(part[rows], np.float32) for part in self.parts], axis=1)


class PerBackboneUnit:
    """float32 block [b, sum D] -> each backbone's columns at unit length, the whole divided by sqrt(B)."""

    def __init__(self, widths: Sequence[int]):
        self.bounds = np.cumsum([0, *widths])

    def __call__(self, block: np.ndarray) -> np.ndarray:
        if len(self.bounds) == 2:
            return unit_rows(block)
        pieces = [unit_rows(block[:, a:b]) for a, b in zip(self.bounds[:-1], self.bounds[1:])]
        return np.concatenate(pieces, axis=1) / np.float32(np.sqrt(len(pieces)))


def audited_rows(splits: Sequence[AuditedSplit]) -> tuple[Rows, PerBackboneUnit]:
    """Every split's rows end to end, and the normalisation they are compared under."""
    parts = [split.parts[0] if len(split.parts) == 1 else Joined(split.parts) for split in splits]
    return Rows(parts), PerBackboneUnit([int(p.shape[1]) for p in splits[0].parts])


def row_sources(split: AuditedSplit) -> tuple[list[ImageSource], str]:
    """What to read for each row of ``split`` (an OS path, a tar member, or :class:`Unavailable` with the
    reason), in row order, and a note when the rows could not all be found again ("" otherwise). A split
    folder's files are named without listing it again; other sources are listed again as recorded."""
    header = split.header
    if header.listing_rule is None:
        base = Path(fs_path(header.data_root)) / fs_path(split.split)
        return [str(base / fs_path(path)) for path in split.rows.paths], ""
    try:
        listing = relist(header.listing_rule, header.data_root, header.split)
    except (DataError, SettingsError, OSError) as error:
        reason = f"its source cannot be listed again ({error})"
        return [Unavailable(reason)] * len(split), f"{split.split}: {reason}"
    where = {printable_path(record.path): source for record, (source, _) in zip(listing.records, listing.files())}
    gone = Unavailable("no longer in its source")
    sources = [where.get(path, gone) for path in split.rows.paths]
    missing = sum(source is gone for source in sources)
    return sources, f"{split.split}: {missing} rows no longer in their source" if missing else ""
