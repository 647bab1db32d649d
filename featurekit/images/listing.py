"""Stage 1: list an image folder, deterministically, opening nothing but folders.

An image-folder data set is ``root/<split>/<class>/<image>``; a split folder holding images
directly, without class folders, is an unlabelled split (a Kaggle ``test/``: no classes, no labels).
Other sources (a class folder cut into train and valid, file lists, WebDataset shards:
:mod:`featurekit.images.sources`) make the same :class:`SplitListing`. Listing is deterministic: class
folders in string order (``ImageFolder`` order: "1", "10", "100", "2", ...; class *names* are
stored, so nobody has to rely on indices), images in string order of their relative POSIX path.

Every directory is listed at most once per split: a directory link is followed unless it leads to
a folder already listed (a loop such as ``ln -s . loop``, or a second link to one folder), and such
links are reported, as are folders that cannot be read, images outside the class folders, hidden
entries and files without an image extension (:meth:`SplitListing.notices`). Any name with an
image extension is listed, whatever it is; decoding (:mod:`featurekit.images.decode`) refuses what
is not a regular file without opening it. Names are stored in :func:`~featurekit.images.names.printable_path` form.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError, os_reason
from .decode import ImageBytes, ImageSource
from .names import counted, printable_path

__all__ = ["IMAGE_EXTENSIONS", "ImageRecord", "SPLIT_NAMES", "SplitListing", "is_dir", "is_image_name", "list_split",
           "listing_changes"]

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)

# --------------------------------------------------------------------------- listing


@dataclass(frozen=True)
class ImageRecord:
    """One listed image. ``path`` is relative to the split folder, POSIX separators, OS form
    (:func:`printable_path` gives the stored form)."""

    path: str
    label: int  # index into the listing's classes; -1 in an unlabelled listing (stores then hold no labels)
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class SplitListing:
    """The rows of one split: class names and one record per image, in order.

    Class names and records are in OS form (:func:`printable_path` gives the stored form). What
    was not listed is kept, in printable form relative to the split folder, by kind: ``ignored``
    (no image extension), ``outside_classes`` (images directly in the split folder), ``hidden``
    (names starting with ``.``: image files and folders), ``unreadable`` ((folder, reason)),
    ``links_not_followed`` ((link, the folder it leads to, listed already)); ``empty_classes``
    are class folders read and found without images. :meth:`notices` words them.

    Beyond ``root/<split>/<class>/<image>`` (:mod:`featurekit.images.sources`): ``source`` records
    the rule that chose the rows (stores record it; None for a split folder, whose stores keep
    their fingerprints); ``folder``: where record paths are relative to (default ``root/split``);
    ``labelled``: False for images without classes; ``readers``: per record, what to read when the
    row is not the file ``folder/path`` (a tar member, a listed file known to be missing);
    ``units``: row positions where a unit of work begins (a tar shard), which chunks never cross;
    ``missing``: listed entries that cannot be read, (name, reason); ``notes``: what the rule
    decided that a user should hear; ``name``: what messages call the listing.
    """

    root: Path
    split: str
    classes: tuple[str, ...]
    records: tuple[ImageRecord, ...]
    ignored: tuple[str, ...] = ()
    empty_classes: tuple[str, ...] = ()
    outside_classes: tuple[str, ...] = ()
    hidden: tuple[str, ...] = ()
    unreadable: tuple[tuple[str, str], ...] = ()
    links_not_followed: tuple[tuple[str, str], ...] = ()
    source: dict | None = None
    folder: Path | None = None
    labelled: bool = True
    readers: tuple[ImageBytes | None, ...] | None = None
    units: tuple[int, ...] = ()
    missing: tuple[tuple[str, str], ...] = ()
    notes: tuple[str, ...] = ()
    name: str | None = None

    @property
    def split_dir(self) -> Path:
        """The folder record paths are relative to."""
        return self.folder if self.folder is not None else self.root / self.split

    @property
    def display_dir(self) -> str:
        """The split folder as messages name it."""
        return printable_path(str(self.split_dir))

    @property
    def data_root(self) -> str:
        """Where the rows are, as stores record it (printable): the resolved folder, or remote shards' URL folder."""
        location = (self.source or {}).get("location")
        return location if location is not None else printable_path(str(self.root.resolve()))

    @property
    def display(self) -> str:
        """The listing as messages name it: the split folder, or the list, shards or rule it came from."""
        return self.name or self.display_dir

    def __len__(self) -> int:
        return len(self.records)

    def absolute(self, index: int) -> Path:
        return self.split_dir / self.records[index].path

    def sha256(self) -> str:
        """sha256 of the class names, the listing rule (if any) and every file's path, label, size and
        mtime, in order: equal digests mean the same files chosen alike (a store records it to tell two
        folders of equal names apart). A split folder's digest is what it was before other sources."""
        digest = hashlib.sha256(json.dumps([printable_path(c) for c in self.classes]).encode())
        if self.source is not None:
            digest.update(json.dumps(self.source, sort_keys=True).encode())
        for record in self.records:
            digest.update(f"{printable_path(record.path)}\0{record.label}\0{record.size}\0{record.mtime_ns}\n".encode())
        return digest.hexdigest()

    def files(self) -> list[tuple[ImageSource, str]]:
        """(what to read: an OS path or a reader, name for messages) of every record, in order."""
        split_dir = self.split_dir
        readers = self.readers or (None,) * len(self.records)
        return [(str(split_dir / r.path) if reader is None else reader,
                 printable_path(os.path.normpath(split_dir / r.path)))  # a list's ../ resolved, for the eye only
                for r, reader in zip(self.records, readers)]

    def chunk_bounds(self, chunk_size: int) -> list[int]:
        """Where the chunks of the rows begin, then ``len(self)``: every ``chunk_size`` rows, or at each
        unit (a tar shard is the unit of resume and of ``--shard``)."""
        starts = sorted(set(self.units) - {len(self)}) if self.units else list(range(0, len(self), chunk_size))
        return starts + [len(self)]

    def notices(self) -> list[str]:
        """One line per kind of entry that was not listed, one for class folders without images, and the notes."""
        lines = [f"{self.display}: {counted(*kind)}" for kind in self._not_listed() if kind[0]]
        if self.empty_classes:
            lines.append(f"{self.display}: empty class folders (kept as classes, no rows): "
                         f"{', '.join(printable_path(name) for name in self.empty_classes)}")
        return lines + [f"{self.display}: {note}" for note in self.notes]

    def unreadable_text(self) -> str:
        """``"2 folders cannot be read: a (permission denied), b (...)"`` (and the listed files that cannot
        be read), or ``""``."""
        return "; ".join(counted(*kind) for kind in self._not_listed()[:2] if kind[0])

    def _not_listed(self) -> list[tuple]:
        """(names, singular, plural, predicate) per kind, as :func:`counted` takes them."""
        return [
            ([f"{folder} ({reason})" for folder, reason in self.unreadable], "folder", "folders", "cannot be read"),
            ([f"{entry} ({reason})" for entry, reason in self.missing], "listed file", "listed files",
             "cannot be read"),
            ([f"{link} -> {target}" for link, target in self.links_not_followed], "directory link", "directory links",
             "not followed (it leads to a folder listed already)"),
            (self.outside_classes, "image", "images", "outside the class folders ignored"),
            (self.hidden, "hidden entry", "hidden entries", "ignored (names starting with '.')"),
            (self.ignored, "file", "files", "without an image extension ignored"),
        ]


