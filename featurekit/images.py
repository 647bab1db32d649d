"""Stage 1: list an image folder and decode its images, once.

An image-folder data set is ``root/<split>/<class>/<image>``. Listing is deterministic: class
folders in string order (``ImageFolder`` order: "1", "10", "100", "2", ...; class *names* are
stored, so nobody has to rely on indices), images in string order of their relative POSIX path.

Decoding turns any file PIL understands into an 8-bit RGB ``PIL.Image`` under a recorded
:class:`DecodePolicy`. Every failure is a :class:`ImageDecodeError` whose message is one line
naming the file and the reason.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .errors import FeaturekitError, SettingsError, first_line

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)


class DataError(FeaturekitError, ValueError):
    """The data set folder itself is unusable (missing split, no classes, no images)."""


class ImageDecodeError(FeaturekitError):
    """One image could not be turned into RGB pixels. ``str()`` is ``"<path>: <reason>"``."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class ImageRecord:
    """One listed image. ``path`` is relative to the split folder, POSIX separators."""

    path: str
    label: int
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class SplitListing:
    """The sorted content of ``root/split``: class names and one record per image file."""

    root: Path
    split: str
    classes: tuple[str, ...]
    records: tuple[ImageRecord, ...]
    ignored: tuple[str, ...] = ()  # files without an image extension, reported, never silently lost
    empty_classes: tuple[str, ...] = ()

    @property
    def split_dir(self) -> Path:
        return self.root / self.split

    def __len__(self) -> int:
        return len(self.records)

    def absolute(self, index: int) -> Path:
        return self.split_dir / fs_path(self.records[index].path)

    def sha256(self) -> str:
        """sha256 of the class names and every file's path, label, size and mtime, in order: equal
        digests mean the same files (a store records it to tell two folders of equal names apart)."""
        digest = hashlib.sha256(json.dumps(self.classes).encode())
        for record in self.records:
            digest.update(f"{printable_path(record.path)}\0{record.label}\0{record.size}\0{record.mtime_ns}\n".encode())
        return digest.hexdigest()


def fs_path(relative: str) -> str:
    """Relative listing path -> OS path (undoes the surrogate escapes of non-UTF-8 names)."""
    return os.fsdecode(os.fsencode(relative))


def printable_path(relative: str) -> str:
    """A path that can be printed and stored as UTF-8, undecodable bytes shown as ``\\xNN``."""
    return os.fsencode(relative).decode("utf-8", errors="backslashreplace")


def list_split(root: str | os.PathLike, split: str) -> SplitListing:
    """List ``root/split/<class>/*`` deterministically.

    Raises :class:`DataError` when the split folder is missing, has no class folders, or holds
    no image at all. Empty class folders are kept as classes and reported in ``empty_classes``.
    """
    root = Path(root)
    split_dir = root / split
    if not split_dir.is_dir():
        raise DataError(f"{split_dir}: split folder not found (expected {root}/{split}/<class>/<image>)")
    classes = sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise DataError(f"{split_dir}: no class folders (expected {split}/<class>/<image>)")
    records: list[ImageRecord] = []
    ignored: list[str] = []
    empty: list[str] = []
    for label, class_name in enumerate(classes):
        found = _list_class(split_dir, class_name, label, ignored)
        if not found:
            empty.append(class_name)
        records.extend(found)
    if not records:
        raise DataError(f"{split_dir}: no images in any of its {len(classes)} class folders")
    return SplitListing(root, split, tuple(classes), tuple(records), tuple(sorted(ignored)), tuple(empty))


def listing_changes(recorded: dict[str, tuple[int, int]], recorded_classes: list[str],
                    listing: SplitListing) -> list[str]:
    """How ``listing`` differs from an earlier one, given as printable path -> (size, mtime_ns) and
    class names: added, removed and modified files, changed class folders. Empty if it does not."""
    current = {printable_path(record.path): (record.size, record.mtime_ns) for record in listing.records}
    changes = [
        _named("added since extraction", sorted(current.keys() - recorded.keys())),
        _named("removed since extraction", sorted(recorded.keys() - current.keys())),
        _named("modified since extraction (size or mtime)",
               sorted(p for p in recorded.keys() & current.keys() if recorded[p] != current[p])),
    ]
    if recorded_classes != list(listing.classes):
        changes.append(f"class folders changed ({', '.join(recorded_classes)} -> {', '.join(listing.classes)})")
    return [change for change in changes if change]


def _named(kind: str, paths: list[str], shown: int = 10) -> str:
    if not paths:
        return ""
    more = f" and {len(paths) - shown} more" if len(paths) > shown else ""
    return f"{len(paths)} {'image' if len(paths) == 1 else 'images'} {kind}: {', '.join(paths[:shown])}{more}"


def _list_class(split_dir: Path, class_name: str, label: int, ignored: list[str]) -> list[ImageRecord]:
    records = []
    for dirpath, dirnames, filenames in os.walk(split_dir / class_name, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith("."):
                continue
            full = os.path.join(dirpath, name)
            relative = Path(os.path.relpath(full, split_dir)).as_posix()
            if os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                ignored.append(printable_path(relative))
                continue
            try:
                stat = os.stat(full)
            except OSError:  # vanished or unreadable: still listed, decoding reports it
                stat = None
            records.append(
                ImageRecord(relative, label, stat.st_size if stat else -1, stat.st_mtime_ns if stat else -1)
            )
    return sorted(records, key=lambda record: os.fsencode(record.path))


@dataclass(frozen=True)
class DecodePolicy:
    """How files become RGB pixels; recorded in every store because it changes the features.

    - ``exif_transpose``: apply the EXIF orientation (phone photos are stored sideways).
    - ``alpha_background``: transparent pixels are composited onto this grey level (0-255).
    - ``draft_min_side``: JPEGs are decoded at a reduced DCT scale while their shorter side stays
      at least this many pixels (much faster for large photos; ``None`` decodes at full size).
      A constant, not a function of the backbones, so a store's features never depend on which
      other backbones shared the run.
    - ``max_pixels``: images above this count are refused as decompression bombs.
    - ``backend``: ``pil``, or ``torchvision`` (JPEGs decoded in batches by ``decode_jpeg`` on the
      extraction device, nvJPEG on CUDA, at full size; the rest by PIL). They round differently,
      so the backend is part of a store's identity. ``auto`` (torchvision on CUDA, PIL elsewhere)
      is resolved against the device before a run (``RunSettings.resolved``) and never stored.
    """

    exif_transpose: bool = True
    alpha_background: int = 255
    draft_min_side: int | None = 768
    max_pixels: int = 2 * 89_478_485  # PIL's own DecompressionBombError threshold
    backend: str = "auto"

    BACKENDS = ("auto", "pil", "torchvision")

    def __post_init__(self) -> None:
        if self.backend not in self.BACKENDS:
            raise SettingsError(f"unknown decoder {self.backend!r} (choose from {', '.join(self.BACKENDS)})")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "DecodePolicy":
        """The policy a store or head recorded (:meth:`to_dict`)."""
        return cls(**values)


def decode_image(path: str | os.PathLike, policy: DecodePolicy | None = None,
                 display: str | None = None) -> Image.Image:
    """Decode one file into an 8-bit RGB image. Raises :class:`ImageDecodeError`.

    ``display`` is the name used in error messages (defaults to ``path``).
    """
    display = display or str(path)
    try:
        with open(path, "rb") as handle:
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


def _decode_open_file(handle, policy: DecodePolicy) -> Image.Image:
    if os.fstat(handle.fileno()).st_size == 0:
        raise _Refused("empty file (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(handle)
        except Image.UnidentifiedImageError:
            raise _Refused("not an image PIL can identify") from None
        width, height = image.size
        if width * height > policy.max_pixels:
            raise _Refused(f"decompression bomb refused ({width}x{height} > {policy.max_pixels} pixels)")
        if image.format == "JPEG" and policy.draft_min_side and image.mode in ("RGB", "L", "CMYK"):
            _draft(image, policy.draft_min_side)
        image.load()
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
        pixels = np.asarray(image, dtype=np.float64)
        # 16-bit range -> 8-bit range; "I" holds the 16-bit PNG values too.
        pixels = np.clip(np.rint(pixels / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(pixels, "L").convert("RGB")
    if image.mode == "F":
        pixels = np.asarray(image, dtype=np.float64)
        scale = 255.0 if pixels.max(initial=0) <= 1.0 else 1.0
        return Image.fromarray(np.clip(np.rint(pixels * scale), 0, 255).astype(np.uint8), "L").convert("RGB")
    if (image.mode == "P" and "transparency" in image.info) or image.mode in ("PA", "LA", "La", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        flat = Image.new("RGB", image.size, (background,) * 3)
        flat.paste(image, mask=image.getchannel("A"))
        return flat
    return image.convert("RGB")
