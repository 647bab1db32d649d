"""Stage 4: run frozen trunks over each split and write the feature stores.

    listing -> chunks some store of the run has not committed -> TrunkRunner.stream (decode once,
            every trunk) -> each chunk's rows committed to every StoreWriter -> joined into
            <out>/<split>/<store_name>.h5

The unit of work is a chunk: ``chunk_size`` consecutive rows of the sorted listing. A chunk is
done when it is committed for every store of the run. A run computes only the chunks not yet
committed, so a killed run resumes, and :func:`shard` hands contiguous blocks of the missing
chunks to processes (torchrun ranks) without padding or dropping images. Under ``--shard I/N``
(:class:`~featurekit.extraction.settings.Shard`) a process computes only the missing chunks of its block
of the chunk grid, and the shard that finds every chunk committed joins the store.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from bisect import bisect_right
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import h5py
import numpy as np
import PIL
import torch
import torchvision

from .. import __version__
from ..backbones.rebuild import store_identity
from ..backbones.runner import TrunkRunner, storage_dtype
from ..backbones.settings import BackboneChoice
from ..backbones.trunks import Backbone, load_backbone
from ..backbones.weights import weights_files
from ..errors import DataError, ImageDecodeError
from ..files import check_output
from ..images.listing import SplitListing
from ..images.sources import SourceSettings, list_sources
from ..store.chunks import Chunk, uncovered
from ..store.format import RANDOM, SHA256_DTYPE, StoreHeader, fingerprint, read_store, warn_random
from ..store.layout import view_datasets
from ..store.writer import StoreWriter
from ..views.augment import ViewPlan
from .distributed import barrier, broadcast, check_group
from .settings import ExtractSettings, block

__all__ = ["Extraction", "StoreResult", "build_backbones", "extract", "extract_listings", "missing_chunks", "shard"]

logger = logging.getLogger(__name__)


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

    def lines(self) -> list[str]:
        """``<path>  <rows> rows  <status>``, then one line per skipped image."""
        skipped = f"  {len(self.skipped)} skipped" if self.skipped else ""
        return [f"{self.path}  {self.rows} rows  {self.status}{skipped}",
                *(f"  skipped {path}: {reason}" for path, reason in self.skipped)]


class Extraction(list):
    """The stores of one run (a list of :class:`StoreResult`; empty on torchrun ranks other than 0)
    and how the run went: ``seconds``, ``settings`` (resolved), ``backbones`` (how many)."""

    def __init__(self, results: Sequence[StoreResult], seconds: float, settings: ExtractSettings, backbones: int):
        super().__init__(results)
        self.seconds, self.settings, self.backbones = seconds, settings, backbones

    def summary(self) -> str:
        """One line: stores, seconds, images per second, device, processes, precision, storage."""
        settings, launch = self.settings, self.settings.launch
        images = sum(result.computed for result in self) // max(1, self.backbones)
        rate = f", {images / self.seconds:.1f} images/s over {images} images" if images else \
            ", nothing left to extract"
        processes = (f" x {launch.world_size} processes" if launch.world_size > 1 else "") + \
            (f", shard {settings.shard}" if settings.shard else "")
        views = f", with {settings.views.describe()}" if settings.views.count > 1 else ""
        return (f"{len(self)} stores in {self.seconds:.1f} s{rate} ({settings.device}{processes}, "
                f"{settings.precision}, stored as {settings.dtype}{views})")

    def lines(self) -> list[str]:
        """What ``featurekit extract`` prints: each store, then :meth:`summary`."""
        return [line for result in self for line in result.lines()] + [self.summary()]


def extract(root: str | Path | None, splits: Sequence[str], backbones: Sequence[str | Backbone],
            out_dir: str | Path = "features", settings: ExtractSettings | None = None, *,
            weights: str = BackboneChoice.weights, weights_paths: Mapping[str, str] | str | None = None,
            node: str | None = BackboneChoice.node, pool: str = BackboneChoice.pool,
            source: SourceSettings | None = None, **source_options) -> Extraction:
    """Extract the store of every (split, backbone) of ``root`` into ``out_dir``; one result per store.

    ``root``: a folder ``<split>/<class>/<image>`` (a split of images without classes makes an
    unlabelled store), a class folder ``<class>/<image>`` cut by ``valid_fraction=F`` (or
    ``folds=K, fold=I``, ``split_seed``), a WebDataset shard pattern (``label_key``), or None with
    ``list_file=`` a list of files: the fields of :class:`~featurekit.images.sources.SourceSettings`,
    given as ``source`` or as keywords. ``backbones``: backbone names (built with ``weights``,
    ``weights_paths``, ``node`` and ``pool``, see :func:`build_backbones`) or
    :class:`~featurekit.backbones.trunks.Backbone` objects. Every split is listed, and every store
    checked for staleness, before any model runs. What is found is logged (:mod:`logging`, logger
    ``featurekit``); features of random weights are a ``FeaturekitWarning``.
    """
    started = time.perf_counter()
    settings = (settings or ExtractSettings()).resolved()  # a setting that cannot work is refused before any work
    source = dataclasses.replace(source or SourceSettings(), **source_options)
    listings = list_sources(root, splits, source)
    for listing in listings:
        kinds = f"in {len(listing.classes)} classes" if listing.labelled else "without classes (an unlabelled split)"
        logger.info(f"{listing.display}: {len(listing)} images {kinds}")
        for line in listing.notices():
            logger.info(line)
    built = build_backbones(backbones, weights, weights_paths, node, pool)
    return extract_listings(listings, built, out_dir, settings, started)


def build_backbones(backbones: Sequence[str | Backbone], weights: str = BackboneChoice.weights,
                    weights_paths: Mapping[str, str] | str | None = None, node: str | None = BackboneChoice.node,
                    pool: str = BackboneChoice.pool) -> list[Backbone]:
    """The backbones of a run: names built with ``weights`` (``weights_paths``: a state-dict file per
    backbone name, or one file when there is one backbone), ``node`` and ``pool``; built ones as they
    are. Each is logged; random weights are warned of (:func:`~featurekit.store.format.warn_random`)."""
    names = [b if isinstance(b, str) else b.store_name for b in backbones]
    files = weights_files(weights_paths, names)
    built = [b if isinstance(b, Backbone) else load_backbone(b, weights, files.get(b), node, pool) for b in backbones]
    for backbone in built:
        logger.info(f"{backbone.store_name}: node {backbone.node}, {backbone.feature_dim} features, weights "
                    f"{backbone.weights.name} (sha256 {backbone.weights.sha256[:12]})")
        report = backbone.weights.report
        if report.missing or report.unexpected or report.shape_mismatch:
            logger.info(f"  {backbone.weights.source}: {report.summary()}")
    warn_random([b.store_name for b in built if b.weights.name == RANDOM])
    return built


def extract_listings(listings: Sequence[SplitListing], backbones: Sequence[Backbone], out_dir: str | Path,
                     settings: ExtractSettings | None = None, started: float | None = None) -> Extraction:
    """:func:`extract` over splits already listed and backbones already built (``started``: when
    the run began, for its rate). Under torchrun every rank calls this; only rank 0's results list the stores."""
    started = time.perf_counter() if started is None else started
    settings = settings or ExtractSettings()
    settings = dataclasses.replace(settings, dtype=storage_dtype(settings.dtype, backbones)).resolved()
    check_group(settings.launch.world_size)
    unreadable = next((listing for listing in listings if listing.unreadable_text()), None)
    if unreadable and settings.on_error == "fail":
        raise DataError(f"{unreadable.display}: {unreadable.unreadable_text()} (--on-error skip extracts the rest)")
    plans = [(listing, [_writer(listing, b, settings, out_dir) for b in backbones]) for listing in listings]
    images = [listing.split_dir for listing in listings if listing.source is None]  # split folders of images
    for _, writers in plans:  # refuse stale stores, or stores in the image folders, of any split before any work
        for writer in writers:
            check_output(writer.final, images, hdf5=True)
            writer.check_reusable()
    runner = TrunkRunner(backbones, settings)
    try:
        results = [result for listing, writers in plans
                   for result in _extract_split(runner, listing, writers, settings)]
    except ImageDecodeError as error:
        raise ImageDecodeError(error.path, f"{error.reason} (--on-error skip leaves such images out, each "
                                           "recorded with its reason)") from None
    return Extraction(results, time.perf_counter() - started, settings, len(backbones))


