"""Stage 5: the HDF5 feature store, the one place that knows its format (its life cycle: store_writer.py).

One file per (split, backbone), ``<out>/<split>/<store_name>.h5``, with the datasets listed in
docs/store-format.md (``features`` float16|float32 [N, D], ``labels`` int64 [N], ``paths``, ...).
Its attributes are the fields of :class:`StoreHeader` (dicts as JSON), ``format``,
``format_version``, ``complete`` and, last, ``content_sha256`` (of every dataset and attribute).
:class:`StoreIdentity`, the part that decides the values, is what fingerprints, stale-cache
refusals, a head's records and the checks across joined stores all derive from.

A store may hold views of each image beside its plain row (``extract --augment``/``--tta``):
``features_aug``, ``features_tta`` (:mod:`featurekit.store.layout`); the identity's view fields say
which, and are recorded only where there are views, so a store without any is what it was in
format 2. :class:`~featurekit.store.writer.StoreWriter` writes stores.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import ClassVar, Iterator, Mapping, NamedTuple, Sequence

import h5py
import numpy as np

from ..errors import FeaturekitWarning, SettingsError, StoreError, first_line, short
from ..records import parse
from .layout import PLAIN, extra_datasets

__all__ = ["BackboneRecord", "DIGEST_BLOCK_ROWS", "FEATURES_VERSION", "FORMAT", "RANDOM", "SHA256_DTYPE", "STR",
           "StoreContents", "StoreHeader", "StoreIdentity", "check_content", "content_sha256", "file_stem",
           "fingerprint", "is_labelled", "open_h5", "read_header", "read_store", "reading", "recorded_files",
           "store_path", "strings", "structure_problems", "warn_random"]

FORMAT = "featurekit.store"
FORMAT_VERSION = 3  # 2: listing_sha256; identity and header as one schema. 3: views beside the plain row
READABLE_VERSIONS = (2, 3)  # a format 2 store reads as a store without views (its attributes are format 3's)

# Bumped whenever a change to featurekit alters the features computed from the same images, weights
# and settings (trunk construction, decoding, resizing). It is part of every store's identity, so a
# store made by an older build reads as stale instead of up to date. 2: the EfficientNet-Lite trunk fix.
FEATURES_VERSION = 2

STR = h5py.string_dtype("utf-8")
SHA256_DTYPE = "S64"  # file_sha256, skipped_file_sha256: each file's sha256 in hex ASCII, b"" where unread
RANDOM = "random"  # the weights name stores record for seeded random initialisation (backbones.weights)
DIGEST_BLOCK_ROWS = 8192
DATASETS = ("features", "paths", "classes", "file_size", "file_mtime_ns", "skipped_paths", "skipped_reasons",
            "skipped_file_size", "skipped_file_mtime_ns")  # and labels, in a labelled store


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
    # The views beside the plain row (featurekit.store.layout), recorded only where a store has them.
    augment_views: int = field(default=0, kw_only=True)
    augment_policy: dict | None = field(default=None, kw_only=True)  # augment.AugmentPolicy.to_dict()
    augment_seed: int = field(default=0, kw_only=True)
    tta: str = field(default="none", kw_only=True)  # test-time views: none | flip | five-crop
    # A backbone of another library (timm, open_clip, transformers): which library and version, model,
    # tag, config sha256, pool (featurekit.backbones.sources); recorded only for those backbones.
    source: dict | None = field(default=None, kw_only=True)

    VIEW_FIELDS: ClassVar[tuple[str, ...]] = ("augment_views", "augment_policy", "augment_seed", "tta")
    OPTIONAL_FIELDS: ClassVar[tuple[str, ...]] = (*VIEW_FIELDS, "source")  # absent from older records
    # What one run shares among its stores: stores joined for a head (rebuilt together by predict) agree on it;
    # PLAIN_RUN_FIELDS: the part that decides the plain rows (stores read without their views agree on that).
    PLAIN_RUN_FIELDS: ClassVar[tuple[str, ...]] = ("decode", "precision", "dtype", "features_version")
    RUN_FIELDS: ClassVar[tuple[str, ...]] = (*PLAIN_RUN_FIELDS, *VIEW_FIELDS)

    def __post_init__(self) -> None:
        for name in ("preprocessing", "decode", "augment_policy", "source"):  # tuples -> lists, as JSON gives them back
            object.__setattr__(self, name, json.loads(json.dumps(getattr(self, name), sort_keys=True)))

    @property
    def identity(self) -> "StoreIdentity":
        return StoreIdentity(**{f.name: getattr(self, f.name) for f in fields(StoreIdentity)})

    @property
    def extra_datasets(self) -> dict[str, int]:
        """The view datasets beside ``features``: name -> views per row (float[N, views, D])."""
        return extra_datasets(self.augment_views, self.tta)

    def without_views(self) -> "StoreIdentity":
        """The identity of the plain ``features`` alone, as a store of the same trunk without views has it."""
        return dataclasses.replace(self.identity, **{f.name: f.default for f in fields(StoreIdentity)
                                                     if f.name in self.VIEW_FIELDS})

    def to_dict(self) -> dict:
        return self._recorded({f.name: getattr(self, f.name) for f in fields(StoreIdentity)})

    def _recorded(self, values: dict) -> dict:
        """``values`` with the augment fields only where there are augmented views, ``tta`` only where
        there are test-time views, ``source`` only for another library's backbone: a torchvision store
        without views keeps format 2's identity and fingerprint."""
        augment, tta = self.VIEW_FIELDS[:3], self.VIEW_FIELDS[3:]
        unused = set((augment if not self.augment_views else ()) + (tta if self.tta == "none" else ())
                     + (("source",) if self.source is None else ()))
        return {name: value for name, value in values.items() if name not in unused}

    @classmethod
    def from_dict(cls, values: Mapping) -> "StoreIdentity":
        """The identity fields of ``values`` (a header's, a head's record); extra keys are ignored."""
        return StoreIdentity(**{f.name: values[f.name] for f in fields(StoreIdentity)
                                if f.name in values or f.name not in cls.OPTIONAL_FIELDS})

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
class BackboneRecord(StoreIdentity):
    """What a consumer of a store's features (a head, a fine-tuned model) records of it, to rebuild
    the trunk that made them (:mod:`featurekit.backbones.rebuild`): the identity, the weights' name
    and source, the dimension; a head adds its ``columns`` [start, stop) in the concatenation and
    the stores' ``fingerprints`` by split, a fine-tuned model its ``trunk_file`` and its sha256."""

    store_name: str
    weights: str
    weights_source: str
    feature_dim: int
    columns: list[int] | None = None
    fingerprints: dict | None = None
    trunk_file: str | None = None
    trunk_file_sha256: str | None = None

    def to_dict(self) -> dict:
        """JSON values: the identity as :meth:`StoreIdentity.to_dict` records it, then the set fields."""
        own = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in self.identity_names()}
        return {**self.identity.to_dict(), **{name: value for name, value in own.items() if value is not None}}

    @staticmethod
    def identity_names() -> set[str]:
        return {f.name for f in fields(StoreIdentity)}


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
    # The rule that listed the rows when they are not root/<split>/<class>/<image> (images.sources: a cut
    # class folder, a file list, WebDataset shards); recorded only then, so a split folder's store is as before.
    listing_rule: dict | None = None

    def backbone_record(self, store_name: str, **extra) -> BackboneRecord:
        """What a consumer of these features records to rebuild the trunk that made them (``extra``:
        its own fields of :class:`BackboneRecord`)."""
        return BackboneRecord(**self.identity.to_dict(), store_name=store_name, weights=self.weights,
                              weights_source=self.weights_source, feature_dim=self.feature_dim, **extra)

    def feature_shapes(self, rows: int) -> dict[str, tuple[int, ...]]:
        """Every features dataset of a store of ``rows`` rows: ``features`` [N, D], then the views [N, views, D]."""
        views = {name: (rows, count, self.feature_dim) for name, count in self.extra_datasets.items()}
        return {PLAIN: (rows, self.feature_dim), **views}

    def to_dict(self) -> dict:
        values = self._recorded(dataclasses.asdict(self))
        return values if self.listing_rule is not None else {k: v for k, v in values.items() if k != "listing_rule"}

    def to_attrs(self) -> dict:
        """HDF5 attributes: dict fields as JSON, the rest as they are."""
        encoded = {k: json.dumps(v, sort_keys=True) if isinstance(v, dict) else v for k, v in self.to_dict().items()}
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **encoded}

    @classmethod
    def from_attrs(cls, attrs: Mapping, path: str | os.PathLike) -> "StoreHeader":
        """Parse a store's attributes, each of its type (a missing or mistyped one: :class:`StoreError`
        naming it; bad JSON: ValueError, see reading)."""
        missing = [f.name for f in fields(cls) if f.name not in attrs and f.default is dataclasses.MISSING]
        if missing:
            raise StoreError(f"{path}: missing attribute{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
        values = {}
        for f in fields(cls):
            if f.name in attrs:
                value = attrs[f.name].item() if isinstance(attrs[f.name], np.generic) else attrs[f.name]
                values[f.name] = json.loads(value) if f.type.startswith("dict") else value
        return parse(cls, values, str(path), StoreError)


def store_path(out_dir: str | os.PathLike, split: str, store_name: str) -> Path:
    """``<out_dir>/<split>/<file_stem(store_name)>.h5``. A split that would lead outside ``out_dir`` (an
    absolute path, ``..``) is refused: stores never land elsewhere, such as in the image folders."""
    if os.path.isabs(split) or os.path.normpath(split).split(os.sep)[0] == "..":
        raise SettingsError(f"--split {split}: stores go to {Path(out_dir) / '<split>'}/ and must stay inside "
                            f"{out_dir}; give the split's folder name under the data root (e.g. --split "
                            f"{Path(split).name})")
    return Path(out_dir) / split / f"{file_stem(store_name)}.h5"


def file_stem(store_name: str) -> str:
    """A store name as a file name: ``timm:vit_small_patch14_dinov2`` -> ``timm-vit_small_patch14_dinov2``,
    ``hf:facebook/dinov2-small`` -> ``hf-facebook--dinov2-small`` (the Hugging Face cache's own form).
    Registry names are their own stems; no two backbone names share one (no registry name holds a dash
    after a source's name, no Hub repo id a double dash)."""
    return store_name.replace("/", "--").replace(":", "-")


def fingerprint(identity: StoreIdentity, listing_digest: str) -> str:
    """sha256 of everything that determines a store's content: identity and listing."""
    return hashlib.sha256(json.dumps([identity.to_dict(), listing_digest], sort_keys=True).encode()).hexdigest()


@dataclass
class StoreContents:
    """A whole store in memory. ``features``: float16|float32 [N, D]; ``labels``: int64[N], or None in an
    unlabelled store (images without classes: no ``labels`` dataset, no classes)."""

    path: Path
    header: StoreHeader
    features: np.ndarray
    labels: np.ndarray | None
    paths: list[str]
    classes: list[str]
    skipped: list[tuple[str, str]]
    views: dict[str, np.ndarray] = field(default_factory=dict)  # view dataset -> float16|float32 [N, views, D]
    # each kept and skipped file's sha256 in hex (S64[N], S64[K]; b"" where unread); None in a store made
    # before featurekit recorded them (provenance, not identity: such a store stays current)
    file_sha256: np.ndarray | None = None
    skipped_file_sha256: np.ndarray | None = None
    file_size: np.ndarray | None = None  # int64[N]: each file's size when extracted


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
        elif version not in READABLE_VERSIONS:
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
    """Load a complete store into memory (``features=False`` skips the big array), its datasets checked
    first (:func:`structure_problems`): labels outside ``classes`` would index the wrong class, or
    none, and a few bytes must not declare gigabytes."""
    with reading(path) as h5:
        header = StoreHeader.from_attrs(h5.attrs, path)
        problems = structure_problems(h5, header)
        if problems:
            raise StoreError(f"{path}: {problems[0]} (the store is damaged)")
        classes, labels = strings(h5["classes"]), h5["labels"][()] if is_labelled(h5) else None
        return StoreContents(Path(path), header, h5["features"][()] if features else np.zeros((0, 0), np.float16),
                             labels, strings(h5["paths"]), classes,
                             list(zip(strings(h5["skipped_paths"]), strings(h5["skipped_reasons"]))),
                             {name: h5[name][()] for name in header.extra_datasets} if features else {},
                             *file_digests(h5), h5["file_size"][()])


def file_digests(h5: h5py.File) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The files' sha256 (S64[N], S64[K] of kept and skipped rows), or (None, None) in a store made
    before featurekit recorded them at extraction."""
    if "file_sha256" not in h5:
        return None, None
    return h5["file_sha256"][()], h5["skipped_file_sha256"][()]


def structure_problems(h5: h5py.File, header: StoreHeader) -> list[str]:
    """What is wrong with a store's datasets (one line each): missing ones, sizes beyond what the file
    holds (checked before any is read), shapes and dtypes other than the header records, labels
    outside the classes. Empty for a sound store."""
    file_size = os.path.getsize(h5.filename)
    big = [name for name, data in h5.items() if isinstance(data, h5py.Dataset)
           and data.size * max(data.dtype.itemsize, 1) > file_size]
    if big:
        return [f"{big[0]} declares {list(h5[big[0]].shape)} values, more than the file's {file_size} bytes hold"]
    missing = [name for name in DATASETS if name not in h5]
    if missing:
        return [f"missing {', '.join(missing)}"]
    if not is_labelled(h5) and len(h5["classes"]):
        return [f"{len(h5['classes'])} classes but no labels"]
    n, problems = len(h5["paths"]), []
    for name, shape in header.feature_shapes(n).items():  # features [N, D], then the views [N, views, D]
        if name not in h5:
            problems.append(f"missing {name}, which the store records ({header.dtype}{list(shape)})")
            continue
        features = h5[name]
        if features.ndim != len(shape) or features.dtype not in (np.float16, np.float32):
            form = "[N, D]" if len(shape) == 2 else "[N, views, D]"
            problems.append(f"{name} are {features.dtype}{list(features.shape)}, expected float16 or float32 {form}")
        elif features.shape != shape or str(features.dtype) != header.dtype:
            problems.append(f"{name} are {features.dtype}{list(features.shape)} but the store records "
                            f"{header.dtype}{list(shape)}")
    k = len(h5["skipped_paths"])
    for prefix, rows in (("", n), ("skipped_", k)):
        for name in (f"{prefix}file_size", f"{prefix}file_mtime_ns") + (("labels",) if not prefix and
                                                                         is_labelled(h5) else ()):
            if h5[name].shape != (rows,) or h5[name].dtype != np.int64:
                problems.append(f"{name} is {h5[name].dtype}{list(h5[name].shape)}, expected int64[{rows}]")
        digests = f"{prefix}file_sha256"  # only in stores made since featurekit records them
        if "file_sha256" in h5 and (digests not in h5 or h5[digests].shape != (rows,)
                                    or h5[digests].dtype != np.dtype(SHA256_DTYPE)):
            found = f"{h5[digests].dtype}{list(h5[digests].shape)}" if digests in h5 else "missing"
            problems.append(f"{digests} is {found}, expected {SHA256_DTYPE}[{rows}]")
    if h5["skipped_reasons"].shape != (k,):
        problems.append(f"{k} skipped paths but {len(h5['skipped_reasons'])} reasons")
    if n + k != header.n_listed:
        problems.append(f"{n} rows + {k} skipped != {header.n_listed} images listed")
    labels = h5["labels"][()] if is_labelled(h5) else np.zeros(0, np.int64)
    if labels.size and not problems and (labels.min() < 0 or labels.max() >= len(h5["classes"])):
        problems.append(f"labels outside 0-{len(h5['classes']) - 1}")
    return problems



def is_labelled(h5: h5py.File) -> bool:
    """Whether a store's rows have classes: an unlabelled store (images without classes) has no ``labels``."""
    return "labels" in h5


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
        files.update(zip(strings(h5[f"{prefix}paths"]), zip(sizes, mtimes)))
    return files


def strings(dataset: h5py.Dataset) -> list[str]:
    """A dataset of UTF-8 strings as ``str``."""
    return [value.decode("utf-8") for value in dataset[()]]


def warn_random(names: Sequence[str]) -> None:
    """A :class:`~featurekit.errors.FeaturekitWarning` where features of random weights are made or used
    (``names``: the backbones or stores; nothing when empty)."""
    if names:
        warnings.warn(f"{', '.join(names)}: random weights (--weights random); their features are for testing the "
                      "pipeline, meaningless for classifying images", FeaturekitWarning, stacklevel=2)