def list_split(root: str | os.PathLike, split: str) -> SplitListing:
    """List ``root/split/<class>/*`` deterministically; a split folder holding images directly and no
    class folder is listed as an unlabelled split (``labelled`` False, no classes).

    Raises :class:`DataError` when the split folder is missing or unreadable, has no class
    folders and no images, or holds no image at all. Class folders without images are kept as classes and
    reported in ``empty_classes``; those that cannot be read are kept too, reported in ``unreadable``.
    """
    root = Path(root)
    split_dir = root / split
    display = printable_path(str(split_dir))
    if not split_dir.is_dir():
        expected = f"{printable_path(str(root))}/{printable_path(split)}/<class>/<image>"
        raise DataError(f"{display}: split folder not found (expected {expected}){layout_hint(root, split)}")
    walk = _Walk(split_dir)
    entries = walk.scan("")
    if entries is None:
        raise DataError(f"{display}: cannot read the split folder ({walk.unreadable[0][1]})")
    walk.enter("", split_dir)
    classes = sorted(walk.sort_top(entries))
    if not classes and walk.loose:  # images without classes: an unlabelled split (a Kaggle test/ folder)
        return SplitListing(root, split, (), tuple(_record(e.name, e, -1) for e in walk.loose),
                            tuple(sorted(walk.ignored)), hidden=tuple(walk.hidden), labelled=False)
    if not classes:
        raise DataError(f"{display}: no class folders and no images (expected {printable_path(split)}/<class>/<image>, "
                        f"or {printable_path(split)}/<image> for images without classes)")
    records: list[ImageRecord] = []
    empty: list[str] = []
    for label, class_name in enumerate(classes):
        found = walk.images_in(class_name, label) if walk.enter(class_name, split_dir / class_name) else None
        if found == []:
            empty.append(class_name)
        records.extend(sorted(found or (), key=lambda record: os.fsencode(record.path)))
    listing = SplitListing(root, split, tuple(classes), tuple(records), tuple(sorted(walk.ignored)), tuple(empty),
                           tuple(walk.outside), tuple(walk.hidden), tuple(walk.unreadable), tuple(walk.links))
    if not records:
        unreadable = f" ({listing.unreadable_text()})" if listing.unreadable else ""
        raise DataError(f"{display}: no images in any of its {len(classes)} class folders{unreadable}")
    return listing


