"""WebDataset tar shards as a split (img2dataset's output; what clip-retrieval, DALI, Ray Data read).

A pattern (``shards/train-{000000..000099}.tar``) names the shards: braces and ``::`` are expanded
by webdataset's own ``expand_urls``, so a pattern means here what it means to ``wds.WebDataset``;
local names may also hold ``*`` globs; other URLs (``s3://``, ``https://``) are opened with fsspec.
A sample is the run of consecutive members sharing a key (webdataset's ``base_plus_ext``: the
member name up to the first dot of its file name; extensions lower-cased), so keys are the
``__key__`` webdataset gives. Of a sample:

- the image is its first member whose extension is an image extension (``jpg``, ``png``, ...);
  a sample without one is a row that cannot be read (``--on-error`` decides);
- the label is the text of its ``.cls`` member, or with ``label_key`` that field of its ``.json``
  member; class names are the labels' text, in string order. Shards without any ``.cls`` (and no
  ``label_key``) are unlabelled.

The tar is read with the standard library, not webdataset's streaming reader: listing a shard
reads its member headers, and each image is then read by offset (:class:`ShardMember`) by the
loader's workers, the very bytes a file of the same image holds, decoded by the same
:func:`~featurekit.images.decode.decode_image`; so rows can be read in any order, a chunk of
rows is never more than one shard (the unit of resume and of ``--shard I/N``), and the same
images from a folder and from shards give equal rows. Compressed tars cannot be read by offset
and are refused. A row is ``<shard name>/<key>``; its size and mtime are the image member's.
"""

from __future__ import annotations

import glob
import json
import os
import posixpath
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..errors import DataError, SettingsError, first_line, os_reason
from .decode import Unavailable
from .listing import IMAGE_EXTENSIONS, ImageRecord, SplitListing
from .names import printable_path

__all__ = ["ShardMember", "is_shard_pattern", "list_shards"]

_TAR_NAME = re.compile(r"\.(tar|tgz|tar\.gz|tar\.bz2|tar\.xz|tar\.zst)$", re.IGNORECASE)
_COMPRESSED = re.compile(r"\.(tgz|gz|bz2|xz|zst)$", re.IGNORECASE)


@dataclass(frozen=True)
class ShardMember:
    """The ``size`` bytes at ``offset`` of the shard ``url``: one image of a sample."""

    url: str
    offset: int
    size: int

    def read_bytes(self) -> bytes:
        with _open(self.url) as handle:
            handle.seek(self.offset)
            data = handle.read(self.size)
        if len(data) != self.size:
            raise OSError(f"shard truncated: {len(data)} of the image's {self.size} bytes")
        return data


def is_shard_pattern(text: str | os.PathLike) -> bool:
    """Whether a data source given as text names tar shards (a ``.tar`` name, a URL, a ``::`` list)."""
    text = str(text)
    return bool(_TAR_NAME.search(text.rstrip("}"))) or "::" in text or "://" in text


def list_shards(pattern: str, split: str, label_key: str | None = None) -> SplitListing:
    """The listing of the samples of the shards ``pattern`` names, in shard and member order.

    Raises :class:`DataError` (one line naming the shard) for a pattern matching nothing, a file
    that is not a tar, a compressed tar, a repeated key, and a label that cannot be read (no
    ``.cls`` where others have one; no ``.json`` or no such field with ``label_key``)."""
    urls = _expand(str(pattern))
    local = all(_local(url) is not None for url in urls)
    location = os.path.commonpath([os.path.dirname(_local(u)) for u in urls]) if local else _url_folder(urls)
    records, readers, labels, units = [], [], [], []
    for url in urls:
        name = (_local(url) if local else url)[len(location):].lstrip("/")
        units.append(len(records))
        for key, image, label in _samples(url, name, label_key):
            records.append(ImageRecord(f"{name}/{key}", -1, image.size if image else -1,
                                       image.mtime_ns if image else -1))
            readers.append(ShardMember(url, image.offset, image.size) if image else
                           Unavailable(f"no image member in sample {key} of {name}"))
            labels.append(label)
    if not records:
        raise DataError(f"{printable_path(pattern)}: no samples in its {len(urls)} shards")
    labelled = any(label is not None for label in labels)
    if labelled and None in labels:
        row = records[labels.index(None)].path
        raise DataError(f"{printable_path(location)}/{printable_path(row)}: no .cls label (other samples have one)")
    classes = sorted(set(labels)) if labelled else []
    index = {name: i for i, name in enumerate(classes)}
    records = [ImageRecord(r.path, index[label], r.size, r.mtime_ns) if labelled else r
               for r, label in zip(records, labels)]
    source = {"kind": "webdataset", "pattern": _recorded(pattern) if local else pattern, "shards": len(urls),
              **({"label_key": label_key} if label_key else {}), **({} if local else {"location": location})}
    return SplitListing(Path(location), split, tuple(classes), tuple(records), source=source, folder=Path(location),
                        labelled=labelled, readers=tuple(readers), units=tuple(units), name=printable_path(pattern))


