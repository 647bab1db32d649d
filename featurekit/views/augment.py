"""Augmented and test-time views of a decoded image, reproducible to the bit.

A view here has the plain view's form (:meth:`Preprocessing.view`): ``uint8[3, H, W]`` made on
CPU workers from a decoded RGB PIL image, with the weights' own :meth:`Preprocessing.normalize`
still run afterwards, on the device, unchanged. Only the pixels chosen differ.

**Policies** (:data:`AUGMENT_POLICIES`; one :class:`AugmentPolicy` each, JSON-able by ``to_dict``):

- ``none``: the plain view, exactly.
- ``crop-flip``: a random resized crop (25-100% of the image's area, aspect 3/4-4/3) to the crop
  size, mirrored half the time.
- ``standard`` (the default, after seed 002's flowers recipe): ``crop-flip``, then a rotation of up
  to 15 degrees, then seed 002's colour jitter (brightness 0.2, contrast 0.1, saturation 0.1, hue
  0.1). Seed 002 rotated by up to 45 degrees and centre-cropped; a random resized crop and a small
  rotation keep more of the object. Its vertical flip and 2.5% greyscale are left out: photos of
  ants, bees or objects are not seen upside down, and greyscale is rare in them.

The transforms are torchvision.transforms.v2's, applied to the PIL image with the preprocessing's
interpolation, and end in ``PILToTensor``. PIL's integer kernels give the same pixels at any thread
count; on tensors, ``adjust_contrast`` takes a float mean whose last bits change with
``torch.get_num_threads()`` (seen in 10 of 30 trials here), which could move a uint8 rounding.

**Seeding.** View ``v`` of image ``i`` under seed ``s`` is drawn from a generator seeded by
:func:`view_seed` ``(s, i, v)``, a BLAKE2b hash (Python's ``hash()`` changes per process). v2
transforms draw from torch's global CPU generator, so each view runs inside
``torch.random.fork_rng``, which seeds it for that view and restores the caller's state after:
the caller's own random stream is untouched. The guarantee: a view depends only on (policy,
preprocessing, decoded image, s, i, v) and the torch, torchvision and Pillow versions, never on the
process, the order of calls, batching, chunking or the number of DataLoader workers (tested).
The parameters drawn depend on the decoded image's size only, so two backbones of one run see
the same crop, mirror, angle and jitter in view ``v``. A lock keeps threads of this module from
interleaving; make views in loader worker processes or one thread per process, since another
thread drawing from torch's CPU generator meanwhile would draw from the view's stream.

**Cost.** :meth:`AugmentPolicy.views` cuts ``K`` views from one decoded image: one decode, then per
view one crop-and-resize and the photometric ops on a ``crop``-sized image.

**Test-time views** (:func:`tta_views`, :data:`TTA_VIEWS`): ``flip`` is the plain view and its
mirror; ``five-crop`` is torchvision's FiveCrop of the resized image (centre first, then the four
corners). The first test-time view is always the plain view, exactly.

**Plans** (:class:`ViewPlan`): what ``extract --augment K --tta MODE`` and ``predict --tta MODE``
cut from each decoded image, per preprocessing, in one loader worker: the plain view, ``K``
augmented views, the test-time views after the first. The trunks see them as batches of one
view index each, the plain batch exactly as an extraction without views runs it.
"""

from __future__ import annotations

import hashlib
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from types import MappingProxyType
from typing import TYPE_CHECKING, Iterator, Mapping

from ..errors import AugmentError
from ..options import setting

if TYPE_CHECKING:  # torch and torchvision are imported where views are cut: building settings needs neither
    import torch
    from PIL import Image
    from torchvision.transforms import v2

    from .preprocessing import Preprocessing

__all__ = ["AUGMENT_POLICIES", "AugmentPolicy", "CACHE_AUGMENT_POLICY", "DEFAULT_AUGMENT_POLICY", "TTA_VIEWS",
           "ViewPlan", "augment_policy", "tta_views", "view_seed", "views_refusal"]

# Test-time mode -> views it makes per image, the plain view first (tta_views makes them).
TTA_VIEWS: Mapping[str, int] = MappingProxyType({"none": 1, "flip": 2, "five-crop": 5})

_JITTER = ("brightness", "contrast", "saturation", "hue")  # v2.ColorJitter's arguments, in its order
_FACTORS = ("flip", "rotation", *_JITTER)


