"""Scale by simulation: how the join, verify, a column load and a dataset epoch grow with the rows.

For each size (default 10^4, 10^5, 10^6 rows) a folder of that many empty ``.jpg`` files is
listed by the real lister (so ``verify`` compares a real folder), synthetic float16 chunks of
2,048 columns are committed with :class:`featurekit.partial.PartialStore` exactly as extract
commits them (512 rows each), and then, each timed with its peak memory:

- ``join``: :meth:`StoreWriter.finish`, the chunks into one HDF5 store;
- ``verify``: :func:`featurekit.verify.verify_store` (structure, finite values, checksum, folder);
- ``load[:, :256]``: ``featurekit.load(..., columns=slice(0, 256), verify=False)``;
- ``memmap epoch``: one shuffled pass in batches of 256 over a contiguous ``.npy`` copy of the
  same array (``np.load(mmap_mode="r")``), rows gathered in sorted order, as float32 tensors;
- ``dataset epoch``: one shuffled pass of ``DataLoader(FeatureDataset(...), batch_size=256, shuffle=True)``;
- ``dataset loader``: the same through ``FeatureDataset.loader(256)`` (one read per batch, no
  per-row collation).

The three epochs run alternately, ``--repeats`` times (the first pass warms the page cache), and
each keeps its fastest pass.

Peak memory is the growth of resident memory over the operation: ``anon`` (heap; sampled every
5 ms) and ``rss`` (VmHWM after resetting it, which also counts pages of memory-mapped files).
The listing's own memory is printed per size. Goals: join and verify linear in rows with flat
memory; dataset epoch within 1.5x of the memmap epoch.

``--audit`` measures ``featurekit audit`` instead, on stores of 1,280 float16 columns (100 classes
of relu(centre + noise) rows: unrelated rows at cosine ~0.3, as with real efficientnet_lite0 features;
a near copy, 3 % noise, of one row in every other chunk; file digests recorded, one exact pair per 10^4
rows), each stage timed with its peak memory: opening the stores (the train-head checks, checksum
included), exact duplicates (recorded digests grouped), the exact all-pairs search (bf16, blocks of
4,096; above ``--full-max`` rows only ``--slice-blocks`` score blocks run and the whole is
EXTRAPOLATED, printed as such), near duplicates + outliers from its lists, the label check (5-fold
logistic regression; on 256 principal axes above 200,000 rows), and with faiss the approximate search
up to ``--ivf-max`` rows.

    nice python benchmarks/bench_scale.py             # needs ~9 GB free in --dir at 10^6 rows, ~25 min
    python benchmarks/bench_scale.py --rows 10000 100000 --dir /tmp/scale
    nice python benchmarks/bench_scale.py --audit     # 10^4, 10^5, 10^6 rows x 1,280; ~3 GB in --dir
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

import featurekit
from featurekit.images.decode import DecodePolicy
from featurekit.images.listing import list_split
from featurekit.store.chunks import Chunk
from featurekit.store.dataset import FeatureDataset
from featurekit.store.format import FEATURES_VERSION, StoreHeader, StoreIdentity, fingerprint, open_h5
from featurekit.store.verify import verify_store
from featurekit.store.writer import StoreWriter

D, CHUNK, BATCH, CLASSES = 2048, 512, 256, 100
MB = 2**20
STORE = "synthetic"


class Measured:
    """Seconds and peak memory growth (MB) of a ``with`` block."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self) -> "Measured":
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
        self.rss0, self.anon0 = _status("VmRSS"), _status("RssAnon")
        self.anon_peak, self._stop = self.anon0, threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start
        self._stop.set()
        self._sampler.join()
        self.anon_peak = max(self.anon_peak, _status("RssAnon"))
        self.anon_mb = (self.anon_peak - self.anon0) / MB
        self.rss_mb = (_status("VmHWM") - self.rss0) / MB

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.anon_peak = max(self.anon_peak, _status("RssAnon"))


