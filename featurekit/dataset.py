"""Stage 6: the stores of several backbones for one split, concatenated column-wise.

Rows of different stores line up only if every store lists the same images in the same order
with the same labels; the recipe relied on ``shuffle=False`` and never checked. Here nothing is
concatenated before :func:`check_alignment` has compared paths, labels, class names and split,
and a mismatch is one :class:`AlignmentError` naming the backbone, the counts and the first
differing row.

Two ways in:

- :func:`load_features`: the whole split in memory, ``float32[N, sum D]``, for training heads fast.
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

from .store import StoreContents, StoreError, open_h5, partial_dir, read_store, store_path

# Attributes that must agree between the train and valid stores of one backbone: they decide
# what a feature means (a head trained on one cannot be evaluated on the other).
EXTRACTION_ATTRS = ("backbone", "node", "weights", "weights_sha256", "preprocessing", "decode", "feature_dim")


class AlignmentError(ValueError):
    """Stores that should describe the same images row for row do not. One line, names the backbone."""


@dataclass(frozen=True)
class StoreInfo:
    """One backbone's store as part of a concatenation: its columns are ``columns`` of the result."""

    store_name: str
    path: Path
    attrs: dict
    columns: slice

    @property
    def feature_dim(self) -> int:
        return self.columns.stop - self.columns.start


@dataclass
class FeatureSet:
    """One split of several backbones' features, rows aligned.

    ``features``: float32[N, sum D]; ``labels``: int64[N] indices into ``classes``;
    ``paths``: N paths relative to ``<root>/<split>``.
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
        raise ValueError("no backbones given")
    if len(set(store_names)) != len(store_names):
        raise ValueError(f"backbones given twice: {', '.join(sorted({n for n in store_names if list(store_names).count(n) > 1}))}")
    files = [store_path(features_dir, split, name) for name in store_names]
    for name, path in zip(store_names, files):
        if not path.is_file():
            unfinished = partial_dir(path).is_dir()
            reason = "extraction unfinished (partial chunks only); run extract again to finish" if unfinished else "no such store; run extract for this backbone and split"
            raise StoreError(f"{path}: {reason} ({name}, split {split!r})")
    return files


def check_alignment(store_names: Sequence[str], contents: Sequence[StoreContents], split: str) -> None:
    """Raise :class:`AlignmentError` unless every store has the first one's rows, labels and classes."""
    reference_name, reference = store_names[0], contents[0]
    for name, store in zip(store_names, contents):
        if store.attrs.get("split") != split:
            raise AlignmentError(f"{name} ({store.path}): store is of split {store.attrs.get('split')!r}, expected {split!r}")
        if name == reference_name:
            continue
        where = f"{name} ({store.path}) does not line up with {reference_name}"
        if store.classes != reference.classes:
            row = _first_difference(store.classes, reference.classes)
            raise AlignmentError(f"{where}: {len(store.classes)} vs {len(reference.classes)} classes, "
                                 f"first differing class #{row}: {_at(store.classes, row)} vs {_at(reference.classes, row)}")
        if store.paths != reference.paths:
            row = _first_difference(store.paths, reference.paths)
            raise AlignmentError(f"{where}: {len(store.paths)} vs {len(reference.paths)} rows, "
                                 f"first differing row {row}: {_at(store.paths, row)} vs {_at(reference.paths, row)}")
        if not np.array_equal(store.labels, reference.labels):
            row = int(np.flatnonzero(store.labels != reference.labels)[0])
            raise AlignmentError(f"{where}: {len(store.labels)} rows, first differing label at row {row} "
                                 f"({store.paths[row]}): {store.classes[store.labels[row]]!r} vs {reference.classes[reference.labels[row]]!r}")


def check_same_extraction(train: FeatureSet, other: FeatureSet) -> None:
    """Raise :class:`AlignmentError` if a backbone's features of two splits were not made alike."""
    for mine, theirs in zip(train.stores, other.stores):
        for key in EXTRACTION_ATTRS:
            if mine.attrs.get(key) != theirs.attrs.get(key):
                raise AlignmentError(f"{mine.store_name}: {key} differs between split {train.split!r} ({mine.path}) "
                                     f"and split {other.split!r} ({theirs.path}): {mine.attrs.get(key)!r} vs {theirs.attrs.get(key)!r}")


def load_features(features_dir: str | os.PathLike, split: str, store_names: Sequence[str]) -> FeatureSet:
    """Read, check and concatenate the stores of ``store_names`` for ``split`` into float32[N, sum D]."""
    files = store_files(features_dir, split, store_names)
    headers = [read_store(path, features=False) for path in files]
    check_alignment(store_names, headers, split)
    stores = _store_infos(store_names, files, headers)
    features = np.empty((len(headers[0].labels), stores[-1].columns.stop), dtype=np.float32)
    for info in stores:
        with open_h5(info.path) as h5:
            features[:, info.columns] = h5["features"][()]  # one store at a time: peak memory ~ result + one store
    first = headers[0]
    return FeatureSet(split, features, first.labels.astype(np.int64), first.paths, first.classes, stores)


def _store_infos(store_names: Sequence[str], files: Sequence[Path], headers: Sequence[StoreContents]) -> list[StoreInfo]:
    infos, start = [], 0
    for name, path, header in zip(store_names, files, headers):
        dim = int(header.attrs["feature_dim"])
        infos.append(StoreInfo(name, path, header.attrs, slice(start, start + dim)))
        start += dim
    return infos


def _first_difference(a: Sequence, b: Sequence) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _at(items: Sequence, index: int) -> str:
    return repr(items[index]) if index < len(items) else "(none)"


class FeatureDataset(Dataset):
    """Rows of the concatenated stores, read from HDF5 on demand.

    ``dataset[i]`` is ``(float32[sum D] tensor, int64 label)``. Alignment is checked once, on
    construction, from the small datasets only. HDF5 files are opened on first access in each
    process (keyed by pid), so the object can be created before DataLoader workers fork or spawn.
    """

    def __init__(self, features_dir: str | os.PathLike, split: str, store_names: Sequence[str]):
        files = store_files(features_dir, split, store_names)
        headers = [read_store(path, features=False) for path in files]
        check_alignment(store_names, headers, split)
        self.split = split
        self.stores = _store_infos(store_names, files, headers)
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
