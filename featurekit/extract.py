"""Stage 4: run frozen trunks over each split and write the feature stores.

    images -> decode once (loader workers) -> one uint8 view per preprocessing -> every trunk
           -> rows committed in chunks (store.PartialStore) -> finalize -> <out>/<split>/<name>.h5

The unit of work is a chunk: ``chunk_size`` consecutive rows of the sorted listing. A chunk is
done when its ``.npz`` is committed for every store of the run. A run computes only the chunks
not yet committed, so a killed run resumes, and :func:`shard` hands contiguous ranges of the
missing chunks to processes (torchrun ranks) without padding or dropping images.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np
import PIL
import torch
import torchvision
from torch.fx.experimental.optimization import fuse
from tqdm import tqdm

from . import __version__
from .backbones import Backbone
from .distributed import barrier, broadcast, check_group
from .images import DataError, DecodePolicy, ImageDecodeError, SplitListing, list_split, printable_path
from .gpu_decode import decode_batch
from .loader import ViewBatch, ViewDataset, default_workers, iterate_views
from .store import (
    Chunk,
    PartialStore,
    StoreError,
    StoreLock,
    finalize,
    fingerprint,
    identity_change,
    read_attrs,
    read_store,
    store_path,
    uncovered,
)
from .verify import folder_changes

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Bumped whenever a change to featurekit alters the features computed from the same images, weights
# and settings (trunk construction, decoding, resizing). It is part of every store's identity, so a
# store made by an older build reads as stale instead of up to date. 2: the EfficientNet-Lite trunk
# fix (f9a1400); stores from before carry no features_version at all.
FEATURES_VERSION = 2


@functools.cache
def native_bf16_cpu() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX). There oneDNN runs the
    trunks 2-3x faster in bf16 than in fp32; elsewhere it emulates bf16 and gains nothing."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:  # not Linux: stay with fp32
        return False
    return ("avx512_bf16" in flags or "amx_bf16" in flags) and torch.backends.mkldnn.is_available()


def auto_precision(device: str) -> str:
    """bf16 where the device computes it natively (CUDA, CPUs with AVX512-BF16/AMX), else fp32."""
    return "bf16" if device.startswith("cuda") or (device == "cpu" and native_bf16_cpu()) else "fp32"


@dataclass
class ExtractSettings:
    """How to run an extraction. ``auto`` fields resolve against the device in :meth:`resolved`."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (see auto_precision) | fp32 | bf16 | fp16
    dtype: str = "float16"  # storage dtype: float16 | float32
    batch_size: int = 32
    num_workers: int | None = None  # None: sized to the cores
    chunk_size: int = 512  # rows per committed chunk; rounded up to a multiple of batch_size
    on_error: str = "fail"  # fail | skip
    overwrite: bool = False  # re-extract stores and discard committed chunks made from other inputs
    decode: DecodePolicy = field(default_factory=DecodePolicy)
    decoder: str = "auto"  # auto (torchvision/nvJPEG on CUDA, PIL on CPU) | pil | torchvision
    channels_last: bool = True
    compile: bool = False
    progress: bool = True
    rank: int = 0  # torchrun: this process's rank of world_size (featurekit.distributed)
    world_size: int = 1
    local_rank: int = 0  # picks the GPU: device "cuda" means cuda:<local_rank> when world_size > 1
    local_world_size: int = 1  # processes on this node: they share its cores between their workers

    def resolved(self) -> "ExtractSettings":
        device = "cuda" if self.device == "auto" and torch.cuda.is_available() else self.device
        device = "cpu" if device == "auto" else device
        if device == "cuda" and self.world_size > 1:
            device = f"cuda:{self.local_rank}"
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not one of world_size {self.world_size}")
        precision = self.precision if self.precision != "auto" else auto_precision(device)
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r} (choose from {', '.join(PRECISIONS)})")
        if self.dtype not in ("float16", "float32"):
            raise ValueError(f"unknown storage dtype {self.dtype!r} (float16 or float32)")
        if self.on_error not in ("fail", "skip"):
            raise ValueError(f"unknown --on-error {self.on_error!r} (fail or skip)")
        chunk = -(-max(self.chunk_size, 1) // self.batch_size) * self.batch_size
        workers = self.num_workers
        if workers is None:
            workers = max(1, default_workers(torch.device(device)) // max(1, self.local_world_size))
        decoder = self.decoder if self.decoder != "auto" else ("torchvision" if device.startswith("cuda") else "pil")
        if decoder not in ("pil", "torchvision"):
            raise ValueError(f"unknown decoder {decoder!r} (auto, pil or torchvision)")
        decode = dataclasses.replace(self.decode, backend=decoder)
        return dataclasses.replace(self, device=device, precision=precision, chunk_size=chunk, num_workers=workers,
                                   decoder=decoder, decode=decode)


@dataclass(frozen=True)
class StoreResult:
    path: Path
    status: str  # written | up to date
    rows: int
    skipped: list[tuple[str, str]]


@dataclass
class _Job:
    """One store of the run: where it goes and its partial chunks."""

    backbone: Backbone
    partial: PartialStore
    attrs: dict


def identity(backbone: Backbone, settings: ExtractSettings) -> dict:
    """What, besides the file list, determines a store's values (part of its fingerprint)."""
    return {
        "backbone": backbone.name,
        "node": backbone.node,
        "weights_sha256": backbone.weights.sha256,
        "preprocessing": backbone.preprocessing.to_dict(),
        "decode": settings.decode.to_dict(),
        "precision": settings.precision,
        "dtype": settings.dtype,
        "features_version": FEATURES_VERSION,
    }


def store_attrs(backbone: Backbone, listing: SplitListing, settings: ExtractSettings, store_fingerprint: str) -> dict:
    return {
        "split": listing.split,
        "data_root": printable_path(str(listing.root.resolve())),
        "backbone": backbone.name,
        "node": backbone.node,
        "weights": backbone.weights.name,
        "weights_sha256": backbone.weights.sha256,
        "weights_source": backbone.weights.source,
        "weights_report": backbone.weights.report.summary(),
        "preprocessing": backbone.preprocessing.to_dict(),
        "decode": settings.decode.to_dict(),
        "precision": settings.precision,
        "features_version": FEATURES_VERSION,
        "device": torch.device(settings.device).type,
        "on_error": settings.on_error,
        "fingerprint": store_fingerprint,
        "versions": {"featurekit": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
                     "h5py": h5py.__version__, "numpy": np.__version__, "pillow": PIL.__version__},
    }


def shard(chunks: Sequence[tuple[int, int]], rank: int, world_size: int) -> list[tuple[int, int]]:
    """The contiguous block of ``chunks`` that ``rank`` of ``world_size`` extracts."""
    per, extra = divmod(len(chunks), world_size)
    start = rank * per + min(rank, extra)
    return list(chunks[start:start + per + (rank < extra)])


def all_chunks(n: int, chunk_size: int) -> list[tuple[int, int]]:
    return [(start, min(start + chunk_size, n)) for start in range(0, n, chunk_size)]


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


def extract(
    root: str | Path,
    splits: Sequence[str],
    backbones: Sequence[Backbone],
    out_dir: str | Path,
    settings: ExtractSettings | None = None,
) -> list[StoreResult]:
    """Extract every (split, backbone) store under ``out_dir``; returns one result per store."""
    return extract_listings([list_split(root, split) for split in splits], backbones, out_dir, settings)


def extract_listings(
    listings: Sequence[SplitListing],
    backbones: Sequence[Backbone],
    out_dir: str | Path,
    settings: ExtractSettings | None = None,
) -> list[StoreResult]:
    """:func:`extract` over splits already listed (a bad split fails before any model is built)."""
    settings = (settings or ExtractSettings()).resolved()
    unreadable = next((listing for listing in listings if listing.unreadable), None)
    if unreadable and settings.on_error == "fail":
        raise DataError(f"{unreadable.display_dir}: {unreadable.unreadable_text()} (--on-error skip extracts the rest)")
    if settings.rank == 0:
        for listing in listings:
            _report_listing(listing)
    runner = _Runner(backbones, settings)
    for listing in listings:  # refuse stale stores of any split before extracting the first
        runner.check_reusable(listing, Path(out_dir))
    results = []
    for listing in listings:
        results.extend(runner.run_split(listing, Path(out_dir)))
    return results


def prepare_trunk(backbone: Backbone, settings: ExtractSettings) -> torch.nn.Module:
    """The trunk as extraction runs it (``settings`` resolved): BatchNorm folded into the
    convolutions before it (one pass less over each activation, ~10% on CPU), weights cast once
    to the compute precision (autocast would cast them again on every batch: 0.5 GB per VGG19
    forward), on the device in the memory format, compiled on request. The caller's Backbone
    stays as built."""
    trunk = _alias_copy(backbone.trunk).eval()  # deepcopy of an FX module resets eval mode
    trunk.body = fuse(trunk.body, inplace=True, no_trace=True)
    dtype = PRECISIONS[settings.precision]
    memory_format = torch.channels_last if settings.channels_last else torch.preserve_format
    trunk = trunk.to(settings.device, dtype=dtype if dtype != torch.float32 else None, memory_format=memory_format)
    return torch.compile(trunk) if settings.compile else trunk


class _Runner:
    """Trunks on the device, run over one split at a time."""

    def __init__(self, backbones: Sequence[Backbone], settings: ExtractSettings):
        check_group(settings.world_size)
        self.settings = settings
        self.device = torch.device(settings.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # events, streams and pinned copies follow the current device
        self.backbones = list(backbones)
        names = [b.store_name for b in self.backbones]
        if len(set(names)) != len(names):
            raise ValueError(f"backbone given twice: {', '.join(names)}")
        self.trunks = {b.store_name: prepare_trunk(b, settings) for b in self.backbones}
        self.preprocessings = {b.preprocessing.key: b.preprocessing for b in self.backbones}
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input shapes: autotune each conv once

    # ------------------------------------------------------------------ one split

    def run_split(self, listing: SplitListing, out_dir: Path) -> list[StoreResult]:
        """Extract the stores of one split. Under torchrun every rank calls this; rank 0 opens
        the stores and joins them, and only rank 0's results list the stores it wrote."""
        rank, world_size = self.settings.rank, self.settings.world_size
        partials = [self._partial(listing, out_dir, backbone) for backbone in self.backbones]
        results = []
        with contextlib.ExitStack() as locks:
            status = self._open_stores(listing, partials, locks) if rank == 0 else None
            status = broadcast(status, world_size)  # every partial is open before any rank writes
            jobs = []
            for backbone, partial in zip(self.backbones, partials):
                if status[backbone.store_name] == "up to date":
                    results.append(_result(partial.final, "up to date"))
                else:
                    jobs.append(_Job(backbone, partial, store_attrs(backbone, listing, self.settings, partial.fingerprint)))
            if jobs:
                self._compute(listing, jobs)
                barrier(world_size)  # every rank's chunks are committed
                if rank == 0:
                    results.extend(self._finalize(listing, job) for job in jobs)
        return results

    def _open_stores(self, listing: SplitListing, partials: list[PartialStore], locks: contextlib.ExitStack) -> dict[str, str]:
        """``{store_name: "up to date" | "open"}`` for ``partials`` (one per backbone); each open
        store's lock is held in ``locks`` and its partial directory tidied and ready for chunks."""
        status = {}
        for backbone, partial in zip(self.backbones, partials):
            final = partial.final
            status[backbone.store_name] = "up to date"
            if self._up_to_date(partial, listing):  # checked without the lock: readers never wait
                _tidy_finished(partial)
                continue
            locks.enter_context(StoreLock(final))
            if self._up_to_date(partial, listing):  # finished by another process meanwhile
                partial.discard_if_finished()
                continue
            state = partial.open(discard_stale=self.settings.overwrite)
            if state != "started":
                _say(f"{final}: {state}")
            status[backbone.store_name] = "open"
        return status

    def check_reusable(self, listing: SplitListing, out_dir: Path) -> None:
        """Raise :class:`StoreError` if a store or committed chunks of this split were made from
        other inputs and ``overwrite`` is off."""
        for backbone in self.backbones:
            partial = self._partial(listing, out_dir, backbone)
            if not self._up_to_date(partial, listing):
                partial.check_no_stale_chunks(self.settings.overwrite)

    def _partial(self, listing: SplitListing, out_dir: Path, backbone: Backbone) -> PartialStore:
        store_identity = identity(backbone, self.settings)
        final = store_path(out_dir, listing.split, backbone.store_name)
        return PartialStore(final, fingerprint(listing, store_identity), store_identity)

    def _up_to_date(self, partial: PartialStore, listing: SplitListing) -> bool:
        """Whether the final store is this very extraction. One made from other inputs is refused
        unless ``overwrite``, and then replaced only once its successor is complete."""
        final = partial.final
        if not final.exists():
            return False
        try:
            attrs, damage = read_attrs(final), ""
        except StoreError as error:
            attrs, damage = {}, str(error).removeprefix(f"{final}: ")
        if attrs.get("fingerprint") == partial.fingerprint:
            return True
        if not self.settings.overwrite:
            why = f"is damaged ({damage})" if damage else _what_changed(final, attrs, listing, partial.identity)
            raise StoreError(f"{final}: exists but {why}; pass --overwrite to re-extract it")
        return False

    def _finalize(self, listing: SplitListing, job: _Job) -> StoreResult:
        return _result(finalize(job.partial, listing, job.attrs), "written")

    # ------------------------------------------------------------------ the hot loop

    def _compute(self, listing: SplitListing, jobs: list[_Job]) -> None:
        rank, world_size = self.settings.rank, self.settings.world_size
        todo = missing_chunks([job.partial.committed() for job in jobs], len(listing), self.settings.chunk_size) if rank == 0 else None
        todo = shard(broadcast(todo, world_size), rank, world_size)  # rank 0 read the chunks before anyone wrote
        if world_size > 1:
            _say(f"rank {rank}/{world_size}: {len(todo)} chunks ({sum(b - a for a, b in todo)} images) of {listing.split}")
        if not todo:
            return
        files = listing.files()
        with ThreadPoolExecutor(max_workers=1) as writer:
            pending: list[Future] = []
            rows: dict[str, list[torch.Tensor]] = {}
            kept: list[int] = []
            failed: list[tuple[int, str, str]] = []
            for batch, outputs in self.stream(files, todo, f"extract {listing.split}"):
                for name, features in outputs.items():
                    rows.setdefault(name, []).append(features)
                kept.extend(batch.indices)
                failed.extend(batch.errors)
                if batch.last_in_chunk:
                    host, copied = self._to_host(rows)
                    pending.append(writer.submit(self._commit, jobs, batch.chunk, host, copied, kept, failed))
                    rows, kept, failed = {}, [], []
                    _raise_finished(pending)
            for future in pending:
                future.result()

    def stream(self, files: Sequence[tuple[str, str]], chunks: Sequence[tuple[int, int]], label: str):
        """Yield ``(batch, {store_name: features[B, D]})`` over ``chunks`` of ``files`` in order.

        Decode failures raise under ``on_error=fail`` and ride along in ``batch.errors`` otherwise.
        """
        dataset = ViewDataset(files, [b.preprocessing for b in self.backbones], self.settings.decode)
        total = sum(stop - start for start, stop in chunks)
        with _progress(total, label, self.settings.progress) as bar:
            for batch in iterate_views(dataset, chunks, self.settings.batch_size, self.settings.num_workers,
                                       pin_memory=self.device.type == "cuda"):
                if batch.errors and self.settings.on_error == "fail":
                    raise ImageDecodeError(*batch.errors[0][1:])
                outputs = self.forward(batch)  # may move GPU-decode failures to batch.errors
                if batch.errors and self.settings.on_error == "fail":
                    raise ImageDecodeError(*batch.errors[0][1:])
                yield batch, outputs
                bar.update(len(batch.indices) + len(batch.errors))

    def forward(self, batch: ViewBatch) -> dict[str, torch.Tensor]:
        """Every trunk on the batch: ``{store_name: float16|float32 [B, D]}`` on the device.

        GPU-decoded images that fail are moved to ``batch.errors`` first, so ``batch.indices``
        lists exactly the rows returned.
        """
        views = self._views(batch)
        storage = getattr(torch, self.settings.dtype)
        if not batch.indices:
            return {b.store_name: torch.zeros(0, b.feature_dim, dtype=storage, device=self.device) for b in self.backbones}
        memory_format = torch.channels_last if self.settings.channels_last else torch.contiguous_format
        count = len(batch.indices)
        dtype = PRECISIONS[self.settings.precision]
        outputs = {}
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32):
            inputs = {key: self._pad(self.preprocessings[key].normalize(view)).contiguous(memory_format=memory_format)
                      for key, view in views.items()}
            for backbone in self.backbones:
                features = self.trunks[backbone.store_name](inputs[backbone.preprocessing.key])
                outputs[backbone.store_name] = features[:count].to(storage)
        return outputs

    def _pad(self, images: torch.Tensor) -> torch.Tensor:
        """Compiled trunks see one batch shape only (a short last batch would recompile)."""
        missing = self.settings.batch_size - images.shape[0]
        if not self.settings.compile or missing <= 0:
            return images
        return torch.cat([images, images.new_zeros(missing, *images.shape[1:])])

    def _views(self, batch: ViewBatch) -> dict[str, torch.Tensor]:
        """``{preprocessing key: uint8[B, 3, crop, crop]}`` on the device, in ``batch.indices`` order."""
        cpu = {key: view.to(self.device, non_blocking=True) for key, view in batch.views.items()}
        if not batch.raw:
            return cpu
        rows = {row: {key: view[j] for key, view in cpu.items()} for j, row in enumerate(batch.cpu_rows)}
        for row, image in zip(batch.raw_rows, decode_batch(batch.raw, self.device, self.settings.decode)):
            if isinstance(image, ImageDecodeError):
                batch.errors.append((batch.indices[row], image.path, image.reason))
            else:
                rows[row] = {key: p.view_tensor(image) for key, p in self.preprocessings.items()}
        order = sorted(rows)
        batch.indices = [batch.indices[row] for row in order]
        return {key: torch.stack([rows[row][key] for row in order]) for key in self.preprocessings} if order else {}

    def _to_host(self, rows: dict[str, list[torch.Tensor]]):
        """Start copying a chunk's features to pinned host memory without waiting for the GPU."""
        if self.device.type != "cuda":
            return {name: torch.cat(parts) for name, parts in rows.items()}, None
        host = {}
        for name, parts in rows.items():
            joined = torch.cat(parts)
            host[name] = torch.empty(joined.shape, dtype=joined.dtype, pin_memory=True)
            host[name].copy_(joined, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        return host, copied

    def _commit(self, jobs: list[_Job], chunk: tuple[int, int], host: dict[str, torch.Tensor],
                copied, kept: list[int], failed: list[tuple[int, str, str]]) -> None:
        """Writer thread: wait for the chunk's copy, then commit it to every store."""
        if copied is not None:
            copied.synchronize()
        kept_array = np.asarray(kept, dtype=np.int64)
        skipped = np.asarray([index for index, _, _ in failed], dtype=np.int64)
        reasons = tuple(reason for _, _, reason in failed)
        for job in jobs:
            features = host[job.backbone.store_name].numpy()
            job.partial.write(Chunk(chunk[0], chunk[1], kept_array, features, skipped, reasons))


@dataclass
class FileFeatures:
    """Features of arbitrary image files: ``features[store_name]`` is float32[len(kept), D]."""

    features: dict[str, np.ndarray]
    kept: list[int]  # indices into the given paths that decoded
    errors: list[tuple[str, str]]  # (path, reason) of those that did not


def features_for_files(
    paths: Sequence[str | Path],
    backbones: Sequence[Backbone],
    settings: ExtractSettings | None = None,
) -> FileFeatures:
    """Run the trunks over image files (no store); failures are reported, not raised."""
    settings = dataclasses.replace(settings or ExtractSettings(progress=False), dtype="float32", on_error="skip").resolved()
    runner = _Runner(backbones, settings)
    files = [(str(p), printable_path(str(p))) for p in paths]
    rows: dict[str, list[torch.Tensor]] = {}
    result = FileFeatures({}, [], [])
    for batch, outputs in runner.stream(files, all_chunks(len(files), settings.chunk_size), "features"):
        for name, features in outputs.items():
            rows.setdefault(name, []).append(features)
        result.kept.extend(batch.indices)
        result.errors.extend((path, reason) for _, path, reason in batch.errors)
    result.features = {b.store_name: torch.cat(rows[b.store_name]).float().cpu().numpy() if rows
                       else np.zeros((0, b.feature_dim), np.float32) for b in backbones}
    return result


def _alias_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module`` whose parameters and buffers share storage with the original's.
    Converting the copy (``.to``, fusing) rebinds its tensors and never writes into the original,
    and a conversion that changes nothing (fp32 on CPU) costs no second copy of the weights."""
    memo: dict[int, object] = {id(p): torch.nn.Parameter(p.detach(), requires_grad=False) for p in module.parameters()}
    memo.update({id(b): b.detach() for b in module.buffers()})
    return copy.deepcopy(module, memo)


def _result(path: Path, status: str) -> StoreResult:
    contents = read_store(path, features=False)
    return StoreResult(path, status, len(contents.paths), contents.skipped)


def _raise_finished(pending: list[Future]) -> None:
    """Surface a failed background write early instead of at the end of the split."""
    while pending and pending[0].done():
        pending.pop(0).result()


def _what_changed(final: Path, attrs: dict, listing: SplitListing, store_identity: dict) -> str:
    change = identity_change(attrs, store_identity)
    if change:
        return f"was made with {change}"
    return f"was made from another state of {listing.split_dir} ({'; '.join(folder_changes(final, listing))})"


def _report_listing(listing: SplitListing) -> None:
    for line in listing.notices():
        _say(line)


def _tidy_finished(partial: PartialStore) -> None:
    """Delete what a writer killed just after its final rename left, unless someone is writing."""
    if not (partial.dir.exists() or partial.temporaries()):
        return
    with contextlib.suppress(StoreError, OSError), StoreLock(partial.final):
        if partial.discard_if_finished():
            _say(f"{partial.final}: leftovers of a killed run deleted")


@contextlib.contextmanager
def _progress(total: int, label: str, enabled: bool):
    bar = tqdm(total=total, desc=label, unit="img", disable=not enabled, file=sys.stderr, dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()


def _say(message: str) -> None:
    print(message, file=sys.stderr)
