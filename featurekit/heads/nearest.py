"""The nearest rows by cosine similarity, in bounded memory: the one search of the kNN head, of
``neighbors`` and of the audit.

Rows come from a :class:`Rows` source: parts (numpy arrays, memmaps of stores, h5py datasets)
joined end to end and read as float32 blocks, so no caller needs every row in memory. A
``normalise`` function turns a float32 block into the unit rows that are compared (default
:func:`unit_rows`; the kNN head and ``neighbors`` standardise first, the audit unit-normalises
each backbone's columns). What is kept is each row's (or query's) ``k`` best: :class:`TopK`,
``sim`` float32[N, k] best first (``-inf`` where fewer exist) and ``idx`` int64[N, k] (``-1`` there).
Nothing is N x N: memory is the N x k lists, one block of queries or a panel of rows, one block of
columns and one block x block matrix of scores.

- :func:`top_k`: each query's k most similar rows, exactly, streaming the rows block by block
  (``dtype`` float64 for the kNN head: a float32 product's last bits may depend on how many queries
  share it, and a query's answer must not).
- :func:`all_pairs`: each row's k most similar *other* rows. Only the upper triangle of the block
  grid is computed: each score block serves its row block and, transposed, its column block, so
  every pair is scored once (N^2 / 2 products). ``precision="bf16"`` multiplies in bfloat16 (about
  3.6x the float32 rate on a CPU with AVX512-BF16, docs/audit.md); its scores are rounded by up to
  2^-9 below 1, which orders neighbours well, and :func:`rescore` gives the exact float32 value of
  the pairs whose value decides something. A row block enters the merge only where some score beats
  the row's current k-th best (and, with ``threshold``, ``threshold - MARGINS[precision]``): most
  blocks cost one product and one max.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

__all__ = ["MARGINS", "Neighbours", "Normalise", "Rows", "TopK", "all_pairs", "rescore", "top_k", "unit_rows"]

Normalise = Callable[[np.ndarray], np.ndarray]  # float32 block [b, D] -> the rows compared [b, D']
PRECISIONS = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16}
MARGINS = {"fp64": 0.0, "fp32": 1e-5, "bf16": 1e-2}  # slack of a threshold for the rounding of scores
PANEL_BYTES = 1 << 30  # rows of all_pairs held at once in the compute precision


def unit_rows(block: np.ndarray) -> np.ndarray:
    """float32[b, D] scaled to unit length (zero rows stay zero)."""
    block = np.asarray(block, np.float32)
    return block / np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-12)


class Rows:
    """``parts`` joined end to end; rows are read as float32 blocks. A part is 2-D and indexed by a row
    range or by increasing row indices: a numpy array, a memmap, an h5py dataset."""

    def __init__(self, parts: Sequence | np.ndarray):
        self.parts = [parts] if hasattr(parts, "shape") else list(parts)
        if not self.parts or len({int(p.shape[1]) for p in self.parts}) != 1:
            raise ValueError("Rows: no parts, or parts of different widths")
        self.dim = int(self.parts[0].shape[1])
        self.offsets = np.cumsum([0] + [int(p.shape[0]) for p in self.parts])
        self.n = int(self.offsets[-1])

    def __len__(self) -> int:
        return self.n

    def read(self, start: int, stop: int) -> np.ndarray:
        """float32[stop - start, D]: rows ``start..stop-1`` across the parts."""
        start, stop = max(0, start), min(self.n, stop)
        out = np.empty((max(0, stop - start), self.dim), np.float32)
        for part, (lo, hi) in zip(self.parts, zip(self.offsets[:-1], self.offsets[1:])):
            a, b = max(start, lo), min(stop, hi)
            if a < b:
                out[a - start:b - start] = part[a - lo:b - lo]
        return out

    def blocks(self, size: int, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """``(first row, float32 block)`` of ``size`` rows from ``start`` to ``stop``."""
        stop = self.n if stop is None else min(stop, self.n)
        for lo in range(start, stop, size):
            yield lo, self.read(lo, min(lo + size, stop))

    def take(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """float32[len(indices), D] in the order given; each part read once, at increasing unique rows."""
        indices = np.asarray(indices, np.int64).reshape(-1)
        if len(indices) and (indices.min() < 0 or indices.max() >= self.n):
            raise IndexError(f"Rows.take: index out of range 0..{self.n - 1}")
        out = np.empty((len(indices), self.dim), np.float32)
        part_of = np.searchsorted(self.offsets, indices, side="right") - 1
        for p, part in enumerate(self.parts):
            mine = np.flatnonzero(part_of == p)
            if len(mine):
                unique, inverse = np.unique(indices[mine] - self.offsets[p], return_inverse=True)
                out[mine] = np.asarray(part[unique], np.float32)[inverse]
        return out


@dataclass
class Neighbours:
    """Each row's (or query's) k nearest: ``sim`` float32|float64 [N, k] best first, ``idx`` int64[N, k]
    (``-inf`` / ``-1`` where there are fewer); ``stats``: what the search did."""

    sim: np.ndarray
    idx: np.ndarray
    stats: dict = field(default_factory=dict)

    @property
    def k(self) -> int:
        return self.sim.shape[1]


class TopK:
    """The running k best (value, column) of ``n`` rows, merged block by block."""

    def __init__(self, n: int, k: int, dtype: torch.dtype = torch.float32, device: str = "cpu"):
        self.k = k
        self.sim = torch.full((n, k), -math.inf, dtype=dtype, device=device)
        self.idx = torch.full((n, k), -1, dtype=torch.int64, device=device)
        self.merged_rows = 0

    def offer(self, lo: int, scores: torch.Tensor, col_lo: int, floor: float | None = None) -> None:
        """Rows ``lo..`` of ``scores`` [b, c] (columns ``col_lo..``): merge those whose best beats their
        k-th (and ``floor``). The block's top k is taken in the scores' precision; k values widen."""
        bar = self.sim[lo:lo + len(scores), -1]
        bar = bar if floor is None else bar.clamp_min(floor)
        rows = torch.nonzero(scores.amax(dim=1).to(bar.dtype) > bar).squeeze(1)
        if rows.numel() == 0:
            return
        kk = min(self.k, scores.shape[1])
        if rows.numel() > len(scores) // 2:  # most rows: one topk over the block, no gather
            values, columns = scores.contiguous().topk(kk, dim=1)
            self.merge(slice(lo, lo + len(scores)), values, columns + col_lo)
        else:
            values, columns = scores.index_select(0, rows).topk(kk, dim=1)
            self.merge(rows + lo, values, columns + col_lo)

    def merge(self, rows: torch.Tensor | slice, values: torch.Tensor, columns: torch.Tensor) -> None:
        """Merge candidates ``values``/``columns`` [r, kk] into the lists of ``rows``."""
        every_value = torch.cat([self.sim[rows], values.to(self.sim.dtype)], dim=1)
        every_column = torch.cat([self.idx[rows], columns], dim=1)
        best, where = every_value.topk(self.k, dim=1)
        self.sim[rows] = best
        self.idx[rows] = every_column.gather(1, where)
        self.merged_rows += len(values)

    def result(self, stats: dict | None = None) -> Neighbours:
        self.idx[torch.isinf(self.sim)] = -1
        return Neighbours(self.sim.cpu().numpy(), self.idx.cpu().numpy(),
                          {**(stats or {}), "merged_rows": self.merged_rows})


def _normalised(rows: Rows, normalise: Normalise, lo: int, hi: int, dtype: torch.dtype, device: str,
                step: int = 16384) -> torch.Tensor:
    """Rows ``lo..hi-1`` normalised, in ``dtype`` on ``device``; float32 only ``step`` rows at a time."""
    out = torch.empty((hi - lo, _width(rows, normalise)), dtype=dtype, device=device)
    for a in range(lo, hi, step):
        b = min(hi, a + step)
        out[a - lo:b - lo] = torch.from_numpy(normalise(rows.read(a, b))).to(device)
    return out


def _width(rows: Rows, normalise: Normalise) -> int:
    return normalise(rows.read(0, 1)).shape[1] if rows.n else rows.dim


def top_k(queries: np.ndarray, rows: Rows | np.ndarray, k: int, normalise: Normalise = unit_rows, *,
          exclude: np.ndarray | None = None, allowed: tuple[int, int] | None = None, precision: str = "fp32",
          block: int = 8192, query_block: int = 1024, device: str = "cpu") -> Neighbours:
    """The ``k`` rows most similar to each query, exactly: ``sim`` [Q, k] in ``precision`` (fp64|fp32),
    ``idx`` [Q, k] row indices. ``queries`` float32[Q, D] are normalised like the rows; ``exclude``
    int64[Q]: a row each query must not match (itself), or -1; ``allowed``: only rows [lo, hi)."""
    rows = rows if isinstance(rows, Rows) else Rows(rows)
    lo, hi = allowed or (0, rows.n)
    dtype = PRECISIONS[precision]
    k = max(1, min(k, hi - lo))
    top = TopK(len(queries), k, dtype, device)
    unit = torch.from_numpy(normalise(np.asarray(queries, np.float32))).to(device, dtype)
    with torch.no_grad():
        for c0, block_rows in rows.blocks(block, lo, hi):
            columns = torch.from_numpy(normalise(block_rows)).to(device, dtype).T
            for q0 in range(0, len(unit), query_block):
                scores = unit[q0:q0 + query_block] @ columns
                if exclude is not None:
                    own = torch.as_tensor(exclude[q0:q0 + query_block], device=device) - c0
                    inside = torch.nonzero((own >= 0) & (own < scores.shape[1])).squeeze(1)
                    scores[inside, own[inside]] = -math.inf
                top.offer(q0, scores, c0)
    return top.result({"precision": precision})


def all_pairs(rows: Rows, k: int, normalise: Normalise = unit_rows, *, threshold: float | None = None,
              precision: str = "bf16", block: int = 4096, panel_rows: int | None = None, device: str = "cpu",
              progress: Callable[[float], None] | None = None, max_blocks: int | None = None) -> Neighbours:
    """For every row, its ``k`` most similar other rows (cosine of ``normalise``d rows), see the module.

    ``threshold``: only pairs at or above it are wanted; entries below ``threshold - MARGINS[precision]``
    never enter a list. ``block``: rows per score block; ``panel_rows``: rows held at once (default
    :data:`PANEL_BYTES` of them). ``progress``: called with the fraction done; ``max_blocks``: stop after
    that many score blocks (benchmarks time a slice of a search too long to finish; the result is partial).
    """
    if k < 1:
        raise ValueError("k must be at least 1")
    n, dtype = rows.n, PRECISIONS[precision]
    floor = None if threshold is None else threshold - MARGINS[precision]
    width = _width(rows, normalise)
    panel_rows = panel_rows or max(block, PANEL_BYTES // (width * torch.tensor([], dtype=dtype).element_size()))
    panel_rows = max(block, panel_rows // block * block)
    top = TopK(n, k, torch.float32, device)
    total = sum(1 for i in range(0, n, block) for _ in range(i, n, block))
    stats = {"precision": precision, "block": block, "panel_rows": panel_rows, "pairs": n * (n - 1) // 2,
             "score_blocks": 0, "total_score_blocks": total}
    with torch.no_grad():
        for p0 in range(0, n, panel_rows):
            p1 = min(n, p0 + panel_rows)
            panel = _normalised(rows, normalise, p0, p1, dtype, device)
            for c0 in range(p0, n, block):
                c1 = min(n, c0 + block)
                columns = panel[c0 - p0:c1 - p0] if c1 <= p1 else _normalised(rows, normalise, c0, c1, dtype, device)
                for q0 in range(p0, min(p1, c0 + 1), block):
                    if max_blocks is not None and stats["score_blocks"] >= max_blocks:
                        return top.result({**stats, "partial": True})
                    scores = panel[q0 - p0:min(p1, q0 + block) - p0] @ columns.T
                    if q0 == c0:  # a diagonal block holds both orientations; never a row with itself
                        scores.fill_diagonal_(-math.inf)
                    else:
                        top.offer(c0, scores.T, q0, floor)
                    top.offer(q0, scores, c0, floor)
                    stats["score_blocks"] += 1
                    if progress:
                        progress(stats["score_blocks"] / total)
    return top.result(stats)


def rescore(rows: Rows, pairs: np.ndarray, normalise: Normalise = unit_rows) -> np.ndarray:
    """float32[P]: the exact cosine of each pair (int64[P, 2]) of rows, in float32."""
    if len(pairs) == 0:
        return np.zeros(0, np.float32)
    ids, inverse = np.unique(pairs.ravel(), return_inverse=True)
    unit = normalise(rows.take(ids))
    inverse = inverse.reshape(pairs.shape)
    return np.einsum("ij,ij->i", unit[inverse[:, 0]], unit[inverse[:, 1]]).astype(np.float32)
