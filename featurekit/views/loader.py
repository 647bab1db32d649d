"""Stage 2 in motion: feed decoded, per-backbone views to the trunks in deterministic batches.

Each image is decoded once (in a DataLoader worker) and cut into one uint8 view per distinct
:class:`~featurekit.views.preprocessing.Preprocessing`; failures travel with the batch as reasons instead of
killing the worker, so the caller decides between failing and skipping.

Batches never cross a chunk boundary, so a chunk's batches are the same on every run (resume
reproduces the same values on the CPU, where kernels can depend on the batch size).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence, Union

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..errors import AugmentError, ImageDecodeError, SettingsError
from ..images.decode import DecodePolicy, ImageSource, content_sha256, decode_bytes, read_image_bytes, to_rgb
from .augment import ViewPlan
from .gpu_decode import RawJpeg, gpu_jpeg
from .preprocessing import Preprocessing

__all__ = ["Source", "ViewBatch", "ViewDataset", "collate_views", "iterate_views"]

# An image to decode and its name in messages: an os path, a tar member or bytes (images.decode.ImageSource),
# or a PIL image for pixels already in memory.
Source = tuple[Union[ImageSource, Image.Image], str]


@dataclass
class ViewBatch:
    """The images ``indices`` of one batch, in order, and those that failed.

    ``views[key]``: uint8[len(cpu_rows), 3, H, W], the PIL-decoded images at positions
    ``cpu_rows`` of ``indices``; ``raw``: the JPEGs left for the GPU, at positions ``raw_rows``.
    """

    indices: list[int]
    views: dict[str, torch.Tensor]
    cpu_rows: list[int] = field(default_factory=list)
    raw: list[RawJpeg] = field(default_factory=list)
    raw_rows: list[int] = field(default_factory=list)
    errors: list[tuple[int, str, str]] = field(default_factory=list)  # (index, path, reason)
    sha256: dict[int, str] = field(default_factory=dict)  # index -> sha256 of the bytes read (kept or failed)
    chunk: tuple[int, int] | None = None
    last_in_chunk: bool = False


class ViewDataset(Dataset):
    """Item ``i`` of ``sources`` -> ``(i, payload, sha256)``.

    The payload is ``{key: uint8 view}`` after a PIL decode, a :class:`RawJpeg` for the GPU
    (``policy.backend == "torchvision"``), or ``(name, reason)`` when the image cannot be decoded;
    ``sha256`` is the hex digest of the bytes the decode read (each file is read once), "" when
    none were (an unreadable file, pixels given in memory).
    With a ``plan`` of several views, each view is ``uint8[plan.count, 3, H, W]`` (the plain
    view first), all cut from one PIL decode of image ``i`` (``i``: its listing index, which seeds them).
    """

    def __init__(self, sources: Sequence[Source], preprocessings: Sequence[Preprocessing], policy: DecodePolicy,
                 plan: ViewPlan | None = None):
        self.sources = list(sources)
        self.preprocessings = {p.key: p for p in preprocessings}
        self.policy = policy
        self.plan = plan if plan is not None and plan.count > 1 else None
        if self.plan is not None and policy.backend == "torchvision":
            raise SettingsError(f"{self.plan.describe()} are cut from PIL-decoded images, not with the torchvision "
                                "(nvJPEG) decoder: decode with --decoder pil")
        refusal = next(filter(None, (self.plan.refusal(p) for p in preprocessings)), None) if self.plan else None
        if refusal:
            raise AugmentError(refusal)

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int):
        source, display = self.sources[index]
        if isinstance(source, Image.Image):
            return index, self._views(to_rgb(source, self.policy.alpha_background), index), ""
        digest = ""
        try:
            data = read_image_bytes(source, display)
            digest = content_sha256(data)
            raw = gpu_jpeg(data, source, display, self.policy) if self.policy.backend == "torchvision" else None
            return index, raw or self._views(decode_bytes(data, self.policy, display), index), digest
        except ImageDecodeError as error:
            return index, (error.path, error.reason), digest

    def _views(self, image: Image.Image, index: int) -> dict[str, torch.Tensor]:
        """The views of image ``index`` (subclasses make other views than the plain one)."""
        if self.plan is not None:
            return {key: self.plan.views(image, p, index) for key, p in self.preprocessings.items()}
        return {key: p.view(image) for key, p in self.preprocessings.items()}


def collate_views(items) -> ViewBatch:
    batch = ViewBatch([], {})
    views: dict[str, list[torch.Tensor]] = {}
    for index, payload, digest in items:
        if digest:
            batch.sha256[index] = digest
        if isinstance(payload, tuple):
            batch.errors.append((index, *payload))
            continue
        if isinstance(payload, RawJpeg):
            batch.raw_rows.append(len(batch.indices))
            batch.raw.append(payload)
        else:
            batch.cpu_rows.append(len(batch.indices))
            for key, view in payload.items():
                views.setdefault(key, []).append(view)
        batch.indices.append(index)
    batch.views = {key: torch.stack(v) for key, v in views.items()}
    return batch


def chunk_batches(chunks: Sequence[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Index batches of at most ``batch_size`` that never straddle a chunk ``[start, stop)``."""
    return [list(range(s, min(s + batch_size, stop))) for start, stop in chunks for s in range(start, stop, batch_size)]




def iterate_views(
    dataset: ViewDataset,
    chunks: Sequence[tuple[int, int]],
    batch_size: int,
    num_workers: int,
    pin_memory: bool = False,
) -> Iterator[ViewBatch]:
    """Yield the batches of ``chunks`` in order, each tagged with its chunk."""
    batches = chunk_batches(chunks, batch_size)
    loader = DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=collate_views,
        pin_memory=pin_memory,
        prefetch_factor=4 if num_workers else None,
        persistent_workers=False,
    )
    bounds = iter(chunks)
    current = next(bounds, None)
    for indices, batch in zip(batches, loader):
        while current is not None and indices[0] >= current[1]:
            current = next(bounds, None)
        batch.chunk = current
        batch.last_in_chunk = indices[-1] == current[1] - 1
        yield batch
