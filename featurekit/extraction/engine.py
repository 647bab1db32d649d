"""Stage 4: run frozen trunks over each split and write the feature stores.

    listing -> chunks some store of the run has not committed -> TrunkRunner.stream (decode once,
            every trunk) -> each chunk's rows committed to every StoreWriter -> joined into
            <out>/<split>/<store_name>.h5

The unit of work is a chunk: ``chunk_size`` consecutive rows of the sorted listing. A chunk is
done when it is committed for every store of the run. A run computes only the chunks not yet
committed, so a killed run resumes, and :func:`shard` hands contiguous blocks of the missing
chunks to processes (torchrun ranks) without padding or dropping images. Under ``--shard I/N``
(:class:`~featurekit.distributed.Shard`) a process computes only the missing chunks of its block
of the chunk grid, and the shard that finds every chunk committed joins the store.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import h5py
import numpy as np
import PIL
import torch
import torchvision

from .. import __version__
from ..backbones.rebuild import store_identity
from ..backbones.runner import TrunkRunner, storage_dtype
from ..backbones.settings import AUTO_DTYPE, RunSettings
from ..backbones.trunks import Backbone, load_backbone
from ..errors import DataError, SettingsError
from ..images.listing import SplitListing, list_split
from ..images.names import printable_path
from ..store.chunks import Chunk, uncovered
from ..store.format import StoreHeader, fingerprint, read_store
from ..store.writer import StoreWriter
from ..views.augment import ViewPlan
from .distributed import Launch, Shard, barrier, block, broadcast, check_group

Log = Callable[[str], None]


@dataclass(frozen=True)
class StoreResult:
    """One store of a run: ``status`` is ``written``, ``up to date`` or, for a shard, ``partial``
    or ``being joined by another process`` (then ``rows`` counts the rows committed so far);
    ``skipped``: (path, reason); ``computed``: rows this run (all its ranks) extracted."""

    path: Path
    status: str
    rows: int
    skipped: list[tuple[str, str]]
    computed: int = 0

    @classmethod
    def read(cls, writer: StoreWriter, status: str, computed: int = 0) -> "StoreResult":
        if not writer.final.exists():  # a shard's store that others complete
            gaps = uncovered(writer.committed(), len(writer.listing))
            return cls(writer.final, status, len(writer.listing) - sum(b - a for a, b in gaps), [], computed)
        contents = read_store(writer.final, features=False)
        return cls(writer.final, status, len(contents.paths), contents.skipped, computed)


@dataclass(frozen=True)
class ExtractSettings(RunSettings):
    """How to run an extraction: :class:`~featurekit.runner.RunSettings` and the store side."""

    dtype: str = AUTO_DTYPE  # float16, or float32 for random weights (runner.storage_dtype)
    chunk_size: int = 512  # rows per committed chunk (resume granularity); rounded up to whole batches
    overwrite: bool = False  # replace stores, and discard committed chunks, made from other inputs
    launch: Launch = field(default_factory=Launch)  # this process's place in a torchrun job
    shard: Shard | None = None  # this process's block of the chunks, for launchers without a rendezvous
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


def extract(
    root: str | Path,
    splits: Sequence[str],
    backbones: Sequence[str | Backbone],
    out_dir: str | Path = "features",
    settings: ExtractSettings | None = None,
    *,
    weights: str = "DEFAULT",
    weights_path: str | None = None,
    node: str | None = None,
    log: Log | None = None,
) -> list[StoreResult]:
    """Extract the store of every (split, backbone) of ``root`` into ``out_dir``; one result per store.

    ``backbones``: registry names (built with ``weights``, ``weights_path`` and ``node``) or
    :class:`~featurekit.backbones.Backbone` objects. Every split is listed, and every store
    checked for staleness, before any model runs.
    """
    log = log or _say
    listings = [list_split(root, split) for split in splits]
    for listing in listings:
        report_listing(listing, log)
    built = [b if isinstance(b, Backbone) else load_backbone(b, weights, weights_path, node) for b in backbones]
    return extract_listings(listings, built, out_dir, settings, log)


def extract_listings(listings: Sequence[SplitListing], backbones: Sequence[Backbone], out_dir: str | Path,
                     settings: ExtractSettings | None = None, log: Log | None = None) -> list[StoreResult]:
    """:func:`extract` over splits already listed and backbones already built. Under torchrun every
    rank calls this; only rank 0's results list the stores."""
    settings, log = settings or ExtractSettings(), log or _say
    settings = dataclasses.replace(settings, dtype=storage_dtype(settings.dtype, backbones)).resolved()
    check_group(settings.launch.world_size)
    unreadable = next((listing for listing in listings if listing.unreadable), None)
    if unreadable and settings.on_error == "fail":
        raise DataError(f"{unreadable.display_dir}: {unreadable.unreadable_text()} (--on-error skip extracts the rest)")
    plans = [(listing, [_writer(listing, b, settings, out_dir, log) for b in backbones]) for listing in listings]
    for _, writers in plans:  # refuse stale stores of any split before extracting the first
        for writer in writers:
            writer.check_reusable()
    runner = TrunkRunner(backbones, settings)
    return [result for listing, writers in plans for result in _extract_split(runner, listing, writers, settings)]


