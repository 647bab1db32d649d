"""Likely label errors: out-of-fold probabilities of featurekit's logistic regression, then confident learning.

1. :func:`out_of_fold_proba`: the rows are standardised once (column mean and std of every checked
   row: no label is used) and dealt into K stratified folds; on each fold's other rows a
   :class:`~featurekit.heads.LogisticHead` is fitted at one C (default 1e-3, scikit-learn's units:
   measured against the C of lowest out-of-fold log loss, equal or better precision of the flags
   and half the clean-set flag rate, docs/audit.md) and the fold's rows are scored. Every row's
   probabilities come from a head that never saw it. Above ``pca_above`` rows the head is fitted on
   256 principal axes (:func:`principal_features`, streamed: never every row at full width).
2. :func:`confident_flags` (Northcutt, Jiang and Chuang 2021, "Confident learning"): per class j the
   threshold t_j = mean p_j over the rows labelled j. A row labelled y is flagged when p_y < t_y and
   some other class k has p_k >= t_k; the suggested label is the most probable such k. Flags are
   ranked by self-confidence p_y, lowest first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..heads.linear import LogisticHead
from ..heads.nearest import Rows

__all__ = ["LabelFlag", "OutOfFold", "class_thresholds", "confident_flags", "out_of_fold_proba",
           "principal_features", "standardised_rows", "stratified_folds"]

PCA_DIM = 256


def stratified_folds(labels: np.ndarray, folds: int, seed: int = 0) -> np.ndarray:
    """int64[N]: each row's fold; each class's rows shuffled and dealt round robin, continuing where the
    previous class stopped, so fold sizes stay within one of each other."""
    rng = np.random.default_rng(seed)
    fold, offset = np.empty(len(labels), np.int64), 0
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        fold[members] = (np.arange(len(members)) + offset) % folds
        offset += len(members)
    return fold


def _stats(rows: Rows, ranges: Sequence[tuple[int, int]], block: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    """Column mean and std (float32[D], std floored at 1e-6) of the rows in ``ranges``, one streamed pass."""
    total, squares, count = np.zeros(rows.dim), np.zeros(rows.dim), 0
    for a, b in ranges:
        for _, x in rows.blocks(block, a, b):
            total += x.sum(0, dtype=np.float64)
            squares += np.square(x, dtype=np.float64).sum(0)
            count += len(x)
    mean = total / max(count, 1)
    std = np.sqrt(np.maximum(squares / max(count, 1) - mean ** 2, 0.0))
    return mean.astype(np.float32), np.maximum(std, 1e-6).astype(np.float32)


def standardised_rows(rows: Rows, ranges: Sequence[tuple[int, int]], block: int = 16384) -> np.ndarray:
    """float32[M, D]: the rows in ``ranges``, standardised, in memory once (the label check's one array)."""
    mean, std = _stats(rows, ranges, block)
    out = np.empty((sum(b - a for a, b in ranges), rows.dim), np.float32)
    at = 0
    for a, b in ranges:
        for _, x in rows.blocks(block, a, b):
            np.divide(x - mean, std, out=out[at:at + len(x)])
            at += len(x)
    return out


def principal_features(rows: Rows, ranges: Sequence[tuple[int, int]], dim: int = PCA_DIM, sample: int = 50_000,
                       block: int = 16384, seed: int = 0) -> np.ndarray:
    """float32[M, dim]: the rows standardised and projected on their top ``dim`` principal axes (fitted
    on every (M // sample)-th row, randomised SVD), standardised again; two streamed passes, memory
    M x dim plus a block (10^6 x 1,280 -> 1 GB instead of 5 GB)."""
    mean, std = _stats(rows, ranges, block)
    total = sum(b - a for a, b in ranges)
    stride = max(1, total // sample)
    picked = np.concatenate([np.arange(a, b) for a, b in ranges])[::stride]
    torch.manual_seed(seed)
    sample_rows = torch.from_numpy((rows.take(picked) - mean) / std)
    _, _, axes = torch.svd_lowrank(sample_rows, q=min(dim + 10, *sample_rows.shape), niter=4)
    axes = axes[:, :dim].contiguous()
    out = np.empty((total, axes.shape[1]), np.float32)
    at = 0
    for a, b in ranges:
        for _, x in rows.blocks(block, a, b):
            out[at:at + len(x)] = (torch.from_numpy((x - mean) / std) @ axes).numpy()
            at += len(x)
    out -= out.mean(0)
    out /= np.maximum(out.std(0), 1e-6)
    return out


@dataclass
class OutOfFold:
    """``proba`` float64[N, K] out-of-fold probabilities (columns: classes 0..K-1) and the accuracy they give."""

    proba: np.ndarray
    accuracy: float


def out_of_fold_proba(X: np.ndarray, labels: np.ndarray, n_classes: int, folds: int = 5, C: float = 1e-3,
                      seed: int = 0, device: str = "auto") -> OutOfFold:
    """Out-of-fold class probabilities of a :class:`LogisticHead` at ``C`` on standardised ``X`` float32[N, D]
    (``labels`` int64[N] in 0..n_classes-1). A class absent from a fold's training rows gets probability 0 there."""
    fold = stratified_folds(labels, folds, seed)
    proba = np.zeros((len(labels), n_classes))
    for f in range(folds):
        held, rest = np.flatnonzero(fold == f), np.flatnonzero(fold != f)
        if not len(held) or len(np.unique(labels[rest])) < 2:
            continue
        head = LogisticHead(C=C, standardize=False, device=device).fit(X[rest], labels[rest])
        proba[np.ix_(held, head.classes_)] = head.predict_proba(X[held])
    return OutOfFold(proba, float((proba.argmax(1) == labels).mean()))


@dataclass(frozen=True)
class LabelFlag:
    """A row whose given label looks wrong: p(given) (its self-confidence), p(suggested), the class thresholds."""

    row: int
    given: int
    suggested: int
    self_confidence: float
    suggested_probability: float
    thresholds: tuple[float, float]


def class_thresholds(proba: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """float64[K]: t_j = mean p_j over the rows labelled j (NaN for a class without rows: never reached)."""
    sums = np.bincount(labels, weights=proba[np.arange(len(labels)), labels], minlength=proba.shape[1])
    counts = np.bincount(labels, minlength=proba.shape[1])
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def confident_flags(proba: np.ndarray, labels: np.ndarray) -> list[LabelFlag]:
    """Confident-learning flags (module docstring), lowest self-confidence first."""
    rows, t = np.arange(len(labels)), class_thresholds(proba, labels)
    given = proba[rows, labels]
    above = proba >= np.where(np.isnan(t), np.inf, t)[None, :]
    above[rows, labels] = False
    flagged = (given < t[labels]) & above.any(1)
    suggested = np.where(above, proba, -np.inf).argmax(1)
    order = [int(i) for i in np.argsort(given, kind="stable") if flagged[i]]
    return [LabelFlag(i, int(labels[i]), int(suggested[i]), float(given[i]), float(proba[i, suggested[i]]),
                      (float(t[labels[i]]), float(t[suggested[i]]))) for i in order]