def _policy_problem(policy: AugmentPolicy) -> str | None:
    def is_number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    def is_range(pair, low: float, high: float) -> bool:
        return (isinstance(pair, tuple) and len(pair) == 2 and all(map(is_number, pair))
                and low < pair[0] <= pair[1] <= high)

    if not isinstance(policy.name, str) or not policy.name:
        return "a policy needs a name"
    not_numbers = [name for name in _FACTORS if not is_number(getattr(policy, name))]
    if not_numbers:
        return f"not a number: {', '.join(not_numbers)}"
    if policy.crop_scale is not None and not is_range(policy.crop_scale, 0, 1):
        return f"crop_scale must be (low, high) with 0 < low <= high <= 1, not {policy.crop_scale}"
    if not is_range(policy.crop_ratio, 0, float("inf")):
        return f"crop_ratio must be (low, high) with 0 < low <= high, not {policy.crop_ratio}"
    if not 0 <= policy.flip <= 1:
        return f"flip is a probability, not {policy.flip}"
    if not 0 <= policy.rotation <= 180:
        return f"rotation must be 0-180 degrees, not {policy.rotation}"
    negative = [f"{name} {getattr(policy, name)}" for name in _JITTER[:3] if getattr(policy, name) < 0]
    if negative:
        return f"jitter factors must be >= 0, not {', '.join(negative)}"
    if not 0 <= policy.hue <= 0.5:
        return f"hue must be 0-0.5, not {policy.hue}"
    return None


@dataclass(frozen=True)
class AugmentPolicy:
    """A named augmentation; its ``to_dict()`` is what a store records as its identity.

    ``crop_scale``: range of the image's area kept by the random resized crop (``None``: the plain
    view's resize and centre crop); ``crop_ratio``: its aspect range; ``flip``: probability of a
    horizontal mirror; ``rotation``: largest angle in degrees, either way; ``brightness``,
    ``contrast``, ``saturation``, ``hue``: ``v2.ColorJitter``'s factors (0 = off).
    """

    name: str
    crop_scale: tuple[float, float] | None = None
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: float = 0.0
    rotation: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0

    def __post_init__(self) -> None:
        problem = _policy_problem(self)
        if problem:
            raise AugmentError(f"augment policy {self.name!r}: {problem}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> "AugmentPolicy":
        """The inverse of :meth:`to_dict` (lists from JSON become tuples); every field is required."""
        expected = {field.name for field in fields(cls)}
        missing, unknown = sorted(expected - set(data)), sorted(set(data) - expected)
        if missing or unknown:
            problems = (("missing", missing), ("unknown", unknown))
            reasons = [f"{kind} {', '.join(keys)}" for kind, keys in problems if keys]
            raise AugmentError(f"augment policy {data.get('name', '?')!r}: {'; '.join(reasons)}")
        return cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in data.items()})

    @property
    def is_random(self) -> bool:
        return self.crop_scale is not None or any(getattr(self, name) for name in _FACTORS)

    def transforms(self, preprocessing: Preprocessing) -> v2.Compose:
        """The v2 pipeline: RGB PIL image -> ``uint8[3, H, W]``, drawing from torch's global
        generator (:meth:`view` seeds it per view)."""
        return _pipeline(self, preprocessing)

    def view(self, image: Image.Image, preprocessing: Preprocessing, seed: int, image_index: int,
             view_index: int) -> torch.Tensor:
        """View ``view_index`` of image ``image_index``: ``uint8[3, H, W]``, the same on every call."""
        if not self.is_random:
            return preprocessing.view(image)
        with _seeded_torch_rng(view_seed(seed, image_index, view_index)):
            return self.transforms(preprocessing)(image)

    def views(self, image: Image.Image, preprocessing: Preprocessing, seed: int, image_index: int,
              count: int) -> torch.Tensor:
        """Views ``0 .. count-1`` of one decoded image: ``uint8[count, 3, H, W]``."""
        import torch

        views = torch.empty((count, 3, *preprocessing.size), dtype=torch.uint8)
        for view_index in range(count):
            views[view_index] = self.view(image, preprocessing, seed, image_index, view_index)
        return views