def report_listing(listing: SplitListing, log: Log) -> None:
    log(f"{listing.display_dir}: {len(listing)} images in {len(listing.classes)} classes")
    for line in listing.notices():
        log(line)


def shard(chunks: Sequence[tuple[int, int]], rank: int, world_size: int) -> list[tuple[int, int]]:
    """The contiguous block of ``chunks`` that ``rank`` of ``world_size`` extracts."""
    return list(chunks[block(len(chunks), rank, world_size)])


def missing_chunks(committed: Sequence[Sequence[tuple[int, int]]], n: int, chunk_size: int) -> list[tuple[int, int]]:
    """Chunks of the rows that some store has not committed, cut on the ``chunk_size`` grid.

    ``committed`` holds each store's committed ranges. On the grid, an unchanged command
    recomputes exactly the chunks (and so the batches) an uninterrupted run would have.
    """
    merged: list[tuple[int, int]] = []
    for start, stop in sorted(gap for ranges in committed for gap in uncovered(ranges, n)):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], stop))
        else:
            merged.append((start, stop))
    todo = []
    for start, stop in merged:
        while start < stop:
            cut = min(stop, (start // chunk_size + 1) * chunk_size)
            todo.append((start, cut))
            start = cut
    return todo


def _writer(listing: SplitListing, backbone: Backbone, settings: ExtractSettings, out_dir: str | Path,
            log: Log) -> StoreWriter:
    identity = dataclasses.replace(store_identity(backbone, settings), **settings.views.identity())
    digest = listing.sha256()
    header = StoreHeader(
        **identity.to_dict(), split=listing.split, data_root=printable_path(str(listing.root.resolve())),
        listing_sha256=digest,
        weights=backbone.weights.name, weights_source=backbone.weights.source,
        weights_report=backbone.weights.report.summary(), device=torch.device(settings.device).type,
        on_error=settings.on_error, fingerprint=fingerprint(identity, digest), feature_dim=backbone.feature_dim,
        n_listed=len(listing), versions=_versions())
    return StoreWriter(out_dir, listing, backbone.store_name, header, settings.overwrite, log)


def _versions() -> dict:
    return {"featurekit": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "h5py": h5py.__version__, "numpy": np.__version__, "pillow": PIL.__version__}


def _extract_split(runner: TrunkRunner, listing: SplitListing, writers: list[StoreWriter],
                   settings: ExtractSettings) -> list[StoreResult]:
    """Rank 0 decides (and locks, unless a shard), every rank computes its block of the missing
    chunks, rank 0 joins (a shard: if every chunk is committed, see StoreWriter.join_once)."""
    launch, sharded = settings.launch, settings.shard is not None
    with contextlib.ExitStack() as locks:
        todo = [writer.begin(None if sharded else locks) for writer in writers] if launch.rank == 0 else None
        todo = broadcast(todo, launch.world_size)  # every store is open before any rank writes
        computed = 0
        if any(todo):
            computed = _compute(runner, listing, [writer for writer, needed in zip(writers, todo) if needed], settings)
            barrier(launch.world_size)  # every rank's chunks are committed
        if launch.rank != 0:
            return []
        return [StoreResult.read(writer, _finish(writer, sharded), computed) if needed
                else StoreResult.read(writer, "up to date") for writer, needed in zip(writers, todo)]


def _finish(writer: StoreWriter, sharded: bool) -> str:
    if sharded:
        return writer.join_once()
    writer.finish()
    return "written"


def _compute(runner: TrunkRunner, listing: SplitListing, writers: list[StoreWriter], settings: ExtractSettings) -> int:
    """Extract this process's chunks of the missing ones; returns the rows the whole job extracts."""
    launch, part = settings.launch, settings.shard
    todo = None
    if launch.rank == 0:
        todo = missing_chunks([w.committed() for w in writers], len(listing), settings.chunk_size)
        if part is not None:
            first, last = part.rows(len(listing), settings.chunk_size)
            todo = [(start, stop) for start, stop in todo if first <= start and stop <= last]
    todo = broadcast(todo, launch.world_size)  # read before anyone wrote
    computed, todo = sum(b - a for a, b in todo), shard(todo, launch.rank, launch.world_size)
    who = " ".join(([f"shard {part}"] if part else []) + ([f"rank {launch.rank}/{launch.world_size}"]
                                                          if launch.world_size > 1 else []))
    if who:
        _say(f"{who}: {len(todo)} chunks ({sum(b - a for a, b in todo)} images) of {listing.split}")
    if not todo:
        return computed
    sources = listing.files()
    with ThreadPoolExecutor(max_workers=1) as background:  # commits overlap the next chunk's compute
        pending: list[Future] = []
        rows: dict[str, list[torch.Tensor]] = {}
        kept: list[int] = []
        failed: list[tuple[int, str, str]] = []
        for batch, outputs in runner.stream(sources, todo, f"extract {listing.split}", settings.views):
            for name, features in outputs.items():
                rows.setdefault(name, []).append(features)
            kept.extend(batch.indices)
            failed.extend(batch.errors)
            if batch.last_in_chunk:
                host, copied = runner.to_host(rows)
                pending.append(background.submit(_commit, writers, batch.chunk, host, copied, kept, failed,
                                                 settings.views))
                rows, kept, failed = {}, [], []
                while pending and pending[0].done():  # a failed commit surfaces now, not at the end
                    pending.pop(0).result()
        for future in pending:
            future.result()
    return computed


def _commit(writers: list[StoreWriter], chunk: tuple[int, int], host: dict[str, torch.Tensor], copied,
            kept: list[int], failed: list[tuple[int, str, str]], plan: ViewPlan) -> None:
    """Background thread: wait for the chunk's copy to the host, then commit it to every store."""
    if copied is not None:
        copied.synchronize()
    kept_rows = np.asarray(kept, dtype=np.int64)
    skipped = np.asarray([index for index, _, _ in failed], dtype=np.int64)
    reasons = tuple(reason for _, _, reason in failed)
    for writer in writers:
        features, views = plan.split(host[writer.store_name]) if plan.count > 1 else (host[writer.store_name], {})
        writer.commit(Chunk(chunk[0], chunk[1], kept_rows, features.numpy(), skipped, reasons,
                            {name: values.numpy() for name, values in views.items()}))


def _say(message: str) -> None:
    print(message, file=sys.stderr)
