"""Stage 6: the stores of several backbones for one split, concatenated column-wise.

Rows of different stores line up only if every store lists the same images in the same order
with the same labels; the recipe relied on ``shuffle=False`` and never checked. Here nothing is
concatenated before the stores are checked, each failure one :class:`AlignmentError` naming the
stores and what differs:

- every store is whole (its content checksum holds) and of the requested split;
- every store lists the same classes, paths and labels, from the same files (``listing_sha256``:
  the same names in two different folders do not pass);
- every store was made alike (:attr:`StoreIdentity.RUN_FIELDS`: decode policy, precision, dtype,
  features version), as one run would make them, so predict can rebuild them together;
- :func:`check_same_extraction`: a backbone's stores of two splits have equal identities.

Two ways in:

- :func:`load_features` (``featurekit.load``): the whole split in memory, ``float32[N, sum D]``.
- :class:`FeatureDataset`: a ``torch.utils.data.Dataset`` that opens the HDF5 files lazily in
  each process, so DataLoader workers never inherit an h5py handle opened before ``fork``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from .errors import FeaturekitError, SettingsError
from .partial import PartialStore
from .store import (
    StoreContents,
    StoreError,
    StoreHeader,
    StoreIdentity,
    check_content,
    open_h5,
    read_store,
    reading,
    store_path,
)


class AlignmentError(FeaturekitError, ValueError):
    """Stores that should describe the same images row for row, alike, do not. One line naming them."""


@dataclass(frozen=True)
class StoreInfo:
    """One backbone's store as part of a concatenation: its columns are ``columns`` of the result."""

    store_name: str
    path: Path
    header: StoreHeader
    columns: slice


@dataclass
class FeatureSet:
    """One split of several backbones' features, rows aligned.

    ``features``: float32[N, sum D]; ``labels``: int64[N] indices into ``classes``;
    ``paths``: N paths relative to ``<root>/<split>``; ``stores``: where each backbone's columns are.
    """

    split: str
    features: np.ndarray
    labels: np.ndarray
    paths: list[str]
    classes: list[str]
    stores: list[StoreInfo]

    def __len__(self) -> int:
        return len(self.labels)


def store_files(features_dir: str | os.PathLike, split: str, store_names: Sequence[str]) -> list[Path]:
    """The store of each backbone for ``split``; a missing one is a :class:`StoreError` saying why."""
    if not store_names:
        raise SettingsError("no backbones given")
    twice = sorted({name for name in store_names if list(store_names).count(name) > 1})
    if twice:
        raise SettingsError(f"backbones given twice: {', '.join(twice)}")
    files = [store_path(features_dir, split, name) for name in store_names]
    for name, path in zip(store_names, files):
        if not path.is_file():
            reason = ("extraction unfinished (partial chunks only); run extract again to finish"
                      if PartialStore(path).dir.is_dir() else "no such store; run extract for this backbone and split")
            raise StoreError(f"{path}: {reason} ({name}, split {split!r}; {stores_there(features_dir, split)})")
    return files


def stores_there(features_dir: str | os.PathLike, split: str) -> str:
    """What exists instead, for a message: the stores of ``split``, or the splits with stores."""
    features_dir = Path(features_dir)
    stores = sorted(p.stem for p in (features_dir / split).glob("*.h5") if not p.name.startswith("."))
    if stores:
        return f"stores of split {split!r} in {features_dir}: {', '.join(stores)}"
    splits = sorted(d.name for d in features_dir.iterdir() if d.is_dir() and any(d.glob("*.h5"))) \
        if features_dir.is_dir() else []
    if splits:
        return f"{features_dir} has no split {split!r}; splits with stores: {', '.join(splits)}"
    return f"no stores in {features_dir} at all" if features_dir.is_dir() else f"no folder {features_dir}"


