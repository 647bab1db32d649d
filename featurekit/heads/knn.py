"""The k-nearest-neighbour head: cosine similarity of (standardised) features, temperature-weighted votes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.preprocessing import StandardScaler

from .base import Head, proba_scores
from .nearest import top_k, unit_rows
from .selection import SELECT
from .settings import KNN_PROTOCOLS

__all__ = ["KNNHead", "Neighbours", "similarity_rows", "unit_rows"]

K_GRIDS = {"featurekit": (1, 3, 5, 10, 20, 50), "dino": (10, 20, 100, 200)}  # n_neighbors_grid="auto"


@dataclass(frozen=True)
class Neighbours:
    """A fitted kNN: unit-norm training rows float32[N, D], their targets int64[N], and k."""

    rows: np.ndarray
    targets: np.ndarray
    k: int


class KNNHead(Head):
    """k nearest neighbours by cosine similarity; k swept on validation.

    Each of the k neighbours votes with weight ``exp(similarity / temperature)`` (the weighted kNN
    of DINO's evaluation), the votes scaled to sum to k, and the class probabilities are the vote
    shares smoothed by one more vote spread evenly over the C classes, ``(votes + 1/C) / (k + 1)``:
    never exactly 0 or 1, so a kNN that merely ties the others on accuracy cannot win selection on
    log loss with hard 0/1 votes, and probabilities change smoothly with the features (no singular
    weight at distance 0). (One vote per class, ``(votes + 1) / (k + C)``, drowned the votes at
    many classes: 5 unanimous neighbours of 101 classes gave their class 0.06.) With validation
    rows, the neighbours are searched once, for the largest k, and every k scored from them.

    ``protocol``: ``featurekit`` compares features standardised with the training rows' mean and std
    and tries k in 1 ... 50; ``dino`` is the self-supervised papers' kNN (DINO and DINOv2's
    ``knn.py``): cosine similarity of the features as extracted (L2-normalised, not standardised),
    k in {10, 20, 100, 200}, the same votes with T = 0.07 (their predictions; the smoothing changes
    the probabilities, not the argmax). ``standardize`` and ``n_neighbors_grid`` ``"auto"`` follow the
    protocol; given, they override it. ``class_weight="balanced"``: each vote weighs its class's weight.
    """

    kind = "knn"
    grid_param = "n_neighbors"
    limits = {"n_neighbors": (1, True), "n_neighbors_grid": (1, True), "temperature": (0, False)}
    auto_params = frozenset({"n_neighbors_grid"})
    choices = {**Head.choices, "protocol": KNN_PROTOCOLS, "standardize": ("auto", True, False)}

    def __init__(self, n_neighbors: int = 10, n_neighbors_grid="auto", temperature: float = 0.07,
                 protocol: str = "featurekit", select: str = SELECT, class_weight: str | None = None,
                 standardize: bool | str = "auto"):
        self.n_neighbors = n_neighbors
        self.n_neighbors_grid = n_neighbors_grid
        self.temperature = temperature
        self.protocol = protocol
        self.select = select
        self.class_weight = class_weight
        self.standardize = standardize

    def _standardizes(self) -> bool:
        return self.protocol == "featurekit" if self.standardize == "auto" else bool(self.standardize)

    def _grid(self) -> list:
        return list(K_GRIDS[self.protocol] if self.n_neighbors_grid == "auto" else self.n_neighbors_grid)

    def _candidates(self, train, validation, grid):
        X, t, weights = train
        rows, targets = unit_rows(X), t.astype(np.int64)
        self.vote_weights_ = None if weights is None else \
            np.bincount(targets, weights=weights, minlength=len(self.classes_)) / np.maximum(np.bincount(
                targets, minlength=len(self.classes_)), 1)
        ks = [int(min(value, len(X))) for value in grid]
        if validation is not None:
            closeness, nearest = _nearest(rows, unit_rows(validation[0]), max(ks))
        for value, k in zip(grid, ks):
            scores = {} if validation is None else \
                proba_scores(self._vote_proba(closeness[:, :k], targets[nearest[:, :k]]), validation[1])
            yield value, Neighbours(rows, targets, k), [], scores

    def _model_proba(self, model: Neighbours, X: np.ndarray) -> np.ndarray:
        closeness, nearest = _nearest(model.rows, unit_rows(X), model.k)
        return self._vote_proba(closeness, model.targets[nearest])

    def _vote_proba(self, closeness: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """float64[M, C] from the similarities float64[M, k] of each query's k neighbours and their targets."""
        k, n_classes = closeness.shape[1], len(self.classes_)
        weights = np.exp((closeness - closeness.max(axis=1, keepdims=True)) / self.temperature)
        if getattr(self, "vote_weights_", None) is not None:
            weights *= self.vote_weights_[labels]
        weights *= k / weights.sum(axis=1, keepdims=True)
        votes = np.zeros((len(weights), n_classes))
        np.add.at(votes, (np.arange(len(weights))[:, None], labels), weights)
        return (votes + 1.0 / n_classes) / (k + 1)

    def _model_arrays(self):
        arrays = {"rows": self.model_.rows, "targets": self.model_.targets}
        if getattr(self, "vote_weights_", None) is not None:
            arrays["vote_weights"] = self.vote_weights_
        return arrays, {"k": self.model_.k}

    def _model_from_arrays(self, arrays, values):
        self.vote_weights_ = arrays.get("vote_weights")
        return Neighbours(arrays["rows"], arrays["targets"], int(values["k"]))


def similarity_rows(X: np.ndarray, scaler: StandardScaler | None) -> np.ndarray:
    """What the kNN head compares: float32[N, D] standardised with ``scaler`` (None: as given), unit rows.
    ``neighbors`` compares images the same way (:mod:`featurekit.predict.neighbors`)."""
    return unit_rows(X if scaler is None else scaler.transform(X).astype(np.float32, copy=False))


def _nearest(rows: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(similarity float64[M, k], index int64[M, k])`` of each unit-norm query's k most similar unit-norm
    rows, most similar first, by the one search (:func:`~featurekit.heads.nearest.top_k`) in float64: a
    float32 product's last bits depend on how many queries share it, and a query's answer must not."""
    found = top_k(queries, rows, k, _as_is, precision="fp64")
    return found.sim, found.idx


def _as_is(block: np.ndarray) -> np.ndarray:
    return block
