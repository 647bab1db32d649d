"""Stage 6: the stores of several backbones for one split, concatenated column-wise.

Rows of different stores line up only if every store lists the same images in the same order
with the same labels; the recipe relied on ``shuffle=False`` and never checked. Here nothing is
concatenated before the stores are checked, each failure one :class:`AlignmentError` naming the
stores and what differs:

- every store is whole (its content checksum holds) and of the requested split;
- every store lists the same classes, paths and labels, from the same files (``listing_sha256``:
  the same names in two different folders do not pass);
- every store was made alike (:attr:`StoreIdentity.RUN_FIELDS`: decode policy, precision, dtype,
  features version, and the views read with the plain rows), as one run would make them, so predict
  can rebuild them together;
- :func:`check_same_extraction`: a backbone's stores of two splits have equal identities.

Two ways in:

- :func:`load_features` (``featurekit.load``): the whole split in memory, ``float32[N, sum D]``,
  or only some of its columns (``columns=``), read in blocks of rows.
- :class:`FeatureDataset`: a ``torch.utils.data.Dataset`` that opens the stores lazily in each
  process, so DataLoader workers never inherit a handle opened before ``fork``. extract writes a
  store's features contiguous and unfiltered, so it reads them through a numpy memmap of that byte
  range, a batch at a time (``__getitems__``, ``dataset[indices]``): reading them row by row
  through h5py made an epoch 34-42x slower than a memmap of the same array (benchmarks/bench_scale.py).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import AlignmentError, SettingsError, StoreError
from .chunks import PartialStore
from .format import (
    StoreContents,
    StoreHeader,
    StoreIdentity,
    check_content,
    open_h5,
    read_store,
    reading,
    store_path,
)
from .layout import AUGMENTED, PLAIN, TEST_TIME

__all__ = ["FeatureDataset", "FeatureSet", "StoreInfo", "check_same_extraction", "checked_stores", "load_features",
           "open_features", "store_files"]

READ_BLOCK_ROWS = 8192



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

    ``features``: float32[N, C]; ``labels``: int64[N] indices into ``classes`` (None for an unlabelled
    split: no classes); ``paths``: N paths relative to ``<root>/<split>``; ``stores``: where each
    backbone's columns are in ``features``; ``columns``: int64[C], which columns of the full
    concatenation (sum D) ``features`` holds;
    ``views``: the view datasets asked for (``features_aug``, ``features_tta``), float32[N, views, C].
    """

    split: str
    features: np.ndarray
    labels: np.ndarray | None
    paths: list[str]
    classes: list[str]
    stores: list[StoreInfo]
    columns: np.ndarray
    views: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.paths)


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


def check_alignment(store_names: Sequence[str], contents: Sequence[StoreContents], split: str,
                    views: Sequence[str] = ()) -> None:
    """Raise :class:`AlignmentError` unless every store is of ``split`` and has the first one's rows,
    labels, classes and files, made alike (the run fields of their identities: those of the plain rows,
    and of the ``views`` read with them)."""
    fields = StoreIdentity.PLAIN_RUN_FIELDS + (StoreIdentity.VIEW_FIELDS[:3] if AUGMENTED in views else ()) + (
        StoreIdentity.VIEW_FIELDS[3:] if TEST_TIME in views else ())
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
        if (store.labels is None) != (reference.labels is None):
            raise AlignmentError(f"{where}: one is labelled, the other not (images without classes)")
        if store.labels is not None and not np.array_equal(store.labels, reference.labels):
            row = int(np.flatnonzero(store.labels != reference.labels)[0])
            raise AlignmentError(f"{where}: {len(store.labels)} rows, first differing label at row {row} "
                                 f"({store.paths[row]}): {store.classes[store.labels[row]]!r} vs "
                                 f"{reference.classes[reference.labels[row]]!r}")
        if store.header.listing_sha256 != reference.header.listing_sha256:
            raise AlignmentError(f"{where}: same file names, but other files (sizes or modification times differ: "
                                 f"{store.header.data_root} vs {reference.header.data_root}); re-extract one of them")
        change = store.header.difference(reference.header, fields)
        if change:
            raise AlignmentError(f"{where}: extracted with other {change}; re-extract one of them alike")


