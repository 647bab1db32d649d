"""How to run an extraction: :class:`ExtractSettings`, and this process's part of a larger job (no torch here)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Sequence

from ..backbones.settings import AUTO_DTYPE, DTYPES, RunSettings
from ..errors import SettingsError
from ..options import setting
from ..views.augment import ViewPlan

__all__ = ["SHARD_HELP", "ExtractSettings", "Launch", "Shard", "block"]

SHARD_HELP = "I/N with whole numbers, 0 <= I < N (e.g. 0/4; I counts from 0, as JOB_COMPLETION_INDEX does)"


@dataclass(frozen=True)
class Launch:
    """This process's place in a torchrun job: ``rank`` of ``world_size``, ``local_rank`` of
    ``local_world_size`` on its node (:func:`featurekit.extraction.distributed.from_environment`)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count``: the index-th (from 0) of ``count`` contiguous blocks of the
    chunks of every split. Blocks are cut from the whole chunk grid of the listing, not from the
    chunks still missing, so shards started at different times agree on them without talking."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise SettingsError(f"--shard {self}: expected {SHARD_HELP}")

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @classmethod
    def parse(cls, text: str) -> "Shard":
        """``"I/N"`` -> Shard(I, N); anything else is a one-line :class:`SettingsError`."""
        index, slash, count = text.partition("/")
        if not (slash and index.isdigit() and count.isdigit()):
            raise SettingsError(f"--shard {text!r}: expected {SHARD_HELP}")
        return cls(int(index), int(count))

    def rows(self, n: int, chunk_size: int, bounds: Sequence[int] | None = None) -> tuple[int, int]:
        """The rows ``[start, stop)`` of this shard's block of ``n`` rows cut into ``chunk_size`` chunks, or
        into the chunks whose starts (then ``n``) are ``bounds`` (a listing's units: tar shards)."""
        if bounds is not None:
            chunks = block(len(bounds) - 1, self.index, self.count)
            return bounds[chunks.start], bounds[chunks.stop]
        chunks = block(-(-n // chunk_size), self.index, self.count)
        return min(chunks.start * chunk_size, n), min(chunks.stop * chunk_size, n)


def block(length: int, index: int, count: int) -> slice:
    """The ``index``-th of ``count`` contiguous blocks of ``length`` items, sizes differing by at most one."""
    per, extra = divmod(length, count)
    start = index * per + min(index, extra)
    return slice(start, start + per + (index < extra))


@dataclass(frozen=True)
class ExtractSettings(RunSettings):
    """How to run an extraction: :class:`~featurekit.backbones.settings.RunSettings` and the store side."""

    dtype: str = setting(AUTO_DTYPE, "storage dtype; auto: float16, or float32 when a backbone has random weights "
                         "(their features can exceed float16's range)", choices=(AUTO_DTYPE, *DTYPES))
    chunk_size: int = setting(512, "rows committed at a time: what a killed run loses and resumes from (rounded up "
                              "to whole batches)")
    overwrite: bool = setting(False, "re-extract stores and discard committed chunks made from other inputs")
    compile: bool = setting(False, "torch.compile the trunks")
    launch: Launch = field(default_factory=Launch)  # this process's place in a torchrun job
    shard: Shard | None = setting(None, f"extract only block I of N of the chunks: {SHARD_HELP}; the last shard to "
                                  "finish joins the stores", metavar="I/N", parse=Shard.parse,
                                  help_default="every chunk, one process")
    views: ViewPlan = field(default_factory=ViewPlan)  # augmented and test-time views stored beside the plain row

    def resolved(self) -> "ExtractSettings":
        launch = self.launch
        if not 0 <= launch.rank < launch.world_size:
            raise SettingsError(f"rank {launch.rank} is not one of world_size {launch.world_size}")
        if self.chunk_size < 1:
            raise SettingsError(f"--chunk-size must be at least 1 (got {self.chunk_size})")
        settings = self
        if self.views.count > 1:  # views are cut from PIL images: auto decodes with PIL then, on any device
            if self.decode.backend == "torchvision":
                raise SettingsError(f"{self.views.describe()} are cut from PIL-decoded images: use --decoder pil "
                                    "or auto, not torchvision")
            settings = dataclasses.replace(self, decode=dataclasses.replace(self.decode, backend="pil"))
        run = RunSettings.resolved(settings, launch.local_rank if launch.world_size > 1 else None,
                                   launch.local_world_size)
        return dataclasses.replace(run, chunk_size=-(-self.chunk_size // run.batch_size) * run.batch_size)
