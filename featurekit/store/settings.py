"""How stores are exported: :class:`ExportSettings` (no torch, no h5py here: the command line builds its options)."""

from __future__ import annotations

from dataclasses import dataclass

from ..options import setting

__all__ = ["EXPORT_DTYPES", "EXPORT_FORMS", "ExportSettings"]

EXPORT_FORMS = ("parquet", "npy")
EXPORT_DTYPES = ("float32", "float16")


@dataclass(frozen=True)
class ExportSettings:
    """The file an export writes: ``form`` (parquet, or npy + CSV in clip-retrieval's folders), the
    features' ``dtype``, ``block_rows`` (rows read and written at a time: a parquet row group; memory
    is one block), and whether existing outputs may be replaced (``overwrite``)."""

    form: str = setting("parquet", "parquet: one file, columns path, label, class, features (a fixed-size list); npy: "
                        "OUT/img_emb/img_emb_0.npy and OUT/metadata/metadata_0.csv (path,label,class), "
                        "clip-retrieval's layout", flag="--format", choices=EXPORT_FORMS)
    dtype: str = setting("float32", "the features' dtype in the export: float32 (every reader takes it), float16 "
                         "(half the size: numpy and pyarrow read it, polars does not)", choices=EXPORT_DTYPES)
    block_rows: int = setting(8192, "rows read and written at a time (a parquet row group): memory is one block",
                              flag="--block-rows")
    overwrite: bool = setting(False, "replace existing output files (each stays whole until its successor "
                              "replaces it)")
