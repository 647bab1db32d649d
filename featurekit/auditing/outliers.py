"""Outliers: rows far from every other row, so from every class: the cosine distance to the k-th
nearest other row, flagged in the top tail.

The score is ``1 - s_k`` on the raw features at unit length (centring or standardising first let a
foreign image hide: its features are small, and after the mean is subtracted it points along minus
the mean like every dim image; docs/audit.md), taken from the same top lists as the near duplicates.
k = 5 > 1, so that a few copies of one odd image (a placeholder saved twice) do not vouch for each other.
A row is flagged when its robust z, (score - median) / (1.4826 MAD), exceeds ``z`` AND it is among
the ``fraction`` highest scores: the z floor keeps a set without a tail clean, the cap bounds the
list on small, diverse sets whose scores have a long tail anyway (hymenoptera: 31 of 398 rows have
z > 2; the placeholder GIF first, at 6.3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..heads.nearest import Neighbours

__all__ = ["Outliers", "knn_outliers"]

MAD_FLOOR = 1e-3  # cosine-distance units: below it the scores have no spread (near-identical rows)


@dataclass
class Outliers:
    """``scores`` float32[N] (higher: farther), ``robust_z`` float32[N], ``rows`` the flagged rows, farthest first."""

    scores: np.ndarray
    robust_z: np.ndarray
    rows: np.ndarray

    def tail(self, count: int) -> np.ndarray:
        """The ``count`` farthest rows, farthest first (flagged or not)."""
        return np.argsort(-np.nan_to_num(self.scores, nan=-np.inf), kind="stable")[:count]


def knn_outliers(found: Neighbours, k: int, z: float, fraction: float) -> Outliers:
    """The flagged rows of ``found`` (each row's top lists) by the rule of the module docstring."""
    k = min(k, found.k)
    sim = found.sim[:, :k]
    valid = np.isfinite(sim)
    last = np.maximum(valid.sum(1) - 1, 0)  # fewer than k other rows: the last one there
    scores = np.where(valid.any(1), 1.0 - sim[np.arange(len(sim)), last], np.nan).astype(np.float32)
    median = np.nanmedian(scores) if valid.any() else 0.0
    spread = max(float(np.nanmedian(np.abs(scores - median))) * 1.4826, MAD_FLOOR) if valid.any() else MAD_FLOOR
    robust = ((scores - median) / spread).astype(np.float32)
    result = Outliers(scores, robust, np.zeros(0, np.int64))
    cap = max(1, math.floor(fraction * len(scores)))
    result.rows = np.array([row for row in result.tail(cap) if robust[row] > z], dtype=np.int64)
    return result
