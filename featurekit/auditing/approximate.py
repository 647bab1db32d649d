"""Approximate all-pairs search for sets where the exact one is out of reach: faiss's inverted file.

The exact search (:func:`~featurekit.heads.nearest.all_pairs`) costs N^2 / 2 products: 10^6 rows x
1,280 is about 2.5 hours on 2 loaded CPU cores (docs/audit.md). With faiss installed
(``pip install 'featurekit[faiss]'``), an inverted-file index (``IndexIVFScalarQuantizer``, float16 codes)
trained by k-means on a sample puts each row in one of ``nlist`` cells (about 4 sqrt(N)); each row
is then compared with the rows of the ``nprobe`` cells nearest to it. A pair is found only if they
share a probed cell, so recall is below 1 (measured: every planted copy at 10^4..10^6 rows, the top
neighbour agreeing with the exact one for 85-90 % of rows); near-duplicate candidates are still
rescored exactly.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Callable

import numpy as np

from ..heads.nearest import Neighbours, Normalise, Rows

__all__ = ["faiss_available", "ivf_pairs"]


def faiss_available() -> bool:
    return importlib.util.find_spec("faiss") is not None


def ivf_pairs(rows: Rows, k: int, normalise: Normalise, *, nprobe: int = 16, block: int = 16384, seed: int = 0,
              progress: Callable[[float], None] | None = None) -> Neighbours:
    """Each row's ``k`` most similar other rows as an inverted file finds them (module docstring)."""
    import faiss

    n = rows.n
    nlist = max(1, int(4 * math.sqrt(n)))
    sample = np.linspace(0, n - 1, min(n, max(40 * nlist, 10_000))).astype(np.int64)
    train = np.ascontiguousarray(normalise(rows.take(sample)))
    quantizer = faiss.IndexFlatIP(train.shape[1])
    index = faiss.IndexIVFScalarQuantizer(quantizer, train.shape[1], nlist, faiss.ScalarQuantizer.QT_fp16,
                                          faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    index.train(train)
    for _, x in rows.blocks(block):
        index.add(np.ascontiguousarray(normalise(x)))
    index.nprobe = nprobe
    sim, idx = np.full((n, k), -np.inf, np.float32), np.full((n, k), -1, np.int64)
    for lo, x in rows.blocks(block):
        values, columns = index.search(np.ascontiguousarray(normalise(x)), k + 1)
        own = np.arange(lo, lo + len(x))[:, None]
        values = np.where((columns == own) | (columns < 0), -np.inf, values)
        order = np.argsort(-values, axis=1, kind="stable")[:, :k]
        sim[lo:lo + len(x)] = np.take_along_axis(values, order, 1)
        idx[lo:lo + len(x)] = np.where(np.isinf(sim[lo:lo + len(x)]), -1, np.take_along_axis(columns, order, 1))
        if progress:
            progress((lo + len(x)) / n)
    return Neighbours(sim, idx, {"search": "ivf", "nlist": nlist, "nprobe": nprobe, "train_rows": len(sample)})