def check_same_extraction(train: FeatureSet, other: FeatureSet) -> None:
    """Raise :class:`AlignmentError` if a backbone's plain features of two splits were not made alike
    (the views each split holds besides them may differ: augmented ones for training, test-time ones to score)."""
    for mine, theirs in zip(train.stores, other.stores):
        change = mine.header.identity.without_views().difference(theirs.header.identity.without_views())
        if change:
            raise AlignmentError(f"{mine.store_name}: split {train.split!r} ({mine.path}) and split {other.split!r} "
                                 f"({theirs.path}) were extracted with other {change}; re-extract one of them")


def load_features(features_dir: str | os.PathLike, split: str, store_names: Sequence[str],
                  verify: bool = True, columns: slice | Sequence[int] | None = None,
                  views: Sequence[str] = ()) -> FeatureSet:
    """Read, check and concatenate the stores of ``store_names`` for ``split`` into float32[N, sum D].

    ``verify``: check each store's content checksum first (one more read of each file).
    ``columns``: only these columns of the concatenation (a slice, or increasing indices):
    float32[N, len(columns)]; stores with none of them are not read. ``views``: view datasets
    to read too (:mod:`featurekit.store.layout`), into ``FeatureSet.views``, the same columns of
    each view; the stores agree on which they hold (the run fields), and one without them is refused.
    """
    headers, full = checked_stores(features_dir, split, store_names, verify, views)
    chosen = _columns(columns, full[-1].columns.stop)
    held, n = headers[0].header.extra_datasets, len(headers[0].paths)
    for name in views:
        if name not in held:
            raise StoreError(f"{full[0].path}: no {name} (held: {', '.join(held) or 'none'}); "
                             f"extract split {split!r} with {'--augment K' if name == AUGMENTED else '--tta MODE'}")
    features = np.empty((n, len(chosen)), dtype=np.float32)
    loaded = {name: np.empty((n, held[name], len(chosen)), dtype=np.float32) for name in views}
    stores, position = [], 0
    for info in full:
        local = chosen[(chosen >= info.columns.start) & (chosen < info.columns.stop)] - info.columns.start
        stores.append(dataclasses.replace(info, columns=slice(position, position + len(local))))
        if len(local):
            for name, out in {PLAIN: features, **loaded}.items():
                _read_columns(info.path, local, out[..., position:position + len(local)], name)
        position += len(local)
    first = headers[0]
    labels = first.labels.astype(np.int64) if first.labels is not None else None
    return FeatureSet(split, features, labels, first.paths, first.classes, stores, chosen, loaded)


def _columns(columns: slice | Sequence[int] | None, total: int) -> np.ndarray:
    """The chosen columns of ``total`` as increasing int64 indices."""
    if columns is None:
        return np.arange(total)
    if isinstance(columns, slice):
        chosen = np.arange(total)[columns]
    else:
        chosen = np.asarray(columns, dtype=np.int64).reshape(-1)
        if chosen.size and (chosen.min() < 0 or chosen.max() >= total):
            raise SettingsError(f"columns outside 0-{total - 1} (the stores have {total} columns)")
    if (np.diff(chosen) <= 0).any():
        raise SettingsError("columns must be increasing, without repeats")
    return chosen


def _read_columns(path: Path, local: np.ndarray, out: np.ndarray, name: str = PLAIN) -> None:
    """Columns ``local`` (increasing) of a store's features ``name`` into ``out`` (float32 [N, len(local)],
    or [N, views, len(local)] for a view dataset), in blocks of rows: memory beyond ``out`` is one block."""
    contiguous = local[-1] - local[0] + 1 == len(local)
    with reading(path) as h5:
        source = h5[name]
        for start in range(0, len(out), READ_BLOCK_ROWS):
            rows = slice(start, start + READ_BLOCK_ROWS)
            out[rows] = source[rows, ..., local[0]:local[-1] + 1] if contiguous else source[rows][..., local]


