"""Stage 1: list an image folder and decode its images, once.

An image-folder data set is ``root/<split>/<class>/<image>``. Listing is deterministic: class
folders in string order (``ImageFolder`` order: "1", "10", "100", "2", ...; class *names* are
stored, so nobody has to rely on indices), images in string order of their relative POSIX path.

Listing opens nothing but folders. Every directory is listed at most once per split: a directory
link is followed unless it leads to a folder already listed (a loop such as ``ln -s . loop``, or
a second link to one folder), and such links are reported, as are folders that cannot be read,
images outside the class folders, hidden entries and files without an image extension
(:meth:`SplitListing.notices`). Any name with an image extension is listed, whatever it is;
decoding refuses what is not a regular file without opening it (a FIFO would block forever).

Decoding turns any file PIL understands into an 8-bit RGB ``PIL.Image`` under a recorded
:class:`DecodePolicy`. Every limit is checked on the size that will be decoded, before decoding.
Every failure is a :class:`ImageDecodeError` whose message is one line naming the file and the
reason. Names are printed and stored in :func:`printable_path` form: one line, UTF-8, injective.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO, ClassVar

import numpy as np
import simplejpeg
from PIL import Image, ImageOps

from .errors import FeaturekitError, SettingsError, first_line

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)
NAMES_SHOWN = 5  # names per notice line; the rest are counted


class DataError(FeaturekitError, ValueError):
    """The data set folder itself is unusable (missing split, no classes, no images)."""


class ImageDecodeError(FeaturekitError):
    """One image could not be turned into RGB pixels. ``str()`` is ``"<path>: <reason>"``."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


# --------------------------------------------------------------------------- names


def printable_path(path: str) -> str:
    """An OS path (non-UTF-8 bytes held as ``os.fsdecode``'s surrogate escapes) -> the one-line
    UTF-8 form featurekit stores and prints.

    Printable characters stay as they are; a backslash becomes ``\\\\``, an undecodable byte or an
    ASCII control character ``\\xNN`` (the byte), any other unprintable character (line separators,
    C1 controls, format characters) ``\\uNNNN``. The form is injective; :func:`fs_path` inverts it.
    """
    if path.isprintable() and "\\" not in path:
        return path
    return "".join(_printable_char(char) for char in path)


def _printable_char(char: str) -> str:
    if char == "\\":
        return "\\\\"
    if char.isprintable():  # surrogates are not
        return char
    code = ord(char)
    if code < 0x80:
        return f"\\x{code:02x}"
    if 0xDC80 <= code <= 0xDCFF:  # the undecodable byte code - 0xDC00
        return f"\\x{code - 0xDC00:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


_ESCAPE = re.compile(r"\\(\\|x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8})")


def fs_path(printed: str) -> str:
    """A :func:`printable_path` (a stored or printed name) -> the OS path it came from.

    ``\\xNN`` is the byte NN, so names with undecodable bytes come back as ``os.fsdecode`` makes
    them; a backslash that starts no escape (names stored before backslashes were doubled) stays.
    """
    if "\\" not in printed:
        return printed
    raw, position = bytearray(), 0
    for escape in _ESCAPE.finditer(printed):
        raw += printed[position:escape.start()].encode("utf-8", "surrogateescape")
        token = escape.group(1)
        if token == "\\":
            raw += b"\\"
        elif token[0] == "x":
            raw.append(int(token[1:], 16))
        else:
            raw += chr(int(token[1:], 16)).encode("utf-8", "surrogatepass")
        position = escape.end()
    raw += printed[position:].encode("utf-8", "surrogateescape")
    return os.fsdecode(bytes(raw))


def counted(paths, singular: str, plural: str, predicate: str, shown: int = NAMES_SHOWN) -> str:
    """``"2 <plural> <predicate>: a, b"``: one line, at most ``shown`` names, the rest counted."""
    paths = list(paths)
    more = f" and {len(paths) - shown} more" if len(paths) > shown else ""
    noun = singular if len(paths) == 1 else plural
    return f"{len(paths)} {noun} {predicate}: {', '.join(paths[:shown])}{more}"


# --------------------------------------------------------------------------- listing