def _status(field: str) -> int:
    """A /proc/self/status field in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def make_folder(root: Path, n: int, split: str = "train", classes: int = CLASSES) -> None:
    """``root/<split>/cNN/NNNNNNN.jpg``: n empty files, file i in class folder i % classes."""
    for label in range(classes):
        folder = root / split / f"c{label:02d}"
        folder.mkdir(parents=True)
        for i in range(label, n, classes):
            os.close(os.open(folder / f"{i:07d}.jpg", os.O_CREAT | os.O_WRONLY, 0o644))


def header_for(listing, dim: int = D, weights: str = "random") -> StoreHeader:
    """The header of a synthetic float16 store of ``listing``'s split."""
    identity = StoreIdentity(STORE, "flatten", "ab" * 32, {"crop_size": 224}, DecodePolicy(backend="pil").to_dict(),
                             "fp32", "float16", FEATURES_VERSION)
    digest = listing.sha256()
    return StoreHeader(**identity.to_dict(), split=listing.split, data_root=str(listing.root.resolve()),
                       listing_sha256=digest, weights=weights, weights_source="synthetic", weights_report="",
                       device="cpu", on_error="fail", fingerprint=fingerprint(identity, digest), feature_dim=dim,
                       n_listed=len(listing), versions={})


def commit_chunks(writer: StoreWriter, n: int) -> None:
    """Synthetic features, distinct per chunk, committed as extract commits them."""
    base = np.random.default_rng(0).standard_normal((CHUNK, D), dtype=np.float32)
    assert writer.partial.create(writer.header.identity.to_dict())
    for start in range(0, n, CHUNK):
        stop = min(start + CHUNK, n)
        features = (base[:stop - start] + np.float32(start // CHUNK % 97) / 97).astype(np.float16)
        writer.commit(Chunk(start, stop, np.arange(start, stop, dtype=np.int64), features))


def copy_to_npy(store: Path, target: Path) -> None:
    with open_h5(store) as h5:
        source = h5["features"]
        copy = np.lib.format.open_memmap(target, mode="w+", dtype=source.dtype, shape=source.shape)
        for start in range(0, len(source), 65536):
            copy[start:start + 65536] = source[start:start + 65536]
        copy.flush()
        del copy


def memmap_epoch(path: Path, labels: np.ndarray) -> float:
    """One shuffled pass over the .npy copy, the plainest way; returns a checksum."""
    array = np.load(path, mmap_mode="r")
    total = 0.0
    for batch in torch.randperm(len(array)).split(BATCH):
        rows = np.sort(batch.numpy())
        x, y = torch.from_numpy(array[rows].astype(np.float32)), torch.from_numpy(labels[rows])
        total += float(x[:, 0].sum()) + int(y[0])
    return total


def dataset_epoch(dataset: FeatureDataset, batched: bool) -> float:
    """One shuffled pass: a plain ``DataLoader(dataset, batch_size, shuffle=True)`` (rows collated
    one by one), or ``dataset.loader`` (``batched``: each batch one ``dataset[indices]``)."""
    loader = dataset.loader(BATCH) if batched else DataLoader(dataset, batch_size=BATCH, shuffle=True)
    total = 0.0
    for x, y in loader:
        total += float(x[:, 0].sum()) + int(y[0])
    return total


def run_size(n: int, base: Path, repeats: int) -> tuple[dict[str, Measured], float]:
    root, features_dir = base / f"data{n}", base / f"features{n}"
    make_folder(root, n)
    with Measured("listing") as listing_memory:
        listing = list_split(root, "train")
    writer = StoreWriter(features_dir, listing, STORE, header_for(listing))
    results = {}
    with Measured("commit") as results["commit chunks"]:
        commit_chunks(writer, n)
    with Measured("join") as results["join"]:
        writer.finish()
    with Measured("verify") as results["verify"]:
        report = verify_store(writer.final)
    assert report.ok, report.problems
    with Measured("load") as results["load[:, :256]"]:
        loaded = featurekit.load(features_dir, "train", [STORE], verify=False, columns=slice(0, 256))
    assert loaded.features.shape == (n, 256)
    del loaded
    copy_to_npy(writer.final, base / f"copy{n}.npy")
    dataset = FeatureDataset(features_dir, "train", [STORE], verify=False)
    epochs = {"memmap epoch": lambda: memmap_epoch(base / f"copy{n}.npy", dataset.labels),
              "dataset epoch": lambda: dataset_epoch(dataset, batched=False),
              "dataset loader": lambda: dataset_epoch(dataset, batched=True)}
    for _ in range(repeats):  # alternating, best of each: the machine's other load hits all alike
        for name, epoch in epochs.items():
            with Measured(name) as measured:
                epoch()
            if name not in results or measured.seconds < results[name].seconds:
                results[name] = measured
    dataset.close()
    shutil.rmtree(root)
    shutil.rmtree(features_dir)
    (base / f"copy{n}.npy").unlink()
    return results, listing_memory.anon_mb


AUDIT_D, AUDIT_CLASSES = 1280, 100


def audit_features(start: int, stop: int, centres: np.ndarray) -> np.ndarray:
    """float16 rows ``start..stop-1`` (one chunk): relu(centre of the row's class + noise); in every other
    chunk the last row is a near copy (3 % noise) of the first."""
    rng = np.random.default_rng(start)
    rows = centres[np.arange(start, stop) % AUDIT_CLASSES] + rng.standard_normal((stop - start, AUDIT_D),
                                                                                 dtype=np.float32)
    if (start // CHUNK) % 2 == 0 and stop - start > 1:
        rows[-1] = rows[0] + 0.03 * rng.standard_normal(AUDIT_D, dtype=np.float32)
    return np.maximum(rows, 0).astype(np.float16)


def audit_store(n: int, base: Path) -> tuple[Path, int]:
    """A synthetic store of n rows for the audit (module docstring); returns (features folder, planted pairs)."""
    root, features_dir = base / f"data{n}", base / f"features{n}"
    make_folder(root, n, classes=AUDIT_CLASSES)
    listing = list_split(root, "train")
    header = header_for(listing, AUDIT_D)
    writer = StoreWriter(features_dir, listing, STORE, header)
    centres = np.random.default_rng(1).standard_normal((AUDIT_CLASSES, AUDIT_D)).astype(np.float32)
    assert writer.partial.create(header.identity.to_dict())
    for start in range(0, n, CHUNK):
        stop = min(start + CHUNK, n)
        digests = np.array([f"{i:064x}" for i in range(start, stop)], "S64")
        digests[[i - start for i in range(start, stop) if i % 10_000 == 1]] = f"{0:064x}"  # equal to row 0's
        writer.commit(Chunk(start, stop, np.arange(start, stop, dtype=np.int64), audit_features(start, stop, centres),
                            sha256=digests, skipped_sha256=np.zeros(0, "S64")))
    writer.finish()
    shutil.rmtree(root)
    return features_dir, len(range(0, n, 2 * CHUNK))


def run_audit_size(n: int, base: Path, full_max: int, slice_blocks: int, ivf_max: int,
                   device: str = "cpu") -> dict[str, tuple]:
    """Each stage of the audit on n rows: (Measured, note); the search extrapolated above ``full_max``."""
    from featurekit.auditing import labels
    from featurekit.auditing.approximate import faiss_available, ivf_pairs
    from featurekit.auditing.exact import equal_groups, row_digests
    from featurekit.auditing.near import NearRule, near_duplicates
    from featurekit.auditing.outliers import knn_outliers
    from featurekit.auditing.rows import audited_rows, open_splits
    from featurekit.heads.nearest import all_pairs

    features_dir, planted = audit_store(n, base)
    results: dict[str, tuple] = {}
    with Measured("open") as measured:
        splits = open_splits(features_dir, [STORE], ["train"])
        rows, normalise = audited_rows(splits)
    results["open + checks"] = (measured, "measured")
    with Measured("exact") as measured:
        groups = equal_groups(row_digests([splits[0].sha256], [n], splits[0].sizes, []).sha256)
    results["exact (digests)"] = (measured, f"measured; {sum(len(g) - 1 for g in groups)} copies of row 0 found of "
                                            f"{len(range(1, n, 10_000))} planted")
    rule, split_of = NearRule(0.95, 0.45, 0.70, 10), np.zeros(n, np.int64)
    partial = n > full_max
    with Measured("search") as measured:
        found = all_pairs(rows, 11, normalise, precision="bf16", max_blocks=slice_blocks if partial else None,
                          device=device)
    done, total = found.stats["score_blocks"], found.stats["total_score_blocks"]
    if partial:
        measured.seconds *= total / done
        results["search (exact, bf16)"] = (measured, f"EXTRAPOLATED from {done} of {total} score blocks")
    else:
        results["search (exact, bf16)"] = (measured, f"measured; {total} score blocks")
        with Measured("near") as measured:
            pairs, _ = near_duplicates(found, rows, normalise, split_of, rule, "bf16")
            knn_outliers(found, 5, 2.0, 0.01)
        results["near + outliers"] = (measured, f"measured; {sum(p.b - p.a == CHUNK - 1 for p in pairs)} of "
                                                f"{planted} planted pairs found")
    if faiss_available() and n <= ivf_max:
        with Measured("ivf") as measured:
            found = ivf_pairs(rows, 11, normalise)
        copies = sum(found.idx[i, 0] == i - CHUNK + 1 for i in range(CHUNK - 1, n, 2 * CHUNK))
        results["search (faiss ivf)"] = (measured, f"measured; {copies} of {planted} planted copies first")
    y = np.arange(n) % AUDIT_CLASSES
    with Measured("labels") as measured:
        X = labels.principal_features(rows, [(0, n)]) if n > 200_000 else labels.standardised_rows(rows, [(0, n)])
        oof = labels.out_of_fold_proba(X, y, AUDIT_CLASSES, 5, 1e-3, device=device)
        del X
        flags = labels.confident_flags(oof.proba, y)
    results["labels (5-fold)"] = (measured, f"measured; out-of-fold accuracy {oof.accuracy:.3f}, {len(flags)} flags"
                                            + (", 256 principal axes" if n > 200_000 else ""))
    del splits, rows, found
    shutil.rmtree(features_dir)
    return results


def audit_report(table: dict[int, dict[str, tuple]]) -> None:
    print(f"\n{'audit stage':<22}{'rows':>10}{'seconds':>10}{'us/row':>9}{'anon MB':>9}{'rss MB':>9}  figure")
    for name in {name: None for sizes in table.values() for name in sizes}:
        for n, stages in sorted(table.items()):
            if name in stages:
                m, note = stages[name]
                print(f"{name:<22}{n:>10}{m.seconds:>10.1f}{m.seconds / n * 1e6:>9.1f}{m.anon_mb:>9.0f}"
                      f"{m.rss_mb:>9.0f}  {note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--device", default="cpu", help="audit: where the all-pairs search and the label check run")
    parser.add_argument("--repeats", type=int, default=3, help="epochs: best of this many alternating passes")
    parser.add_argument("--audit", action="store_true", help="measure featurekit audit's stages instead")
    parser.add_argument("--full-max", type=int, default=100_000, help="audit: the largest N searched in full")
    parser.add_argument("--slice-blocks", type=int, default=200, help="audit: score blocks timed above --full-max")
    parser.add_argument("--ivf-max", type=int, default=100_000, help="audit: the largest N of the faiss search")
    args = parser.parse_args()
    if args.audit:
        print(f"audit: {AUDIT_D} float16 columns, {AUDIT_CLASSES} classes; torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
        base = Path(tempfile.mkdtemp(prefix="bench_audit-", dir=args.dir))
        audits = {}
        try:
            for n in args.rows:
                audits[n] = run_audit_size(n, base, args.full_max, args.slice_blocks, args.ivf_max, args.device)
                audit_report({n: audits[n]})
        finally:
            shutil.rmtree(base, ignore_errors=True)
        audit_report(audits)
        return
    print(f"{D} float16 columns, chunks of {CHUNK} rows, batches of {BATCH}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} cores")
    base = Path(tempfile.mkdtemp(prefix="bench_scale-", dir=args.dir))
    table: dict[int, dict[str, Measured]] = {}
    try:
        for n in args.rows:
            table[n], listing_mb = run_size(n, base, args.repeats)
            print(f"{n:>9} rows: listing {listing_mb:6.1f} MB ({listing_mb * MB / n:.0f} B/row), store "
                  f"{n * D * 2 / MB:7.0f} MB", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    report(table)


def report(table: dict[int, dict[str, Measured]]) -> None:
    sizes = sorted(table)
    print(f"\n{'operation':<15}{'rows':>10}{'seconds':>10}{'us/row':>9}{'anon MB':>9}{'rss MB':>9}")
    for name in table[sizes[0]]:
        for n in sizes:
            m = table[n][name]
            print(f"{name:<15}{n:>10}{m.seconds:>10.2f}{m.seconds / n * 1e6:>9.2f}{m.anon_mb:>9.0f}{m.rss_mb:>9.0f}")
    if len(sizes) > 1:
        print("\ngrowth from one size to the next (time ratio for x rows; linear = x; memory MB before -> after)")
        for name in table[sizes[0]]:
            steps = [f"x{b // a}: time {table[b][name].seconds / table[a][name].seconds:5.1f}, anon "
                     f"{table[a][name].anon_mb:.0f} -> {table[b][name].anon_mb:.0f} MB"
                     for a, b in zip(sizes, sizes[1:])]
            print(f"{name:<15}" + "; ".join(steps))
    for name in ("dataset epoch", "dataset loader"):
        print(f"{name} / memmap epoch: " + ", ".join(
            f"{n}: {table[n][name].seconds / table[n]['memmap epoch'].seconds:.2f}x" for n in sizes))


if __name__ == "__main__":
    main()
