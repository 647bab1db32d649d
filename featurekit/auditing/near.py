"""Near duplicates and leakage: pairs of rows whose features are nearly the same, grouped into clusters.

A pair (i, j) of cosine s (docs/audit.md has the measurements behind every number) is a near duplicate when

    s >= threshold                       (0.95: the same image, re-encoded or barely edited), or
    rel >= relative  and  s >= floor     (0.45 and 0.70: far closer than the rows' usual neighbours)

with ``rel = (s - b) / (1 - b)``, ``b`` the larger of the two rows' k-th nearest other-row similarity,
the partner left out (k = min(neighbours, N // 40), at least 1: in a small set the 10th neighbour is
already another kind of image). The relative test (a normalised form of CSLS, Conneau et al. 2018)
finds copies that no global threshold separates from distinct images of a dense class (a cropped,
re-encoded photo at cos 0.75; two different caltech airplanes at 0.90); the absolute one keeps
clusters of many copies, whose k-th neighbour is itself a copy.

Pairs come from each row's top-(k + 1) list of the all-pairs search, so a row keeps at most k
partners; clusters of more copies still come out whole by union-find. Candidates are rescored
exactly in float32 (the search may have run in bf16) before any test. Pairs across splits are
leakage and are listed first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..heads.nearest import MARGINS, Neighbours, Rows, rescore

__all__ = ["ROWS_PER_K", "Cluster", "NearPair", "NearRule", "near_duplicates", "union_groups"]

ROWS_PER_K = 40  # the relative test's k is at most N // 40


@dataclass(frozen=True)
class NearRule:
    """The thresholds (defaults: :class:`~featurekit.auditing.settings.AuditSettings`)."""

    threshold: float
    relative: float
    floor: float
    neighbours: int

    def k(self, n: int) -> int:
        return max(1, min(self.neighbours, n // ROWS_PER_K))


@dataclass(frozen=True)
class NearPair:
    """Rows ``a`` < ``b`` (global), their exact cosine, the relative score, the test passed (``abs`` or ``rel``)."""

    a: int
    b: int
    similarity: float
    relative: float
    by: str
    cross_split: bool


@dataclass(frozen=True)
class Cluster:
    """Rows joined by near-duplicate pairs; ``cross_split``: it spans splits (leakage)."""

    rows: tuple[int, ...]
    min_similarity: float
    max_similarity: float
    cross_split: bool


def near_duplicates(found: Neighbours, rows: Rows, normalise, split_of: np.ndarray, rule: NearRule,
                    precision: str) -> tuple[list[NearPair], list[Cluster]]:
    """The pairs of ``found`` (each row's top lists, searched in ``precision``) that pass ``rule``, cross-split
    first then most similar first, and their clusters (cross-split first, then largest)."""
    lowest = min(rule.threshold, rule.floor) - MARGINS[precision]
    listed_rows, slots = np.nonzero((found.sim >= lowest) & (found.idx >= 0))
    partners = found.idx[listed_rows, slots]
    pairs = np.stack([np.minimum(listed_rows, partners), np.maximum(listed_rows, partners)], axis=1)
    listed = found.sim[listed_rows, slots]
    if len(pairs):
        pairs, first = np.unique(pairs, axis=0, return_index=True)
        listed = listed[first]
    exact = rescore(rows, pairs, normalise)
    k = rule.k(len(split_of))
    if found.k < k + 1:
        raise ValueError(f"the relative test needs {k + 1} neighbours per row, the search kept {found.k}")
    base = np.maximum(_baseline(found, pairs[:, 0], listed, k), _baseline(found, pairs[:, 1], listed, k))
    relative = (exact - base) / np.maximum(1 - base, 1e-6)
    by_abs = exact >= rule.threshold
    keep = by_abs | ((relative >= rule.relative) & (exact >= rule.floor))
    pairs, exact, relative, by_abs = pairs[keep], exact[keep], relative[keep], by_abs[keep]
    cross = split_of[pairs[:, 0]] != split_of[pairs[:, 1]]
    order = np.lexsort((-exact, ~cross))
    found_pairs = [NearPair(int(pairs[i, 0]), int(pairs[i, 1]), float(exact[i]), float(relative[i]),
                            "abs" if by_abs[i] else "rel", bool(cross[i])) for i in order]
    return found_pairs, _clusters(pairs, exact, split_of)


def _baseline(found: Neighbours, rows: np.ndarray, partner: np.ndarray, k: int) -> np.ndarray:
    """Each row's k-th nearest other-row similarity with its partner (listed similarity ``partner``) left
    out: the (k+1)-th listed when the partner is among the first k; -1 with fewer other rows."""
    kth, after = found.sim[rows, k - 1], found.sim[rows, k]
    base = np.where(partner >= kth, after, kth)
    return np.where(np.isfinite(base), base, -1.0).astype(np.float32)


def union_groups(n: int, pairs: np.ndarray) -> list[np.ndarray]:
    """The connected components (of more than one row) of the graph on ``n`` rows with edges ``pairs``
    int64[P, 2]; each sorted, in order of their first row. Union-find on arrays: path halving, by size."""
    parent, size = np.arange(n), np.ones(n, dtype=np.int64)

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return int(a)

    for a, b in pairs:
        a, b = find(int(a)), find(int(b))
        if a != b:
            a, b = (a, b) if size[a] >= size[b] else (b, a)
            parent[b], size[a] = a, size[a] + size[b]
    members = np.unique(pairs.ravel()) if len(pairs) else np.zeros(0, np.int64)
    roots = np.array([find(int(m)) for m in members], dtype=np.int64)
    groups: dict[int, list[int]] = {}
    for member, root in zip(members, roots):
        groups.setdefault(int(root), []).append(int(member))
    return sorted((np.array(g) for g in groups.values() if len(g) > 1), key=lambda g: int(g[0]))


def _clusters(pairs: np.ndarray, similarity: np.ndarray, split_of: np.ndarray) -> list[Cluster]:
    clusters = []
    for group in union_groups(len(split_of), pairs):
        inside = np.isin(pairs[:, 0], group)
        clusters.append(Cluster(tuple(int(r) for r in group), float(similarity[inside].min()),
                                float(similarity[inside].max()), len(set(split_of[group].tolist())) > 1))
    clusters.sort(key=lambda c: (not c.cross_split, -len(c.rows), -c.max_similarity))
    return clusters
