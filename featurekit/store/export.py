"""Stores out to the tools used next: parquet (pandas, polars, HF datasets, Ray Data, DuckDB) or npy.

- **parquet** (pyarrow, ``featurekit[parquet]``): one file, columns ``path`` (string, as stored:
  relative to the split folder, list folder or shards), ``label`` (int64, index into the classes;
  null in an unlabelled store), ``class`` (string; null likewise) and ``features`` (a fixed-size
  list of D float32, or float16, per row: the backbones' stores concatenated in the order given),
  written one row group of ``block_rows`` rows at a time, so memory stays one block whatever N;
- **npy**: clip-retrieval's folder layout, ``OUT/img_emb/img_emb_0.npy`` (float32|float16 [N, D],
  its header written first, then the rows block by block) and ``OUT/metadata/metadata_0.csv``
  (``path,label,class``, rows in the same order).

Either way the export records where it came from: the parquet file's key-value metadata
``featurekit`` (and ``OUT/featurekit-export.json`` beside the npy), with the split, each store's
path, fingerprint and columns, the classes and the rows. The stores are checked as
:func:`featurekit.load` checks them (whole, aligned, made alike) before anything is written; every
output goes through :func:`~featurekit.files.check_output` (an existing file is refused without
``overwrite``; never one of the stores exported, a folder, a device or a FIFO) and
:func:`~featurekit.files.atomic_output` (the old file stays whole until the new one replaces it).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .. import __version__
from ..errors import SettingsError
from ..files import atomic_output, atomic_write, check_output
from .dataset import StoreInfo, checked_stores, store_files
from .format import StoreContents, reading
from .settings import ExportSettings

__all__ = ["EXPORT_FORMAT", "export", "parquet_module", "read_export_record"]

EXPORT_FORMAT = "featurekit.export"
NPY_FEATURES = Path("img_emb") / "img_emb_0.npy"  # clip-retrieval's names
NPY_METADATA = Path("metadata") / "metadata_0.csv"
NPY_RECORD = "featurekit-export.json"


def export(features_dir: str | os.PathLike, split: str, store_names: Sequence[str], out: str | os.PathLike,
           settings: ExportSettings | None = None) -> list[str]:
    """Write the features of ``split`` of ``store_names`` (concatenated, in that order) to ``out``: a
    parquet file, or a folder in clip-retrieval's npy layout. Returns the lines that say what was written."""
    settings = settings or ExportSettings()
    if settings.block_rows < 1:
        raise SettingsError(f"--block-rows must be at least 1 (got {settings.block_rows})")
    out = Path(out)
    outputs = [out] if settings.form == "parquet" else [out / NPY_FEATURES, out / NPY_METADATA, out / NPY_RECORD]
    inputs = store_files(features_dir, split, store_names)
    for path in outputs:
        check_output(path, inputs, overwrite=settings.overwrite)
    pq = parquet_module() if settings.form == "parquet" else None
    contents, stores = checked_stores(features_dir, split, store_names, verify=True)
    record = export_record(split, contents, stores, settings.dtype)
    blocks = _blocks(contents[0], stores, settings)
    if pq is not None:
        _write_parquet(pq, out, record, blocks, stores[-1].columns.stop, settings)
    else:
        _write_npy(out, record, blocks, stores[-1].columns.stop, settings.dtype)
    size = sum(path.stat().st_size for path in outputs)
    shown = f"{size / 2 ** 20:.1f} MiB" if size >= 2 ** 20 else f"{size / 2 ** 10:.1f} KiB"
    return [f"{', '.join(map(str, outputs))}: {record['rows']} rows x {record['feature_dim']} features "
            f"({settings.dtype}) of split {split} from {', '.join(store_names)}, {shown}"]