def shard(chunks: Sequence[tuple[int, int]], rank: int, world_size: int) -> list[tuple[int, int]]:
    """The contiguous block of ``chunks`` that ``rank`` of ``world_size`` extracts."""
    return list(chunks[block(len(chunks), rank, world_size)])


def missing_chunks(committed: Sequence[Sequence[tuple[int, int]]], n: int, chunk_size: int,
                   bounds: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """Chunks of the rows that some store has not committed, cut on the ``chunk_size`` grid (or at
    ``bounds``: the chunk starts, then ``n``, of a listing of units such as tar shards).

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
            grid = (start // chunk_size + 1) * chunk_size if bounds is None else bounds[bisect_right(bounds, start)]
            cut = min(stop, grid)
            todo.append((start, cut))
            start = cut
    return todo


def _writer(listing: SplitListing, backbone: Backbone, settings: ExtractSettings, out_dir: str | Path) -> StoreWriter:
    identity = dataclasses.replace(store_identity(backbone, settings), **settings.views.identity())
    digest = listing.sha256()
    header = StoreHeader(
        **identity.to_dict(), split=listing.split, data_root=listing.data_root, listing_sha256=digest,
        listing_rule=listing.source,
        weights=backbone.weights.name, weights_source=backbone.weights.source,
        weights_report=backbone.weights.report.summary(), device=torch.device(settings.device).type,
        on_error=settings.on_error, fingerprint=fingerprint(identity, digest), feature_dim=backbone.feature_dim,
        n_listed=len(listing), versions=_versions())
    return StoreWriter(out_dir, listing, backbone.store_name, header, settings.overwrite)


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
        bounds = listing.chunk_bounds(settings.chunk_size)
        todo = missing_chunks([w.committed() for w in writers], len(listing), settings.chunk_size, bounds)
        if part is not None:
            first, last = part.rows(len(listing), settings.chunk_size, bounds)
            todo = [(start, stop) for start, stop in todo if first <= start and stop <= last]
    todo = broadcast(todo, launch.world_size)  # read before anyone wrote
    computed, todo = sum(b - a for a, b in todo), shard(todo, launch.rank, launch.world_size)
    who = " ".join(([f"shard {part}"] if part else []) + ([f"rank {launch.rank}/{launch.world_size}"]
                                                          if launch.world_size > 1 else []))
    if who:
        logger.info(f"{who}: {len(todo)} chunks ({sum(b - a for a, b in todo)} images) of {listing.split}",
                    extra={"every_rank": True})
    if not todo:
        return computed
    sources = listing.files()
    with ThreadPoolExecutor(max_workers=1) as background:  # commits overlap the next chunk's compute
        pending: list[Future] = []
        rows: dict[str, list[torch.Tensor]] = {}
        kept: list[int] = []
        failed: list[tuple[int, str, str]] = []
        digests: dict[int, str] = {}  # listing index -> sha256 of the file's bytes, as its decode read them
        for batch, outputs in runner.stream(sources, todo, f"extract {listing.split}", settings.views):
            for name, features in outputs.items():
                rows.setdefault(name, []).append(features)
            kept.extend(batch.indices)
            failed.extend(batch.errors)
            digests.update(batch.sha256)
            if batch.last_in_chunk:
                host, copied = runner.to_host(rows)
                pending.append(background.submit(_commit, writers, batch.chunk, host, copied, kept, failed,
                                                 settings.views, digests))
                rows, kept, failed, digests = {}, [], [], {}
                while pending and pending[0].done():  # a failed commit surfaces now, not at the end
                    pending.pop(0).result()
        for future in pending:
            future.result()
    return computed


def _commit(writers: list[StoreWriter], chunk: tuple[int, int], host: dict[str, torch.Tensor], copied,
            kept: list[int], failed: list[tuple[int, str, str]], plan: ViewPlan, digests: dict[int, str]) -> None:
    """Background thread: wait for the chunk's copy to the host, then commit it to every store."""
    if copied is not None:
        copied.synchronize()
    kept_rows = np.asarray(kept, dtype=np.int64)
    skipped = np.asarray([index for index, _, _ in failed], dtype=np.int64)
    reasons = tuple(reason for _, _, reason in failed)
    sha256, skipped_sha256 = (np.array([digests.get(int(i), "") for i in rows], dtype=SHA256_DTYPE)
                              for rows in (kept_rows, skipped))
    for writer in writers:
        features, views = host[writer.store_name], {}
        if plan.count > 1:
            features, *extra = plan.split(features)
            views = view_datasets(*extra)
        writer.commit(Chunk(chunk[0], chunk[1], kept_rows, features.numpy(), skipped, reasons,
                            {name: values.numpy() for name, values in views.items()}, sha256, skipped_sha256))