SPLIT_NAMES = ("train", "valid", "val", "validation", "test")  # folder names that say "a split"


def layout_hint(root: Path, split: str) -> str:
    """What ``root`` holds instead of ``<split>/<class>/<image>``, and the fix, as ``"; ..."`` (or ``""``)."""
    shown = printable_path(str(root))
    if not root.is_dir():
        return f"; there is no folder {shown}"
    try:
        entries = [e for e in os.scandir(root) if not e.name.startswith(".")]
        folders = sorted(e.name for e in entries if is_dir(e))
        loose = [e.name for e in entries if not is_dir(e) and is_image_name(e.name)]
        with_images = [name for name in folders if _holds_images(root / name)]
    except OSError:
        return ""
    if with_images:
        names = counted([printable_path(n) for n in with_images], "folder", "folders", "holding images directly")
        name = root.resolve().name
        if name in (split, *SPLIT_NAMES):  # the split folder itself was given
            return (f"; {shown} has {names}: it is a split folder; give the folder above it "
                    f"(featurekit extract {printable_path(str(root.parent))} --split {printable_path(name)})")
        return (f"; {shown} has {names}: class folders without a split level; cut train and valid from them "
                f"(featurekit extract {shown} --valid-fraction 0.2) or move them to {shown}/<split>/<class>/<image>")
    if folders:
        return f"; splits in {shown}: {', '.join(printable_path(name) for name in folders)} (choose with --split)"
    if loose:
        return f"; {shown} holds {len(loose)} images directly: move them to {shown}/<split>/<class>/<image>"
    return ""


def _holds_images(folder: Path) -> bool:
    with os.scandir(folder) as entries:
        return any(is_image_name(e.name) and not is_dir(e) for e in entries if not e.name.startswith("."))


def listing_changes(recorded: dict[str, tuple[int, int]], recorded_classes: list[str],
                    listing: SplitListing) -> list[str]:
    """How ``listing`` differs from an earlier one, given as printable path -> (size, mtime_ns) and
    printable class names: added, removed and modified files, changed class folders; empty if none."""
    current = {printable_path(record.path): (record.size, record.mtime_ns) for record in listing.records}
    changes = [(sorted(current.keys() - recorded.keys()), "added since extraction"),
               (sorted(recorded.keys() - current.keys()), "removed since extraction"),
               (sorted(p for p in recorded.keys() & current.keys() if recorded[p] != current[p]),
                "modified since extraction (size or mtime)")]
    lines = [counted(paths, "image", "images", kind, shown=10) for paths, kind in changes if paths]
    classes = [printable_path(c) for c in listing.classes]
    if recorded_classes != classes:
        lines.append(f"class folders changed ({', '.join(recorded_classes)} -> {', '.join(classes)})")
    return lines


