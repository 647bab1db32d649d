"""Export memory against the rows: featurekit.export block by block vs the whole split loaded and written at once.

For each size (default 20,000 and 80,000 rows: an export holds at most two blocks of 8192 rows at
either) a store of that many rows of D = 2048 float16 features is written through the real
:class:`~featurekit.store.writer.StoreWriter` (synthetic rows, 512 a chunk, as extract commits
them; the images are never opened: export reads the store). Then, each in a fresh process, one
after the other:

- ``export parquet`` and ``export npy``: :func:`featurekit.export` (row groups / blocks of 8192 rows);
- ``baseline``: what one writes without it, ``featurekit.load`` of the split (float32 [N, D] in
  memory) and one ``pyarrow.parquet.write_table`` of it.

Each process reports its peak resident memory (VmHWM) minus its resident memory once everything is
imported, so the figure is the operation's own. Goal: export flat in N (the same MB at 4x the
rows), the baseline growing with N.

    nice -n 5 python benchmarks/bench_export.py
    python benchmarks/bench_export.py --rows 10000 40000 --dir /tmp/export   # ~2 GB of disk at the default sizes
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from featurekit.images.decode import DecodePolicy
from featurekit.images.listing import ImageRecord, SplitListing
from featurekit.store.chunks import Chunk
from featurekit.store.format import FEATURES_VERSION, StoreHeader, StoreIdentity, fingerprint
from featurekit.store.writer import StoreWriter

D, CHUNK, CLASSES = 2048, 512, 100
STORE = "synthetic"
REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
import numpy as np, pyarrow as pa, pyarrow.parquet as pq
import featurekit
from featurekit.store import export as _, dataset as _d  # everything imported before the baseline is read

def rss(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field)) / 1024

features, out, how = sys.argv[1:4]
base = rss("VmRSS:")
started = time.perf_counter()
if how == "baseline":
    split = featurekit.load(features, "train", ["synthetic"], verify=False)
    column = pa.FixedSizeListArray.from_arrays(pa.array(split.features.reshape(-1)), split.features.shape[1])
    pq.write_table(pa.table({"path": split.paths, "label": split.labels, "features": column}), out)
else:
    featurekit.export(features, "train", ["synthetic"], out, featurekit.ExportSettings(form=how))
print(json.dumps({"mb": rss("VmHWM:") - base, "seconds": time.perf_counter() - started}))
"""


def synthetic_store(features_dir: Path, rows: int) -> Path:
    """A complete store of ``rows`` rows of float16 features, committed chunk by chunk like extract's."""
    rng = np.random.default_rng(0)
    records = tuple(ImageRecord(f"c{i % CLASSES:03d}/{i:08d}.jpg", i % CLASSES, 1000, 0) for i in range(rows))
    listing = SplitListing(features_dir / "data", "train", tuple(f"c{c:03d}" for c in range(CLASSES)), records)
    identity = StoreIdentity(STORE, "flatten", "0" * 64, {}, DecodePolicy(backend="pil").to_dict(), "fp32",
                             "float16", FEATURES_VERSION)
    header = StoreHeader(**identity.to_dict(), split="train", data_root=str(listing.root), listing_sha256="x",
                         weights="synthetic", weights_source="", weights_report="", device="cpu", on_error="fail",
                         fingerprint=fingerprint(identity, str(rows)), feature_dim=D, n_listed=rows, versions={})
    writer = StoreWriter(features_dir, listing, STORE, header)
    with contextlib.ExitStack() as locks:
        writer.begin(locks)
        for start in range(0, rows, CHUNK):
            stop = min(rows, start + CHUNK)
            values = rng.standard_normal((stop - start, D), dtype=np.float32).astype(np.float16)
            writer.commit(Chunk(start, stop, np.arange(start, stop, dtype=np.int64), values))
        return writer.finish()


def measure(features_dir: Path, out: Path, how: str) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, str(features_dir), str(out), how], capture_output=True,
                          text=True, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})  # this featurekit
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[20_000, 80_000])
    parser.add_argument("--dir", type=Path, help="working folder (default: a temporary one, removed after)")
    args = parser.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="bench_export-"))
    results: dict[str, dict[int, dict]] = {}
    try:
        for rows in args.rows:
            features = work / f"features-{rows}"
            started = time.perf_counter()
            store = synthetic_store(features, rows)
            print(f"{rows} rows: store {store.stat().st_size / 2**20:.0f} MB written in "
                  f"{time.perf_counter() - started:.1f} s", flush=True)
            for how, out in (("parquet", "e.parquet"), ("npy", "npy"), ("baseline", "b.parquet")):
                results.setdefault(how, {})[rows] = measure(features, work / f"{rows}-{out}", how)
                shutil.rmtree(work / f"{rows}-{out}", ignore_errors=True)
                (work / f"{rows}-{out}").unlink(missing_ok=True)
            shutil.rmtree(features)
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    small, large = min(args.rows), max(args.rows)
    print(f"\npeak memory of the operation (MB, VmHWM - resident after imports), D = {D} float16 stores")
    print(f"{'':16}" + "".join(f"{rows:>12,} rows" for rows in args.rows) + f"{'ratio':>12}  seconds at {large:,}")
    for how, by_rows in results.items():
        ratio = by_rows[large]["mb"] / max(by_rows[small]["mb"], 1e-9)
        print(f"{how:16}" + "".join(f"{by_rows[rows]['mb']:>17.1f}" for rows in args.rows)
              + f"{ratio:>11.2f}x  {by_rows[large]['seconds']:.1f}")


if __name__ == "__main__":
    main()