def parquet_module():
    """``pyarrow.parquet``, or a one-line :class:`SettingsError` saying how to install it."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise SettingsError("parquet output needs pyarrow: pip install 'featurekit[parquet]'") from None
    return pq


def export_record(split: str, contents: Sequence[StoreContents], stores: Sequence[StoreInfo], dtype: str) -> dict:
    """What an export records of its origin: the stores (path, fingerprint, columns) and the rows."""
    first = contents[0].header
    return {"format": EXPORT_FORMAT, "format_version": 1, "featurekit": __version__, "split": split,
            "data_root": first.data_root, "listing_rule": first.listing_rule, "rows": len(contents[0].paths),
            "feature_dim": stores[-1].columns.stop, "dtype": dtype, "labelled": contents[0].labels is not None,
            "classes": contents[0].classes,
            "stores": [{"store_name": info.store_name, "path": str(info.path), "fingerprint": info.header.fingerprint,
                        "backbone": info.header.backbone, "node": info.header.node, "weights": info.header.weights,
                        "columns": [info.columns.start, info.columns.stop]} for info in stores]}


def _blocks(first: StoreContents, stores: Sequence[StoreInfo], settings: ExportSettings) -> Iterator[tuple]:
    """(paths, labels or None, features float[B, D]) of each block of rows, every store's file open once."""
    n, dim = len(first.paths), stores[-1].columns.stop
    with contextlib.ExitStack() as opened:
        datasets = [opened.enter_context(reading(info.path))["features"] for info in stores]
        for start in range(0, n, settings.block_rows):
            stop = min(n, start + settings.block_rows)
            features = np.empty((stop - start, dim), dtype=settings.dtype)
            for info, dataset in zip(stores, datasets):  # converted by HDF5 into place: no block of the stored dtype
                dataset.read_direct(features, np.s_[start:stop], np.s_[:, info.columns])
            labels = first.labels[start:stop] if first.labels is not None else None
            yield first.paths[start:stop], labels, features


def _write_parquet(pq, out: Path, record: dict, blocks: Iterator[tuple], dim: int, settings: ExportSettings) -> None:
    import pyarrow as pa

    pool = _memory_pool(pa)
    classes = record["classes"]
    schema = pa.schema([("path", pa.string()), ("label", pa.int64()), ("class", pa.string()),
                        ("features", pa.list_(pa.from_numpy_dtype(np.dtype(settings.dtype)), dim))],
                       metadata={"featurekit": json.dumps(record)})
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(out, "cannot write the export") as temporary:
        # features are not worth a dictionary: trying one costs a block of memory and time
        with pq.ParquetWriter(temporary, schema, use_dictionary=["path", "class"], memory_pool=pool) as writer:
            for paths, labels, features in blocks:
                count = len(paths)
                label_column = pa.array(labels, pa.int64(), memory_pool=pool) if labels is not None else \
                    pa.nulls(count, pa.int64(), memory_pool=pool)
                names = [classes[label] for label in labels] if labels is not None else [None] * count
                column = pa.FixedSizeListArray.from_arrays(pa.array(features.reshape(-1), memory_pool=pool), dim)
                writer.write_batch(pa.record_batch([pa.array(paths, pa.string(), memory_pool=pool), label_column,
                                                    pa.array(names, pa.string(), memory_pool=pool), column],
                                                   schema=schema), row_group_size=settings.block_rows)


def _memory_pool(pa):
    """jemalloc where pyarrow has it: mimalloc, its default pool in some builds, keeps freed blocks, and the
    peak grew by ~7 MB a row group (290 -> 346 MB over 2 -> 10 groups of 64 MB); jemalloc gives them back
    (234 -> 238 MB)."""
    try:
        return pa.jemalloc_memory_pool()
    except NotImplementedError:
        return pa.system_memory_pool()


def _write_npy(out: Path, record: dict, blocks: Iterator[tuple], dim: int, dtype: str) -> None:
    """The npy header, then each block's bytes (memory: one block); the CSV beside it; the record last."""
    classes = record["classes"]
    for path in (out / NPY_FEATURES, out / NPY_METADATA):
        path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(out / NPY_FEATURES, "cannot write the export") as features_file, \
            atomic_output(out / NPY_METADATA, "cannot write the export") as metadata_file, \
            open(features_file, "wb") as array, open(metadata_file, "w", newline="") as metadata:
        header = {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": (record["rows"], dim)}
        np.lib.format.write_array_header_1_0(array, header)
        table = csv.writer(metadata)
        table.writerow(["path", "label", "class"])
        for paths, labels, features in blocks:
            array.write(np.ascontiguousarray(features).tobytes())
            rows = labels if labels is not None else [None] * len(paths)
            table.writerows([path, "" if label is None else int(label), "" if label is None else classes[label]]
                            for path, label in zip(paths, rows))
    atomic_write(out / NPY_RECORD, json.dumps(record, indent=2) + "\n")


def read_export_record(path: str | os.PathLike) -> dict:
    """The record of a parquet export (its ``featurekit`` metadata) or of an npy folder's JSON."""
    path = Path(path)
    if path.is_dir():
        return json.loads((path / NPY_RECORD).read_text())
    return json.loads(parquet_module().read_schema(path).metadata[b"featurekit"])
