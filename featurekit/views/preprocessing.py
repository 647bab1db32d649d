"""Stage 2: per-backbone views of a decoded image.

A :class:`Preprocessing` is read off the weights (torchvision's ``weights.transforms()``, timm's data
config, open_clip's ``preprocess_cfg``, a Hugging Face image processor: featurekit.backbones reads
each), never written by hand. It is split in two so that the expensive, per-image part runs in
loader workers on uint8 pixels and the cheap, per-batch part runs on the device:

- :meth:`Preprocessing.view`: resize + crop of a PIL image -> ``uint8[3, H, W]``
- :meth:`Preprocessing.normalize`: ``uint8[B, 3, H, W]`` -> ``float32[B, 3, H, W]`` (rescale, mean/std)

Composed, they equal the library's own pipeline exactly (tests/test_views.py for torchvision,
tests/test_sources.py for timm, open_clip and transformers). Backbones whose preprocessing is
equal share one view, so an image is resized once per distinct preprocessing.

The fields beyond torchvision's (``resize_mode`` ... ``view_dtype``) say how the other libraries
differ from it; :meth:`to_dict` records them only where they differ from torchvision's, so a
torchvision or EfficientNet-Lite store keeps the identity and fingerprint it had before they existed.

``resize_mode`` (how the resized size follows from the image's ``h, w`` and ``resize_size``):

- ``shorter``: torchvision ``Resize(int)``, HF ``shortest_edge``: the shorter side to ``resize_size``,
  the longer ``int(resize_size * long / short)`` (truncated);
- ``shorter_round`` / ``longer_round``: timm's and open_clip's ``ResizeKeepRatio`` (``longest`` 0 / 1):
  ``ratio = min`` / ``max`` of ``h / rh, w / rw``, size ``round(h / ratio), round(w / ratio)``;
- ``squash``: exactly ``resize_size`` (aspect ratio not kept: SigLIP, HF ``height/width``);
- ``none``: no resize.

``crop_mode``: ``center`` (torchvision, timm, open_clip: pad where the box exceeds the image, ``fill``,
then offset ``int(round((H - h) / 2))``), ``center_floor`` (HF: offset ``(H - h) // 2``) or ``none``
(the resize gives the input size). ``resampler``: ``pil`` (``PIL.Image.resize``) or ``torch``
(torchvision v2 ``resize`` on the uint8 tensor, what HF's default image processors run).
``normalization``: ``rescale_first`` (``(x * rescale - mean) / std``) or ``fused`` (HF:
``(x - mean / rescale) / (std / rescale)``); ``view_dtype``: ``uint8``, or ``float32`` for the one
pipeline that rescales before it resizes (HF DINOv3: no uint8 view reproduces it; 4x the bytes).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F
from torchvision.transforms.v2 import functional as F2

__all__ = ["Preprocessing", "pair"]

RESIZE_MODES = ("shorter", "shorter_round", "longer_round", "squash", "none")
CROP_MODES = ("center", "center_floor", "none")
RESAMPLERS = ("pil", "torch")
NORMALIZATIONS = ("rescale_first", "fused")
VIEW_DTYPES = ("uint8", "float32")

Size = int | tuple[int, int]


def pair(size: Size) -> tuple[int, int]:
    """``(h, w)`` of a size given as one number (square) or a pair."""
    return (int(size), int(size)) if isinstance(size, (int, float)) else (int(size[0]), int(size[1]))


def _compact(size: Size) -> Size:
    """A square size as one number (as torchvision's presets give it), otherwise ``(h, w)``."""
    h, w = pair(size)
    return h if h == w else (h, w)


@dataclass(frozen=True)
class Preprocessing:
    """Resize (``resize_mode``) to ``resize_size``, crop ``crop_size`` (``crop_mode``), normalise.
    Sizes are one number (square) or ``(h, w)``; :attr:`size` is the view's ``(H, W)``."""

    resize_size: Size
    crop_size: Size
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"
    antialias: bool = True
    resize_mode: str = "shorter"
    crop_mode: str = "center"
    fill: tuple[int, int, int] = (0, 0, 0)  # the colour a crop pads with, where its box exceeds the image
    resampler: str = "pil"
    rescale: float = 1 / 255
    normalization: str = "rescale_first"
    view_dtype: str = "uint8"

    def __post_init__(self) -> None:
        for name in ("resize_size", "crop_size"):
            object.__setattr__(self, name, _compact(getattr(self, name)))
        object.__setattr__(self, "fill", tuple(int(v) for v in self.fill))
        for name, allowed in (("resize_mode", RESIZE_MODES), ("crop_mode", CROP_MODES), ("resampler", RESAMPLERS),
                              ("normalization", NORMALIZATIONS), ("view_dtype", VIEW_DTYPES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        InterpolationMode(self.interpolation)  # an unknown one raises
        if self.resize_mode == "shorter" and not isinstance(self.resize_size, int):
            raise ValueError(f"resize_mode 'shorter' takes one size, not {self.resize_size}")
        if self.crop_mode == "none" and (self.resize_mode != "squash" or self.resize_size != self.crop_size):
            raise ValueError("crop_mode 'none' needs a squash resize to the crop size")
        if self.view_dtype == "float32" and (self.resampler != "torch" or self.normalization != "rescale_first"):
            raise ValueError("float32 views are rescaled, then resized as tensors (resampler 'torch')")

    @classmethod
    def from_transforms(cls, transforms) -> "Preprocessing":
        """Read torchvision's ``ImageClassification`` preset (what ``weights.transforms()`` returns)."""
        needed = ("resize_size", "crop_size", "mean", "std", "interpolation")
        missing = [name for name in needed if not hasattr(transforms, name)]
        if missing:
            raise TypeError(f"{type(transforms).__name__} is not an ImageClassification preset "
                            f"(no {', '.join(missing)})")
        return cls(
            resize_size=int(transforms.resize_size[0]),
            crop_size=int(transforms.crop_size[0]),
            mean=tuple(float(m) for m in transforms.mean),
            std=tuple(float(s) for s in transforms.std),
            interpolation=InterpolationMode(transforms.interpolation).value,
            antialias=bool(transforms.antialias if transforms.antialias is not None else True),
        )

    @classmethod
    def from_dict(cls, values: dict) -> "Preprocessing":
        """The inverse of :meth:`to_dict` (lists from JSON become tuples)."""
        return cls(**{f.name: tuple(values[f.name]) if isinstance(values[f.name], list) else values[f.name]
                      for f in fields(cls) if f.name in values})

    @property
    def key(self) -> str:
        """Stable identity: equal keys mean an identical view."""
        return json.dumps(self.to_dict(), sort_keys=True)

    def to_dict(self) -> dict:
        """Every field of torchvision's presets, and the others where they are not torchvision's."""
        defaults = {f.name: f.default for f in fields(self)[_TORCHVISION_FIELDS:]}
        return {name: value for name, value in asdict(self).items()
                if name not in defaults or value != defaults[name]}

    @property
    def size(self) -> tuple[int, int]:
        """``(H, W)`` of the view, the model's input."""
        return pair(self.crop_size)

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """``(h, w)`` of an image of ``height x width`` after the resize, computed as the library does."""
        rh, rw = pair(self.resize_size)
        if self.resize_mode == "shorter":
            short, long = (width, height) if width <= height else (height, width)
            new_long = int(rh * long / short)
            return (new_long, rh) if width <= height else (rh, new_long)
        if self.resize_mode in ("shorter_round", "longer_round"):
            ratios = (height / rh, width / rw)
            ratio = max(ratios) if self.resize_mode == "longer_round" else min(ratios)
            return round(height / ratio), round(width / ratio)
        return (rh, rw) if self.resize_mode == "squash" else (height, width)

    # ------------------------------------------------------------------ worker side

    def view(self, image: Image.Image) -> torch.Tensor:
        """RGB PIL image -> ``uint8[3, H, W]`` (``float32`` for :attr:`view_dtype` float32)."""
        if self.resampler == "torch":
            return self._tensor_view(F.pil_to_tensor(image))
        return F.pil_to_tensor(self.view_image(image))

    def view_image(self, image: Image.Image) -> Image.Image:
        """The view as a PIL image (``H x W``), for PIL transforms that follow it (uint8 views only)."""
        if self.resampler == "torch":
            return F.to_pil_image(self._uint8(self.view(image)))
        return self._crop(self.resize(image))

    def resize(self, image: Image.Image) -> Image.Image:
        """The resize step alone, on a PIL image (uint8 views only)."""
        if self.resampler == "torch":
            return F.to_pil_image(self._uint8(self._resize_tensor(F.pil_to_tensor(image), F2.resize)))
        if self.resize_mode == "none":
            return image
        interpolation = InterpolationMode(self.interpolation)
        size = [self.resize_size] if self.resize_mode == "shorter" else list(self.resized_size(image.height,
                                                                                                image.width))
        return F.resize(image, size, interpolation=interpolation, antialias=self.antialias)

    def view_tensor(self, image: torch.Tensor) -> torch.Tensor:
        """``uint8[3, h, w]`` (any device) -> the view; the GPU-decode path's view.

        With the ``pil`` resampler, tensor resizing differs from PIL's by rounding (about one grey
        level), not by geometry; the ``torch`` resampler is the library's own kernel on the CPU."""
        return self._tensor_view(image)

    def _tensor_view(self, image: torch.Tensor) -> torch.Tensor:
        if self.view_dtype == "float32":  # HF DINOv3: rescale, then resize the float image
            image = image * self.rescale
        resize = F2.resize if self.resampler == "torch" else F.resize
        return self._crop(self._resize_tensor(image, resize)).contiguous()

    def _resize_tensor(self, image: torch.Tensor, resize) -> torch.Tensor:
        if self.resize_mode == "none":
            return image
        size = [self.resize_size] if self.resize_mode == "shorter" else list(self.resized_size(*image.shape[-2:]))
        return resize(image, size, interpolation=InterpolationMode(self.interpolation), antialias=self.antialias)

    def _crop(self, image):
        """Centre crop of a PIL image or tensor, padding with ``fill`` where the box exceeds it
        (torchvision's ``center_crop``: left and top get ``pad // 2``)."""
        if self.crop_mode == "none":
            return image
        out_h, out_w = self.size
        _, h, w = F.get_dimensions(image)
        if out_h > h or out_w > w:
            left, top = max(out_w - w, 0) // 2, max(out_h - h, 0) // 2
            right, bottom = (max(out_w - w, 0) + 1) // 2, (max(out_h - h, 0) + 1) // 2
            if isinstance(image, Image.Image):
                image = F.pad(image, [left, top, right, bottom], fill=self.fill)
            else:  # a colour per channel (a tensor pad takes one number)
                padded = torch.tensor(self.fill, dtype=image.dtype, device=image.device).view(3, 1, 1)
                padded = padded.expand(3, h + top + bottom, w + left + right).clone()
                padded[:, top:top + h, left:left + w] = image
                image = padded
            _, h, w = F.get_dimensions(image)
        if self.crop_mode == "center":
            top, left = int(round((h - out_h) / 2.0)), int(round((w - out_w) / 2.0))
        else:
            top, left = (h - out_h) // 2, (w - out_w) // 2
        return F.crop(image, top, left, out_h, out_w)

    def _uint8(self, view: torch.Tensor) -> torch.Tensor:
        if view.dtype != torch.uint8:
            raise ValueError("a float32 view (rescaled before resizing) has no PIL form")
        return view

    # ------------------------------------------------------------------ device side

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """``uint8[B, 3, H, W]`` (float32 views: rescaled already) -> ``float32[B, 3, H, W]`` on the
        batch's device, with the library's own arithmetic."""
        mean = torch.tensor(self.mean, device=batch.device, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=batch.device, dtype=torch.float32).view(1, 3, 1, 1)
        pixels = batch.to(torch.float32)
        if self.view_dtype == "float32":
            return (pixels - mean) / std
        if self.normalization == "fused":  # HF's rescale_and_normalize: one pass on 0-255 values
            return (pixels - mean * (1.0 / self.rescale)) / (std * (1.0 / self.rescale))
        scaled = pixels / 255.0 if self.rescale == 1 / 255 else pixels * self.rescale  # ToTensor's arithmetic
        return (scaled - mean) / std


# to_dict records every field up to this one, and the later ones only where they differ from their defaults
_TORCHVISION_FIELDS = 6