def check_alignment(store_names: Sequence[str], contents: Sequence[StoreContents], split: str) -> None:
    """Raise :class:`AlignmentError` unless every store is of ``split`` and has the first one's rows,
    labels, classes and files, made alike (the run fields of their identities)."""
    reference_name, reference = store_names[0], contents[0]
    for name, store in zip(store_names, contents):
        if store.header.split != split:
            raise AlignmentError(f"{name} ({store.path}): store is of split {store.header.split!r}, expected {split!r}")
        if name == reference_name:
            continue
        where = f"{name} ({store.path}) does not line up with {reference_name} ({reference.path})"
        if store.classes != reference.classes:
            row = _first_difference(store.classes, reference.classes)
            raise AlignmentError(f"{where}: {len(store.classes)} vs {len(reference.classes)} classes, first differing "
                                 f"class #{row}: {_at(store.classes, row)} vs {_at(reference.classes, row)}")
        if store.paths != reference.paths:
            row = _first_difference(store.paths, reference.paths)
            raise AlignmentError(f"{where}: {len(store.paths)} vs {len(reference.paths)} rows, "
                                 f"first differing row {row}: {_at(store.paths, row)} vs {_at(reference.paths, row)}")
        if not np.array_equal(store.labels, reference.labels):
            row = int(np.flatnonzero(store.labels != reference.labels)[0])
            raise AlignmentError(f"{where}: {len(store.labels)} rows, first differing label at row {row} "
                                 f"({store.paths[row]}): {store.classes[store.labels[row]]!r} vs "
                                 f"{reference.classes[reference.labels[row]]!r}")
        if store.header.listing_sha256 != reference.header.listing_sha256:
            raise AlignmentError(f"{where}: same file names, but other files (sizes or modification times differ: "
                                 f"{store.header.data_root} vs {reference.header.data_root}); re-extract one of them")
        change = store.header.difference(reference.header, StoreIdentity.RUN_FIELDS)
        if change:
            raise AlignmentError(f"{where}: extracted with other {change}; re-extract one of them alike")


def check_same_extraction(train: FeatureSet, other: FeatureSet) -> None:
    """Raise :class:`AlignmentError` if a backbone's features of two splits were not made alike."""
    for mine, theirs in zip(train.stores, other.stores):
        change = mine.header.identity.difference(theirs.header.identity)
        if change:
            raise AlignmentError(f"{mine.store_name}: split {train.split!r} ({mine.path}) and split {other.split!r} "
                                 f"({theirs.path}) were extracted with other {change}; re-extract one of them")


def load_features(features_dir: str | os.PathLike, split: str, store_names: Sequence[str],
                  verify: bool = True) -> FeatureSet:
    """Read, check and concatenate the stores of ``store_names`` for ``split`` into float32[N, sum D].

    ``verify``: check each store's content checksum first (one more read of each file).
    """
    headers, stores = _checked_stores(features_dir, split, store_names, verify)
    features = np.empty((len(headers[0].labels), stores[-1].columns.stop), dtype=np.float32)
    for info in stores:
        with reading(info.path) as h5:
            features[:, info.columns] = h5["features"][()]  # one store at a time: peak memory ~ result + one store
    first = headers[0]
    return FeatureSet(split, features, first.labels.astype(np.int64), first.paths, first.classes, stores)


def _checked_stores(features_dir, split, store_names, verify) -> tuple[list[StoreContents], list[StoreInfo]]:
    files = store_files(features_dir, split, store_names)
    headers = [read_store(path, features=False) for path in files]
    check_alignment(store_names, headers, split)
    if verify:
        for path in files:
            check_content(path)
    stores, start = [], 0
    for name, path, contents in zip(store_names, files, headers):
        stores.append(StoreInfo(name, path, contents.header, slice(start, start + contents.header.feature_dim)))
        start += contents.header.feature_dim
    return headers, stores


def _first_difference(a: Sequence, b: Sequence) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _at(items: Sequence, index: int) -> str:
    return repr(items[index]) if index < len(items) else "(none)"


class FeatureDataset(Dataset):
    """Rows of the concatenated stores, read from HDF5 on demand.

    ``dataset[i]`` is ``(float32[sum D] tensor, int64 label)``. The stores are checked once, on
    construction, as by :func:`load_features` (``verify=False`` skips the checksum read). HDF5
    files are opened on first access in each process (keyed by pid), so the object can be
    created before DataLoader workers fork or spawn.
    """

    def __init__(self, features_dir: str | os.PathLike, split: str, store_names: Sequence[str], verify: bool = True):
        headers, self.stores = _checked_stores(features_dir, split, store_names, verify)
        self.split = split
        self.labels = headers[0].labels.astype(np.int64)
        self.paths = headers[0].paths
        self.classes = headers[0].classes
        self._handles: dict[int, list[h5py.File]] = {}

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"row {index} out of range for {len(self)} rows")
        index %= len(self)  # h5py reads no negative indices
        row = np.concatenate([h5["features"][index] for h5 in self._open()]).astype(np.float32)
        return torch.from_numpy(row), int(self.labels[index])

    def _open(self) -> list[h5py.File]:
        pid = os.getpid()
        if pid not in self._handles:
            # A forked worker finds the parent's handles under the parent's pid: left alone, never used.
            self._handles[pid] = [open_h5(info.path) for info in self.stores]
        return self._handles[pid]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handles": {}}

    def close(self) -> None:
        for h5 in self._handles.pop(os.getpid(), []):
            h5.close()
