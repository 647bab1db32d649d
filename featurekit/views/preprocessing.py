"""Stage 2: per-backbone views of a decoded image.

A :class:`Preprocessing` is read off the weights (torchvision's ``weights.transforms()``), never
written by hand. It is split in two so that the expensive, per-image part runs in loader
workers on uint8 pixels and the cheap, per-batch part runs on the device:

- :meth:`Preprocessing.view`: resize + centre crop of a PIL image -> ``uint8[3, crop, crop]``
- :meth:`Preprocessing.normalize`: ``uint8[B, 3, H, W]`` -> ``float32[B, 3, H, W]`` (/255, mean/std)

Composed, they equal ``weights.transforms()(image)`` exactly (tested). Backbones whose
preprocessing is equal share one view, so an image is resized once per distinct preprocessing.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F


@dataclass(frozen=True)
class Preprocessing:
    """Resize the shorter side to ``resize_size``, centre-crop ``crop_size``, normalise."""

    resize_size: int
    crop_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"
    antialias: bool = True

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

    @property
    def key(self) -> str:
        """Stable identity: equal keys mean an identical view."""
        return json.dumps(self.to_dict(), sort_keys=True)

    def to_dict(self) -> dict:
        return asdict(self)

    def view(self, image: Image.Image) -> torch.Tensor:
        """RGB PIL image -> ``uint8[3, crop_size, crop_size]``."""
        return F.pil_to_tensor(self.view_image(image))

    def view_image(self, image: Image.Image) -> Image.Image:
        """The view as a PIL image (``crop_size`` square), for PIL transforms that follow it."""
        return F.center_crop(self.resize(image), [self.crop_size])

    def resize(self, image: Image.Image) -> Image.Image:
        """Shorter side to ``resize_size``, with this preprocessing's interpolation (PIL image)."""
        interpolation = InterpolationMode(self.interpolation)
        return F.resize(image, [self.resize_size], interpolation=interpolation, antialias=self.antialias)

    def view_tensor(self, image: torch.Tensor) -> torch.Tensor:
        """``uint8[3, H, W]`` (any device) -> ``uint8[3, crop, crop]``; the GPU-decode path's view.

        Tensor resizing differs from PIL's by rounding (about one grey level), not by geometry.
        """
        image = F.resize(image, [self.resize_size], interpolation=InterpolationMode(self.interpolation),
                         antialias=self.antialias)
        return F.center_crop(image, [self.crop_size])

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """``uint8[B, 3, H, W]`` -> ``float32[B, 3, H, W]`` on the batch's device."""
        mean = torch.tensor(self.mean, device=batch.device, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=batch.device, dtype=torch.float32).view(1, 3, 1, 1)
        return (batch.to(torch.float32) / 255.0 - mean) / std