class _Walk:
    """The walk of one split folder: what it found, and every folder listed so far."""

    def __init__(self, split_dir: Path):
        self.split_dir = split_dir
        self.real_split_dir = os.path.realpath(split_dir)
        self.listed: dict[tuple[int, int], str] = {}  # (st_dev, st_ino) -> relative folder, printable
        self.ignored: list[str] = []
        self.outside: list[str] = []
        self.loose: list[os.DirEntry] = []  # the images of self.outside
        self.hidden: list[str] = []
        self.unreadable: list[tuple[str, str]] = []
        self.links: list[tuple[str, str]] = []

    def scan(self, relative: str) -> list[os.DirEntry] | None:
        """The entries of folder ``relative``, in byte order; None (and reported) if it cannot be read."""
        try:
            with os.scandir(self.split_dir / relative) as entries:
                return sorted(entries, key=lambda entry: os.fsencode(entry.name))
        except OSError as error:
            self.unreadable.append((printable_path(relative or "."), os_reason(error)))
            return None

    def enter(self, relative: str, path: str | os.PathLike) -> bool:
        """Whether to list folder ``relative`` now: not if it was listed already or contains itself
        (a directory link into a loop, or a second link to one folder), which is reported."""
        try:
            info = os.stat(path)
        except OSError as error:
            self.unreadable.append((printable_path(relative), os_reason(error)))
            return False
        target = os.path.realpath(path)
        seen = self.listed.get((info.st_dev, info.st_ino))
        if seen is None and os.path.islink(path) and _contains(target, os.path.realpath(os.path.dirname(path))):
            seen = self._printable_relative(target)  # an ancestor outside the split folder
        if seen is not None:
            self.links.append((printable_path(relative), seen))
            return False
        self.listed[(info.st_dev, info.st_ino)] = printable_path(relative or ".")
        return True

    def sort_top(self, entries: list[os.DirEntry]) -> list[str]:
        """The class folder names among the split folder's entries; the rest is reported."""
        classes = []
        for entry in entries:
            if entry.name.startswith("."):
                self._hidden(entry, entry.name)
            elif is_dir(entry):
                classes.append(entry.name)
            elif is_image_name(entry.name):
                self.outside.append(printable_path(entry.name))
                self.loose.append(entry)
            else:
                self.ignored.append(printable_path(entry.name))
        return classes

    def images_in(self, relative: str, label: int) -> list[ImageRecord] | None:
        """Records of the images under folder ``relative``; None if that folder cannot be read."""
        entries = self.scan(relative)
        if entries is None:
            return None
        records = []
        for entry in entries:
            child = f"{relative}/{entry.name}"
            if entry.name.startswith("."):
                self._hidden(entry, child)
            elif is_dir(entry):
                if self.enter(child, entry.path):
                    records += self.images_in(child, label) or []
            elif is_image_name(entry.name):
                records.append(_record(child, entry, label))
            else:
                self.ignored.append(printable_path(child))
        return records

    def _hidden(self, entry: os.DirEntry, relative: str) -> None:
        if is_dir(entry) or is_image_name(entry.name):  # a hidden .DS_Store is not worth a word
            self.hidden.append(printable_path(relative))

    def _printable_relative(self, real: str) -> str:
        inside = _contains(self.real_split_dir, real)
        return printable_path(os.path.relpath(real, self.real_split_dir) if inside else real)


def _contains(folder: str, path: str) -> bool:
    """Whether real path ``path`` is ``folder`` or inside it."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows links
    except OSError:  # a link into a loop of links: listed as a file, decoding gives the reason
        return False


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _record(relative: str, entry: os.DirEntry, label: int) -> ImageRecord:
    try:
        info = entry.stat()  # of the link's target
    except OSError:  # vanished or unreadable: still listed, decoding reports it
        return ImageRecord(relative, label, -1, -1)
    return ImageRecord(relative, label, info.st_size, info.st_mtime_ns)