@dataclass(frozen=True)
class ImageRecord:
    """One listed image. ``path`` is relative to the split folder, POSIX separators, OS form
    (:func:`printable_path` gives the stored form)."""

    path: str
    label: int
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class SplitListing:
    """The sorted content of ``root/split``: class names and one record per image file.

    Class names and records are in OS form (:func:`printable_path` gives the stored form). What
    was not listed is kept, in printable form relative to the split folder, by kind: ``ignored``
    (no image extension), ``outside_classes`` (images directly in the split folder), ``hidden``
    (names starting with ``.``: image files and folders), ``unreadable`` ((folder, reason)),
    ``links_not_followed`` ((link, the folder it leads to, listed already)); ``empty_classes``
    are class folders read and found without images. :meth:`notices` words them.
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

    @property
    def split_dir(self) -> Path:
        return self.root / self.split

    @property
    def display_dir(self) -> str:
        """The split folder as messages name it."""
        return printable_path(str(self.split_dir))

    def __len__(self) -> int:
        return len(self.records)

    def absolute(self, index: int) -> Path:
        return self.split_dir / self.records[index].path

    def sha256(self) -> str:
        """sha256 of the class names and every file's path, label, size and mtime, in order: equal
        digests mean the same files (a store records it to tell two folders of equal names apart)."""
        digest = hashlib.sha256(json.dumps([printable_path(c) for c in self.classes]).encode())
        for record in self.records:
            digest.update(f"{printable_path(record.path)}\0{record.label}\0{record.size}\0{record.mtime_ns}\n".encode())
        return digest.hexdigest()

    def files(self) -> list[tuple[str, str]]:
        """(OS path to open, name for messages) of every record, in order."""
        split_dir, display_dir = self.split_dir, self.display_dir
        return [(str(split_dir / r.path), f"{display_dir}/{printable_path(r.path)}") for r in self.records]

    def notices(self) -> list[str]:
        """One line per kind of entry that was not listed, and one for class folders without images."""
        lines = [f"{self.display_dir}: {counted(*kind)}" for kind in self._not_listed() if kind[0]]
        if self.empty_classes:
            lines.append(f"{self.display_dir}: empty class folders (kept as classes, no rows): "
                         f"{', '.join(printable_path(name) for name in self.empty_classes)}")
        return lines

    def unreadable_text(self) -> str:
        """``"2 folders cannot be read: a (permission denied), b (...)"``, or ``""``."""
        return counted(*self._not_listed()[0]) if self.unreadable else ""

    def _not_listed(self) -> list[tuple]:
        """(names, singular, plural, predicate) per kind, as :func:`counted` takes them."""
        return [
            ([f"{folder} ({reason})" for folder, reason in self.unreadable], "folder", "folders", "cannot be read"),
            ([f"{link} -> {target}" for link, target in self.links_not_followed], "directory link", "directory links",
             "not followed (it leads to a folder listed already)"),
            (self.outside_classes, "image", "images", "outside the class folders ignored"),
            (self.hidden, "hidden entry", "hidden entries", "ignored (names starting with '.')"),
            (self.ignored, "file", "files", "without an image extension ignored"),
        ]


def list_split(root: str | os.PathLike, split: str) -> SplitListing:
    """List ``root/split/<class>/*`` deterministically.

    Raises :class:`DataError` when the split folder is missing or unreadable, has no class
    folders, or holds no image at all. Class folders without images are kept as classes and
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
    if not classes:
        loose = f"; its {len(walk.outside)} images go into class folders {display}/<class>/" if walk.outside else ""
        raise DataError(f"{display}: no class folders (expected {printable_path(split)}/<class>/<image>){loose}")
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
        folders = sorted(e.name for e in entries if _is_dir(e))
        loose = [e.name for e in entries if not _is_dir(e) and _is_image_name(e.name)]
        with_images = [name for name in folders if _holds_images(root / name)]
    except OSError:
        return ""
    if with_images:
        names = counted([printable_path(n) for n in with_images], "folder", "folders", "holding images directly")
        name = root.resolve().name
        if name in (split, *SPLIT_NAMES):  # the split folder itself was given
            return (f"; {shown} has {names}: it is a split folder; give the folder above it "
                    f"(featurekit extract {printable_path(str(root.parent))} --split {printable_path(name)})")
        return (f"; {shown} has {names}: class folders without a split level; move them to {shown}/<split>/, "
                f"e.g. {shown}/train/<class>/<image> and {shown}/valid/<class>/<image>")
    if folders:
        return f"; splits in {shown}: {', '.join(printable_path(name) for name in folders)} (choose with --split)"
    if loose:
        return f"; {shown} holds {len(loose)} images directly: move them to {shown}/<split>/<class>/<image>"
    return ""


def _holds_images(folder: Path) -> bool:
    with os.scandir(folder) as entries:
        return any(_is_image_name(e.name) and not _is_dir(e) for e in entries if not e.name.startswith("."))


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
        self.hidden: list[str] = []
        self.unreadable: list[tuple[str, str]] = []
        self.links: list[tuple[str, str]] = []

    def scan(self, relative: str) -> list[os.DirEntry] | None:
        """The entries of folder ``relative``, in byte order; None (and reported) if it cannot be read."""
        try:
            with os.scandir(self.split_dir / relative) as entries:
                return sorted(entries, key=lambda entry: os.fsencode(entry.name))
        except OSError as error:
            self.unreadable.append((printable_path(relative or "."), _os_reason(error)))
            return None

    def enter(self, relative: str, path: str | os.PathLike) -> bool:
        """Whether to list folder ``relative`` now: not if it was listed already or contains itself
        (a directory link into a loop, or a second link to one folder), which is reported."""
        try:
            info = os.stat(path)
        except OSError as error:
            self.unreadable.append((printable_path(relative), _os_reason(error)))
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
            elif _is_dir(entry):
                classes.append(entry.name)
            else:
                (self.outside if _is_image_name(entry.name) else self.ignored).append(printable_path(entry.name))
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
            elif _is_dir(entry):
                if self.enter(child, entry.path):
                    records += self.images_in(child, label) or []
            elif _is_image_name(entry.name):
                records.append(_record(child, entry, label))
            else:
                self.ignored.append(printable_path(child))
        return records

    def _hidden(self, entry: os.DirEntry, relative: str) -> None:
        if _is_dir(entry) or _is_image_name(entry.name):  # a hidden .DS_Store is not worth a word
            self.hidden.append(printable_path(relative))

    def _printable_relative(self, real: str) -> str:
        inside = _contains(self.real_split_dir, real)
        return printable_path(os.path.relpath(real, self.real_split_dir) if inside else real)


def _contains(folder: str, path: str) -> bool:
    """Whether real path ``path`` is ``folder`` or inside it."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows links
    except OSError:  # a link into a loop of links: listed as a file, decoding gives the reason
        return False


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _record(relative: str, entry: os.DirEntry, label: int) -> ImageRecord:
    try:
        info = entry.stat()  # of the link's target
    except OSError:  # vanished or unreadable: still listed, decoding reports it
        return ImageRecord(relative, label, -1, -1)
    return ImageRecord(relative, label, info.st_size, info.st_mtime_ns)


def _os_reason(error: OSError) -> str:
    if isinstance(error, PermissionError):
        return "permission denied"
    return (error.strerror or errno.errorcode.get(error.errno or 0, type(error).__name__)).lower()


# --------------------------------------------------------------------------- decoding


@dataclass(frozen=True)
class DecodePolicy:
    """How files become RGB pixels; recorded in every store because it changes the features.

    - ``exif_transpose``: apply the EXIF orientation (phone photos are stored sideways).
    - ``alpha_background``: transparent pixels are composited onto this grey level (0-255).
    - ``draft_min_side``: JPEGs are decoded at a reduced DCT scale while their shorter side stays
      at least this many pixels (much faster for large photos; ``None`` decodes at full size).
      A constant, not a function of the backbones, so a store's features never depend on which
      other backbones shared the run.
    - ``backend``: ``pil``, or ``torchvision`` (JPEGs decoded in batches by ``decode_jpeg`` on the
      extraction device, nvJPEG on CUDA, at full size; the rest by PIL). They round differently,
      so the backend is part of a store's identity. ``auto`` (torchvision on CUDA, PIL elsewhere)
      is resolved against the device before a run (``RunSettings.resolved``) and never stored.

    Refusals (:data:`REFUSALS`), checked before decoding, on the size that will be decoded (after
    the draft decision; nvJPEG decodes at full size):

    - ``max_pixels``: more decoded pixels than this is refused as a decompression bomb. A
      progressive JPEG holds the coefficients of every stored pixel while decoding, so its stored
      size counts too. The default, PIL's own warning threshold, is 256 MiB of 8-bit RGB.
    - ``max_aspect_ratio``: a longer side more than this many times the shorter one is refused.
      Views scale the shorter side to ``resize_size``, so a 30000x1 image would become
      7,680,000x256 pixels (6 GB) before its centre is cut out.
    - ``refuse_damaged_jpeg``: a JPEG whose entropy-coded data libjpeg complains about (flipped
      bits, a lost marker: PIL decodes such files silently, with damaged rows) is refused.

    Refusals decide which images are left out, never the values of the others, and every image
    left out is recorded with its reason; so they are not part of :meth:`to_dict`, the identity,
    and changing them never makes a store stale.
    """

    exif_transpose: bool = True
    alpha_background: int = 255
    draft_min_side: int | None = 768
    backend: str = "auto"
    max_pixels: int = 89_478_485
    max_aspect_ratio: float = 100.0
    refuse_damaged_jpeg: bool = True

    REFUSALS: ClassVar[tuple[str, ...]] = ("max_pixels", "max_aspect_ratio", "refuse_damaged_jpeg")
    BACKENDS: ClassVar[tuple[str, ...]] = ("auto", "pil", "torchvision")

    def __post_init__(self) -> None:
        if self.backend not in self.BACKENDS:
            raise SettingsError(f"unknown decoder {self.backend!r} (choose from {', '.join(self.BACKENDS)})")

    def to_dict(self) -> dict:
        """What changes the features (the store's ``decode`` attribute and identity)."""
        return {key: value for key, value in asdict(self).items() if key not in self.REFUSALS}

    @classmethod
    def from_dict(cls, values: dict) -> "DecodePolicy":
        """The policy a store or head recorded (:meth:`to_dict`), with today's refusals."""
        return cls(**{key: value for key, value in values.items() if key not in cls.REFUSALS})


def size_refusal(image: Image.Image, policy: DecodePolicy, stored_size: tuple[int, int] | None = None) -> str | None:
    """Why an opened, not yet loaded ``image`` must not be decoded at its current ``size``, or None.

    ``stored_size``: its size before a draft reduced ``image.size``."""
    width, height = image.size
    if width * height > policy.max_pixels:
        drafted = f"{stored_size[0]}x{stored_size[1]} drafted to " if stored_size and stored_size != image.size else ""
        return f"decompression bomb refused ({drafted}{width}x{height} = {width * height} pixels > {policy.max_pixels})"
    stored_width, stored_height = stored_size or image.size
    if image.format == "JPEG" and image.info.get("progressive") and stored_width * stored_height > policy.max_pixels:
        return (f"decompression bomb refused (progressive JPEG {stored_width}x{stored_height}: its "
                f"{stored_width * stored_height} pixels are held while decoding > {policy.max_pixels})")
    if max(width, height) > policy.max_aspect_ratio * min(width, height):
        return f"extreme aspect ratio refused ({width}x{height}; at most {policy.max_aspect_ratio:g}:1)"
    return None


def jpeg_damage(data: bytes) -> str | None:
    """libjpeg's complaint about a JPEG's data, or None if it has none.

    PIL silences libjpeg's warnings ("Corrupt JPEG data: bad Huffman code", "N extraneous bytes
    before marker"): a JPEG with damaged entropy-coded data decodes into damaged rows without a
    word. libjpeg-turbo decodes it again here, strictly, in grey at 1/8 scale, so that the
    cost is mostly reading the entropy-coded data. A flip that still decodes as valid data goes
    unnoticed: JPEG has no checksum.
    """
    try:
        colorspace = simplejpeg.decode_jpeg_header(data)[2]
        simplejpeg.decode_jpeg(data, colorspace="CMYK" if colorspace in ("CMYK", "YCCK") else "GRAY",
                               fastdct=True, fastupsample=True, min_factor=8, strict=True)
    except ValueError as error:
        return first_line(error)
    return None


def open_regular_file(path: str | os.PathLike) -> BinaryIO:
    """``path`` opened for reading, if it is a regular file; otherwise it is never opened (a FIFO
    would block forever, a device could be anything) and an ImageDecodeError reason is raised."""
    _refuse_special(os.stat(path).st_mode)
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        _refuse_special(os.fstat(descriptor).st_mode)  # replaced between the stat and the open
        os.set_blocking(descriptor, True)
        return os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise


_SPECIAL_FILES = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"),
                  (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"))


def _refuse_special(mode: int) -> None:
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _SPECIAL_FILES if test(mode)), "special file")
        raise _Refused(f"not a regular file ({kind})")


def decode_image(path: str | os.PathLike, policy: DecodePolicy | None = None,
                 display: str | None = None) -> Image.Image:
    """Decode one file into an 8-bit RGB image. Raises :class:`ImageDecodeError`.

    ``display`` is the name used in error messages (defaults to ``path`` in printable form).
    """
    display = display or printable_path(str(path))
    try:
        with open_regular_file(path) as handle:
            return _decode_open_file(handle, policy or DecodePolicy())
    except _Refused as refusal:
        raise ImageDecodeError(display, str(refusal)) from None
    except FileNotFoundError:
        reason = "broken symbolic link" if os.path.islink(path) else "file disappeared after listing"
        raise ImageDecodeError(display, reason) from None
    except PermissionError:
        raise ImageDecodeError(display, "permission denied") from None
    except Image.DecompressionBombError as error:
        raise ImageDecodeError(display, f"decompression bomb refused ({error})") from None
    except Exception as error:  # PIL raises many types for bad data; the reason is what matters
        raise ImageDecodeError(display, _reason(error)) from None


def _reason(error: Exception) -> str:
    if isinstance(error, OSError) and error.errno is not None:
        # "[Errno 40] Too many levels of symbolic links: 'path'" would name the file twice.
        return f"cannot read file ({error.strerror or errno.errorcode.get(error.errno, error.errno)})"
    text = first_line(error)
    if isinstance(error, OSError) and "truncated" in text:
        return f"truncated image ({text})"
    return text


class _Refused(Exception):
    """A reason to refuse an image, turned into an ImageDecodeError naming the file."""


def _decode_open_file(handle: BinaryIO, policy: DecodePolicy) -> Image.Image:
    if os.fstat(handle.fileno()).st_size == 0:
        raise _Refused("empty file (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(handle)
        except Image.UnidentifiedImageError:
            raise _Refused("not an image PIL can identify") from None
        stored_size = image.size
        if image.format == "JPEG" and policy.draft_min_side and image.mode in ("RGB", "L", "CMYK"):
            _draft(image, policy.draft_min_side)
        refusal = size_refusal(image, policy, stored_size)
        if refusal:
            raise _Refused(refusal)
        image.load()  # before the JPEG check: PIL's own reasons (truncated, ...) come first
        if image.format == "JPEG" and policy.refuse_damaged_jpeg:
            handle.seek(0)
            damage = jpeg_damage(handle.read())
            if damage:
                raise _Refused(f"damaged JPEG data ({damage})")
    if policy.exif_transpose:
        image = ImageOps.exif_transpose(image)
    return to_rgb(image, policy.alpha_background)


def _draft(image: Image.Image, min_side: int) -> None:
    width, height = image.size
    scale = min(width, height) / min_side
    if scale >= 2:
        # draft keeps both sides >= the request: ask for the aspect-preserving size of min_side.
        image.draft(image.mode, (int(width / scale), int(height / scale)))


def to_rgb(image: Image.Image, background: int = 255) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. 16-bit data are scaled (PIL's convert clamps them to white)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit range -> 8-bit range ("I" holds 16-bit PNG values too), in place on int32: a
        # float64 copy would take 8 bytes per pixel, several of them at once.
        pixels = np.array(image, dtype=np.int32)
        np.clip(pixels, 0, 65535, out=pixels)
        pixels += 128
        pixels //= 257  # == rint(value / 257): value / 257 is never halfway between integers
        return Image.fromarray(pixels.astype(np.uint8), "L").convert("RGB")
    if image.mode == "F":
        pixels = np.array(image, dtype=np.float64)
        if pixels.max(initial=0) <= 1.0:
            pixels *= 255.0
        np.rint(pixels, out=pixels)
        np.clip(pixels, 0, 255, out=pixels)
        return Image.fromarray(pixels.astype(np.uint8), "L").convert("RGB")
    if (image.mode == "P" and "transparency" in image.info) or image.mode in ("PA", "LA", "La", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        flat = Image.new("RGB", image.size, (background,) * 3)
        flat.paste(image, mask=image.getchannel("A"))
        return flat
    return image.convert("RGB")