def checked_stores(features_dir, split, store_names, verify, views=()) -> tuple[list[StoreContents], list[StoreInfo]]:
    files = store_files(features_dir, split, store_names)
    headers = [read_store(path, features=False) for path in files]
    check_alignment(store_names, headers, split, views)
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
    """Rows of the concatenated stores, read from the files on demand.

    ``dataset[i]`` is ``(float32[sum D] tensor, int64 label)``. For a batch, DataLoader calls
    ``__getitems__(indices)``, which gives the same list of pairs from one read per store; and
    ``dataset[indices]`` (a sequence) gives the batch itself, ``(float32[B, sum D], int64[B])``
    tensors, so a DataLoader with a batch sampler and ``batch_size=None`` skips collating row by
    row (:meth:`loader`). The stores are checked once, on construction, as by
    :func:`load_features` (``verify=False`` skips the checksum read). Files are opened on first
    access in each process (keyed by pid), so the object can be created before DataLoader
    workers fork or spawn.
    """

    def __init__(self, features_dir: str | os.PathLike, split: str, store_names: Sequence[str], verify: bool = True):
        headers, self.stores = checked_stores(features_dir, split, store_names, verify)
        if headers[0].labels is None:
            raise StoreError(f"{self.stores[0].path}: an unlabelled store (images without classes) has no labels to "
                             "pair rows with; read its features with featurekit.load")
        self.split = split
        self.labels = headers[0].labels.astype(np.int64)
        self.paths = headers[0].paths
        self.classes = headers[0].classes
        self._handles: dict[int, list[np.ndarray | h5py.Dataset]] = {}

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int | Sequence[int]):
        rows, labels = self._rows(index)
        if np.ndim(index) == 0:
            return rows[0], int(labels[0])
        return rows, torch.from_numpy(labels)

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, int]]:
        rows, labels = self._rows(indices)
        return list(zip(rows, labels.tolist()))

    def loader(self, batch_size: int, shuffle: bool = True, drop_last: bool = False,
               generator: torch.Generator | None = None, **options) -> DataLoader:
        """A DataLoader of ``(float32[B, sum D], int64[B])`` batches, each read with one call and
        not collated row by row; ``options`` go to DataLoader (``num_workers``, ``pin_memory``, ...)."""
        batches = RowBatches(len(self), batch_size, shuffle, drop_last, generator)
        return DataLoader(self, sampler=batches, batch_size=None, **options)

    def _rows(self, indices: int | Sequence[int]) -> tuple[torch.Tensor, np.ndarray]:
        """float32[B, sum D] rows and int64[B] labels of ``indices``, in their order."""
        rows = np.asarray(indices, dtype=np.int64).reshape(-1)
        outside = (rows < -len(self)) | (rows >= len(self))
        if outside.any():
            raise IndexError(f"row {int(rows[outside.argmax()])} out of range for {len(self)} rows")
        rows %= len(self)
        out = np.empty((len(rows), self.stores[-1].columns.stop), dtype=np.float32)
        for info, features in zip(self.stores, self._open()):
            out[:, info.columns] = _gather(features, rows)
        return torch.from_numpy(out), self.labels[rows]

    def _open(self) -> list[np.ndarray | h5py.Dataset]:
        pid = os.getpid()
        if pid not in self._handles:
            # A forked worker finds the parent's handles under the parent's pid: left alone, never used.
            self._handles[pid] = [open_features(info.path) for info in self.stores]
        return self._handles[pid]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handles": {}}

    def close(self) -> None:
        for features in self._handles.pop(os.getpid(), []):
            if isinstance(features, h5py.Dataset):
                features.file.close()


class RowBatches(Sampler):
    """int64 arrays of ``batch_size`` row indices covering ``n`` rows once per epoch, in order or
    shuffled (one ``torch.randperm`` per epoch, not an index at a time as BatchSampler does)."""

    def __init__(self, n: int, batch_size: int, shuffle: bool = True, drop_last: bool = False,
                 generator: torch.Generator | None = None):
        if batch_size < 1:
            raise SettingsError(f"batch_size must be at least 1 (got {batch_size})")
        self.n, self.batch_size, self.shuffle = n, batch_size, shuffle
        self.drop_last, self.generator = drop_last, generator

    def __iter__(self) -> Iterator[np.ndarray]:
        order = torch.randperm(self.n, generator=self.generator).numpy() if self.shuffle else np.arange(self.n)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            yield order[start:start + self.batch_size]

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)


def _gather(features: np.ndarray | h5py.Dataset, rows: np.ndarray) -> np.ndarray:
    if isinstance(features, np.ndarray):  # a memmap reads rows in any order
        return features[rows]
    wanted, order = np.unique(rows, return_inverse=True)  # h5py reads increasing rows, without repeats
    return features[wanted][order]


def open_features(path: Path) -> np.ndarray | h5py.Dataset:
    """A store's features, float16|float32 [N, D], left on disk: a read-only memmap of their bytes in the
    file when they are stored contiguous and unfiltered (as extract writes them), else the h5py dataset
    (its file stays open while it is used)."""
    h5 = open_h5(path)
    features = h5["features"]
    offset = features.id.get_offset() if features.chunks is None else None
    if offset is None:
        return features
    mapped = np.memmap(path, dtype=features.dtype, mode="r", offset=offset, shape=features.shape)
    h5.close()
    return mapped