AUGMENT_POLICIES: Mapping[str, AugmentPolicy] = MappingProxyType({policy.name: policy for policy in (
    AugmentPolicy("none"),
    AugmentPolicy("crop-flip", crop_scale=(0.25, 1.0), flip=0.5),
    AugmentPolicy("standard", crop_scale=(0.25, 1.0), flip=0.5, rotation=15.0,
                  brightness=0.2, contrast=0.1, saturation=0.1, hue=0.1),
)})
DEFAULT_AUGMENT_POLICY = "standard"  # finetune --augment: images augmented as they are trained on
# extract --augment: views cached once. crop-flip measured better than standard on both sets of
# docs/augment.md (hymenoptera MLP +1.2 points over plain where standard gave 0) at a third of the CPU time.
CACHE_AUGMENT_POLICY = "crop-flip"



def augment_policy(name: str) -> AugmentPolicy:
    """The registered policy called ``name``; :class:`AugmentError` listing the known ones otherwise."""
    try:
        return AUGMENT_POLICIES[name]
    except KeyError:
        raise AugmentError(f"unknown augment policy {name!r} (known: {', '.join(AUGMENT_POLICIES)})") from None


def view_seed(seed: int, image_index: int, view_index: int) -> int:
    """A stable 63-bit seed for view ``view_index`` of image ``image_index`` (same in every process)."""
    # the text is part of every seed: it keeps its old module name so that views stay what they were
    digest = hashlib.blake2b(f"featurekit.augment:{int(seed)}:{int(image_index)}:{int(view_index)}".encode(),
                             digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def tta_views(image: Image.Image, preprocessing: Preprocessing, mode: str) -> torch.Tensor:
    """Test-time views of one decoded image: ``uint8[TTA_VIEWS[mode], 3, H, W]``.

    The first is ``preprocessing.view(image)`` exactly; ``flip`` adds its mirror, ``five-crop`` the
    four corner crops of the resized image (top-left, top-right, bottom-left, bottom-right).
    """
    import torch
    from torchvision.transforms.v2 import functional as F

    if mode not in TTA_VIEWS:
        raise AugmentError(f"unknown test-time augmentation {mode!r} (known: {', '.join(TTA_VIEWS)})")
    if mode == "five-crop":
        top_left, top_right, bottom_left, bottom_right, centre = F.five_crop(
            F.pil_to_tensor(preprocessing.resize(image)), list(preprocessing.size))
        return torch.stack([centre, top_left, top_right, bottom_left, bottom_right])
    plain = preprocessing.view(image)
    return torch.stack([plain, F.horizontal_flip(plain)]) if mode == "flip" else plain.unsqueeze(0)


def views_refusal(preprocessing: Preprocessing, augmented: str = "", tta: str = "none") -> str | None:
    """Why ``augmented`` views (their description; "" for none) or ``tta`` test-time views cannot be
    cut for ``preprocessing`` (None where they can): they are PIL transforms of uint8 images, and
    five crops need a resized image that covers the crop."""
    from .preprocessing import pair

    wanted = " and ".join(part for part in (augmented, f"{tta} test-time views" if tta != "none" else "") if part)
    if wanted and preprocessing.view_dtype != "uint8":
        return (f"{wanted} are cut from uint8 images, and this preprocessing's views are {preprocessing.view_dtype} "
                "(its library rescales before it resizes)")
    resized, crop = preprocessing.resize_size, preprocessing.size
    covers = preprocessing.resize_mode in ("shorter", "shorter_round", "squash") and preprocessing.crop_mode != "none"
    if tta == "five-crop" and not (covers and all(r >= c for r, c in zip(pair(resized), crop))):
        return (f"five-crop test-time views need a resize that covers the {crop[0]}x{crop[1]} crop; this "
                f"preprocessing resizes {preprocessing.resize_mode} to {resized} (crop {preprocessing.crop_mode}): "
                "use flip")
    return None


@dataclass(frozen=True)
class ViewPlan:
    """The views a run cuts from each decoded image, per preprocessing: the plain view, then
    ``augment`` views of policy ``policy`` (view ``v`` of listing row ``i``: :meth:`AugmentPolicy.view`
    with ``(seed, i, v)``), then the test-time views of ``tta`` after the first (the plain view).
    Where a store keeps them: :mod:`featurekit.store.layout`; the default plan is the plain view alone."""

    augment: int = setting(0, "also store K augmented views of each image (features_aug [N, K, D]), cut from the "
                           "same decode; train-head uses them (docs/augment.md)", metavar="K")
    policy: str = setting(CACHE_AUGMENT_POLICY, f"augmentation of --augment: {', '.join(AUGMENT_POLICIES)} "
                          "(docs/augment.md)", flag="--augment-policy", metavar="NAME")
    seed: int = setting(0, "seed of the augmented views (view v of image i depends on S, i, v only)",
                        flag="--augment-seed", metavar="S")
    tta: str = setting("none", "also store test-time views (features_tta), for train-head --tta on this split",
                       choices=tuple(TTA_VIEWS))

    def __post_init__(self) -> None:
        if isinstance(self.augment, bool) or not isinstance(self.augment, int) or self.augment < 0:
            raise AugmentError(f"--augment takes a number of views per image, 0 or more (got {self.augment!r})")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise AugmentError(f"--augment-seed takes an integer (got {self.seed!r})")
        if self.augment and not augment_policy(self.policy).is_random:
            raise AugmentError(f"augment policy {self.policy!r} makes every view the plain one; "
                               f"choose one of {', '.join(n for n, p in AUGMENT_POLICIES.items() if p.is_random)}")
        if self.tta not in TTA_VIEWS:
            raise AugmentError(f"unknown test-time augmentation {self.tta!r} (known: {', '.join(TTA_VIEWS)})")

    @property
    def extra(self) -> tuple[int, int]:
        """Views per image besides the plain one, in the order of :meth:`views`: (augmented, test-time)."""
        return self.augment, TTA_VIEWS[self.tta] - 1

    @property
    def count(self) -> int:
        """Views per image, the plain one included."""
        return 1 + sum(self.extra)

    def identity(self) -> dict:
        """The view fields of the identity of a store made under this plan (:class:`store.StoreIdentity`)."""
        augmented = {"augment_views": self.augment, "augment_policy": augment_policy(self.policy).to_dict(),
                     "augment_seed": self.seed} if self.augment else {}
        return {**augmented, "tta": self.tta}

    def describe(self) -> str:
        parts = [f"{self.augment} augmented views ({self.policy}, seed {self.seed})"] if self.augment else []
        parts += [f"{self.tta} test-time views"] if self.tta != "none" else []
        return " and ".join(parts) or "plain views"

    def views(self, image: Image.Image, preprocessing: Preprocessing, index: int) -> torch.Tensor:
        """The views of listing row ``index``: ``uint8[count, 3, H, W]``, the plain view first."""
        import torch

        test_time = tta_views(image, preprocessing, self.tta)  # its first view is the plain one
        if not self.augment:
            return test_time
        augmented = augment_policy(self.policy).views(image, preprocessing, self.seed, index, self.augment)
        return torch.cat([test_time[:1], augmented, test_time[1:]])

    def refusal(self, preprocessing: Preprocessing) -> str | None:
        """Why this plan's views cannot be cut for ``preprocessing`` (None where they can)."""
        return views_refusal(preprocessing, self.describe() if self.augment else "", self.tta)

    def split(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Features ``[B, count, D]`` of :meth:`views` -> plain ``[B, D]``, augmented ``[B, augment, D]``,
        test-time ``[B, TTA_VIEWS[tta] - 1, D]`` (the last two possibly empty)."""
        plain, augmented, test_time = features.split([1, *self.extra], dim=1)
        return plain[:, 0], augmented, test_time


@lru_cache(maxsize=64)
def _pipeline(policy: AugmentPolicy, preprocessing: Preprocessing) -> v2.Compose:
    from torchvision.transforms import InterpolationMode, v2

    crop = list(preprocessing.size)
    interpolation = InterpolationMode(preprocessing.interpolation)
    steps: list[v2.Transform] = [
        v2.RandomResizedCrop(crop, policy.crop_scale, policy.crop_ratio, interpolation, preprocessing.antialias)
        if policy.crop_scale else v2.Lambda(preprocessing.view_image)]
    if policy.flip:
        steps.append(v2.RandomHorizontalFlip(policy.flip))
    if policy.rotation:
        # The corners are filled with the weights' mean colour, which normalises to zero: no fake black edge.
        fill = tuple(round(255 * m) for m in preprocessing.mean)
        steps.append(v2.RandomRotation(policy.rotation, InterpolationMode.BILINEAR, fill=fill))
    if any(getattr(policy, name) for name in _JITTER):
        steps.append(v2.ColorJitter(*(getattr(policy, name) for name in _JITTER)))
    return v2.Compose([*steps, v2.PILToTensor()])


_TORCH_RNG_LOCK = threading.Lock()


@contextmanager
def _seeded_torch_rng(seed: int) -> Iterator[None]:
    """torch's global CPU generator seeded with ``seed`` inside, the caller's state restored after."""
    import torch

    with _TORCH_RNG_LOCK, torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield
