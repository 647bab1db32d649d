"""Stage 1: decode any image file into 8-bit RGB pixels, once, under a recorded policy.

Decoding turns any file PIL understands into an 8-bit RGB ``PIL.Image`` under a recorded
:class:`DecodePolicy`. Every limit is checked on the size that will be decoded, before decoding.
Every failure is a :class:`~featurekit.errors.ImageDecodeError` whose message is one line naming
the file and the reason. What is not a regular file is refused without being opened (a FIFO would
block forever). A source is a file path, the bytes of an image, or an object that reads them
(:class:`ImageBytes`: a tar member of a WebDataset shard); all of them decode alike.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import warnings
from dataclasses import asdict, dataclass
from typing import BinaryIO, ClassVar, Protocol, Union

import numpy as np
import simplejpeg
from PIL import Image, ImageOps

from ..errors import ImageDecodeError, SettingsError, first_line, os_reason
from ..options import setting
from .names import printable_path

__all__ = ["DecodePolicy", "ImageBytes", "ImageSource", "Unavailable", "content_sha256", "decode_bytes", "decode_image",
           "jpeg_damage", "open_image", "read_image_bytes", "size_refusal", "to_rgb"]

# --------------------------------------------------------------------------- decoding


DECODERS = ("auto", "pil", "torchvision")  # auto: torchvision (nvJPEG) on CUDA, PIL elsewhere


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

    exif_transpose: bool = setting(True, "ignore EXIF orientation", flag="--no-exif-transpose", negate=True)
    alpha_background: int = 255
    draft_min_side: int | None = 768
    backend: str = setting("auto", "JPEG decoding: auto (batched nvJPEG on CUDA, PIL workers on CPU), pil, "
                           "torchvision", flag="--decoder", choices=DECODERS)
    max_pixels: int = 89_478_485
    max_aspect_ratio: float = 100.0
    refuse_damaged_jpeg: bool = setting(True, "do not re-read JPEG data to refuse damaged files (faster; a damaged "
                                        "JPEG then decodes into wrong rows without a word)", flag="--no-jpeg-check",
                                        negate=True)

    REFUSALS: ClassVar[tuple[str, ...]] = ("max_pixels", "max_aspect_ratio", "refuse_damaged_jpeg")

    def __post_init__(self) -> None:
        if self.backend not in DECODERS:
            raise SettingsError(f"unknown decoder {self.backend!r} (choose from {', '.join(DECODERS)})")

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


class ImageBytes(Protocol):
    """An image that is not a file of its own (a tar member): ``read_bytes()`` gives its bytes, or
    raises OSError."""

    def read_bytes(self) -> bytes: ...


@dataclass(frozen=True)
class Unavailable:
    """A listed image known to be unreadable before decoding (a list naming a missing file, a shard
    sample without an image): decoding it fails with ``reason``, so ``--on-error`` decides."""

    reason: str

    def read_bytes(self) -> bytes:
        raise _Refused(self.reason)


ImageSource = Union[str, os.PathLike, bytes, ImageBytes]  # what decode_image and the loader read


def open_image(source: ImageSource) -> BinaryIO:
    """A binary handle on ``source``'s bytes: a regular file opened (:func:`open_regular_file`), bytes
    as they are, an :class:`ImageBytes` read."""
    if isinstance(source, (str, os.PathLike)):
        return open_regular_file(source)
    return io.BytesIO(source if isinstance(source, (bytes, bytearray)) else source.read_bytes())


def decode_image(source: ImageSource, policy: DecodePolicy | None = None, display: str | None = None) -> Image.Image:
    """Decode one file (or image bytes, or a tar member) into an 8-bit RGB image. Raises
    :class:`ImageDecodeError`.

    ``display`` is the name used in error messages (defaults to ``source`` in printable form).
    """
    display = display or printable_path(str(source))
    return decode_bytes(read_image_bytes(source, display), policy, display)


def read_image_bytes(source: ImageSource, display: str | None = None) -> bytes:
    """Every byte of ``source``, read once: decoding, the JPEG check and the file's sha256 all use
    these (PIL would read the whole file anyway). Raises :class:`ImageDecodeError` with the reason."""
    display = display or printable_path(str(source))
    try:
        with open_image(source) as handle:
            return handle.read()
    except _Refused as refusal:
        raise ImageDecodeError(display, str(refusal)) from None
    except FileNotFoundError:
        linked = isinstance(source, (str, os.PathLike)) and os.path.islink(source)
        reason = "broken symbolic link" if linked else "file disappeared after listing"
        raise ImageDecodeError(display, reason) from None
    except PermissionError:
        raise ImageDecodeError(display, "permission denied") from None
    except Exception as error:  # a reader's own errors (a shard on a remote file system) are the file's reason
        raise ImageDecodeError(display, _reason(error)) from None


def content_sha256(data: bytes) -> str:
    """The sha256 (hex) of a file's bytes, as stores record it (``file_sha256``)."""
    return hashlib.sha256(data).hexdigest()


def decode_bytes(data: bytes, policy: DecodePolicy | None = None, display: str = "image") -> Image.Image:
    """Decode the bytes of one image (:func:`read_image_bytes`) into 8-bit RGB; raises :class:`ImageDecodeError`."""
    try:
        return _decode_open_file(io.BytesIO(data), policy or DecodePolicy())
    except _Refused as refusal:
        raise ImageDecodeError(display, str(refusal)) from None
    except Image.DecompressionBombError as error:
        raise ImageDecodeError(display, f"decompression bomb refused ({error})") from None
    except Exception as error:  # PIL raises many types for bad data; the reason is what matters
        raise ImageDecodeError(display, _reason(error)) from None


def _reason(error: Exception) -> str:
    if isinstance(error, OSError) and error.errno is not None:
        # "[Errno 40] Too many levels of symbolic links: 'path'" would name the file twice.
        return f"cannot read file ({os_reason(error)})"
    text = first_line(error)
    if isinstance(error, OSError) and "truncated" in text:
        return f"truncated image ({text})"
    return text


class _Refused(Exception):
    """A reason to refuse an image, turned into an ImageDecodeError naming the file."""


def _decode_open_file(handle: io.BytesIO, policy: DecodePolicy) -> Image.Image:
    if handle.seek(0, os.SEEK_END) == 0:
        raise _Refused("empty file (0 bytes)")
    handle.seek(0)
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
            damage = jpeg_damage(handle.getvalue())
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