@dataclass(frozen=True)
class _Member:
    offset: int
    size: int
    mtime_ns: int


def _samples(url: str, name: str, label_key: str | None):
    """(key, image member or None, label text or None) of each sample of one shard, in order."""
    shown = printable_path(name)
    try:
        with _open(url) as handle, tarfile.open(fileobj=handle, mode="r:") as tar:
            seen: set[str] = set()
            for key, members in _grouped(tar, shown):
                if key in seen:
                    raise DataError(f"{shown}: sample key {printable_path(key)} appears twice (not consecutively)")
                seen.add(key)
                image = next((m for ext, m in members.items() if f".{ext}" in IMAGE_EXTENSIONS), None)
                yield key, (_Member(image.offset_data, image.size, int(image.mtime * 1e9)) if image else None), \
                    _label(tar, members, label_key, f"{shown}: sample {printable_path(key)}")
    except tarfile.TarError as error:
        raise DataError(f"{shown}: not a tar file ({first_line(error)})") from None
    except OSError as error:
        raise DataError(f"{shown}: cannot read the shard ({os_reason(error)})") from None


def _grouped(tar: tarfile.TarFile, shown: str):
    """(key, {extension: member}) of each run of consecutive members sharing a key (webdataset's rule)."""
    from webdataset.tariterators import base_plus_ext

    key, members = None, {}
    for member in tar:
        if not member.isfile():
            continue
        prefix, extension = base_plus_ext(member.name)
        if prefix is None:
            continue  # no extension: webdataset skips it too
        if prefix != key and members:
            yield key, members
            members = {}
        key = prefix
        members.setdefault(extension.lower(), member)
    if members:
        yield key, members


def _label(tar: tarfile.TarFile, members: dict, label_key: str | None, where: str) -> str | None:
    if label_key is None:
        return _text(tar, members["cls"]).strip() if "cls" in members else None
    if "json" not in members:
        raise DataError(f"{where}: no .json member to read the label field {label_key!r} from")
    try:
        values = json.loads(_text(tar, members["json"]))
    except ValueError as error:
        raise DataError(f"{where}: its .json is not JSON ({first_line(error)})") from None
    if not isinstance(values, dict) or label_key not in values:
        fields = ", ".join(map(str, values)) if isinstance(values, dict) else type(values).__name__
        raise DataError(f"{where}: no field {label_key!r} in its .json (fields: {fields or 'none'})")
    return str(values[label_key])


def _text(tar: tarfile.TarFile, member: tarfile.TarInfo) -> str:
    return tar.extractfile(member).read().decode("utf-8", "replace")


def _expand(pattern: str) -> list[str]:
    """The shards of ``pattern``: braces and ``::`` expanded (webdataset), then local globs; each must exist."""
    try:
        from webdataset.shardlists import expand_urls
    except ImportError:
        raise SettingsError(f"{printable_path(pattern)}: reading WebDataset shards needs the webdataset package "
                            "(pip install 'featurekit[webdataset]')") from None
    urls = []
    for url in expand_urls(pattern):
        path = _local(url)
        urls += sorted(glob.glob(path)) if path is not None and glob.has_magic(path) else [url]
    compressed = next((url for url in urls if _COMPRESSED.search(url)), None)
    if compressed:
        raise DataError(f"{printable_path(compressed)}: a compressed tar; featurekit reads images by their offset in "
                        "the shard: decompress it (e.g. gunzip) into a plain .tar")
    absent = [url for url in urls if _local(url) is not None and not os.path.isfile(_local(url))]
    if not urls or len(absent) == len(urls):
        raise DataError(f"{printable_path(pattern)}: matches no shard" + (f" (no file {printable_path(absent[0])})"
                                                                           if absent else ""))
    if absent:
        raise DataError(f"{printable_path(absent[0])}: no such shard ({len(absent)} of the {len(urls)} shards "
                        f"{printable_path(pattern)} names are missing)")
    return urls


def _local(url: str) -> str | None:
    """The local path of ``url`` (a path, or a ``file://`` URL), or None for a remote URL."""
    if url.startswith("file://"):
        return url[len("file://"):]
    return None if "://" in url else url


def _url_folder(urls: list[str]) -> str:
    return posixpath.dirname(os.path.commonprefix([posixpath.dirname(u) + "/" for u in urls]))


def _recorded(pattern: str) -> str:
    """A local pattern as stores record it: absolute (``verify`` lists it again from anywhere)."""
    return "::".join(os.path.abspath(_local(part)) for part in pattern.split("::"))


def _open(url: str) -> BinaryIO:
    path = _local(url)
    if path is not None:
        return open(path, "rb")
    import fsspec

    return fsspec.open(url, "rb").open()
