"""Stage 7: what every classifier head shares, one scikit-learn-style interface (the heads: linear, knn, mlp).

Every head follows the estimator rules: ``__init__`` only stores parameters and ``fit`` never changes
them; ``fit(X, y, X_val=None, y_val=None)`` returns ``self``; fitted attributes end in ``_``;
``predict`` returns labels of ``classes_``; ``predict_proba`` returns float64[N, len(classes_)],
columns in ``classes_`` order. ``X`` is float32[N, D] (concatenated backbone features), ``y`` any
labels (train-head gives the class names).

- Standardisation (per feature mean/std) is fitted on the training rows only, in ``scaler_``.
- ``class_weight="balanced"``: each row's loss (kNN: its vote) weighs ``N / (C n_c)`` for its class's
  ``n_c`` rows (scikit-learn's rule), so every class counts alike on imbalanced sets.
- Model selection uses the validation rows when given: each head tries the values of its grid
  (``C_grid`` for the linear heads: one warm-started path, increasing C, stopped ``C_patience``
  values past the best; ``n_neighbors_grid`` for kNN; ``weight_decay_grid`` with early stopping
  for the MLP) and keeps the one the rule ``select`` chooses (:mod:`featurekit.heads.selection`).
  Every candidate's scores are in ``selection_``, the winner in ``best_params_`` and in the fitted
  attribute ``<grid parameter>_`` (``C_``, ``n_neighbors_``, ``weight_decay_``), as scikit-learn's
  ``LogisticRegressionCV`` keeps ``C_`` and ``GridSearchCV`` ``best_params_``; the parameters stay
  as given, so ``clone(head).set_params(**head.best_params_)`` is the chosen model. Without
  validation rows the single value ``C`` / ``n_neighbors`` / ``weight_decay`` is used and the MLP
  trains for ``max_epochs``.
- The linear heads (logreg, svm) and the MLP train in torch on ``device`` (``auto``: cuda when
  there, else cpu); the fitted model lives on the CPU.
- The heads pass scikit-learn's ``check_estimator`` (tests/test_heads.py).

Head files are data, never a pickle (:mod:`featurekit.heads.head_file`): each head gives its fitted model
as named arrays and plain values (``_model_arrays``) and rebuilds it from them (``_model_from_arrays``).
"""

from __future__ import annotations

import time
from typing import Any, ClassVar, Iterator, Protocol

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.preprocessing import StandardScaler
from sklearn.utils.class_weight import compute_class_weight
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from ..errors import HeadError, SettingsError
from . import selection
from .settings import CLASS_WEIGHTS, SELECT_RULES

__all__ = ["C_GRID", "Head", "ProbabilityModel", "proba_scores"]

# 45 log-spaced C in [1e-6, 1e5], four per decade, to 3 significant digits (1e-6, 1.78e-6, 3.16e-6, ...):
# the linear-probe protocols' sweep, affordable since each C starts from the last solution
C_GRID = tuple(float(f"{C:.3g}") for C in np.logspace(-6, 5, 45))


class ProbabilityModel(Protocol):
    """Anything that gives class probabilities of feature rows: a :class:`Head`, a fine-tuned model's classifier."""

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """float32[N, D] -> float64[N, classes]."""


class Head(ClassifierMixin, BaseEstimator):
    """Shared fit/predict logic. Subclasses name their grid parameter and fit one candidate."""

    kind: ClassVar[str]
    grid_param: ClassVar[str]  # the parameter swept on validation; its grid is ``<grid_param>_grid``
    # parameter -> (smallest value that works, whether the bound itself works); sequences: each element
    limits: ClassVar[dict[str, tuple[float, bool]]] = {}
    auto_params: ClassVar[frozenset[str]] = frozenset()  # parameters that may also be "auto"
    choices: ClassVar[dict[str, tuple]] = {"select": SELECT_RULES, "class_weight": (None, *CLASS_WEIGHTS)}

    def fit(self, X: np.ndarray, y: np.ndarray, X_val: np.ndarray | None = None,
            y_val: np.ndarray | None = None) -> "Head":
        """Fit on float32[N, D] / labels[N]. With validation rows, sweep the grid and keep the candidate
        that rule ``select`` chooses: ``best_params_`` and ``<grid parameter>_`` hold it."""
        self._check_limits()
        X, y = validate_data(self, X, y, dtype=np.float32)
        check_classification_targets(y)
        self.classes_ = np.unique(y)
        if len(self.classes_) < 2:
            raise HeadError(f"{self.kind} head: the training rows hold 1 class ({self.classes_[0]}); "
                            "a classifier needs at least 2")
        self.scaler_ = StandardScaler().fit(X) if self._standardizes() else None
        targets = np.searchsorted(self.classes_, y)
        train = (self._scale(X), targets, self._row_weights(y, targets))
        validation = None
        if X_val is not None:
            validation = (self._scale(validate_data(self, X_val, reset=False, dtype=np.float32)), self._targets(y_val))
        start = time.perf_counter()
        self.model_, self.history_, self.selection_, self.best_params_ = self._select(train, validation)
        setattr(self, f"{self.grid_param}_", self.best_params_[self.grid_param])
        self.fit_seconds_ = time.perf_counter() - start
        iterations = self._iterations(self.model_)
        if iterations is not None:
            self.n_iter_ = iterations
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """float64[N, len(classes_)], columns in ``classes_`` order."""
        check_is_fitted(self)
        return self._model_proba(self.model_, self._scale(validate_data(self, X, reset=False, dtype=np.float32)))

    def predict(self, X: np.ndarray) -> np.ndarray:
        proba = self.predict_proba(X)  # first: it raises NotFittedError before fit
        return self.classes_[proba.argmax(axis=1)]

    def _select(self, train: tuple, validation: tuple[np.ndarray, np.ndarray] | None
                ) -> tuple[Any, list[dict], list[dict], dict]:
        """``(model, history, selection records, best params)``: every grid value (with validation
        rows) or the single value, each from :meth:`_candidates`; the one rule ``select`` keeps."""
        grid = self._grid() if validation is not None else [getattr(self, self.grid_param)]
        records, fitted = [], []
        for value, model, history, scores in self._candidates(train, validation, grid):
            records.append({self.grid_param: value, **scores, "epochs": len(history) or None})
            fitted.append((model, history))
        chosen = selection.choose(records, self.select, 0 if validation is None else len(validation[1]))
        model, history = fitted[chosen]
        return model, history, records, {self.grid_param: records[chosen][self.grid_param]}

    def _grid(self) -> list:
        """The values tried on validation rows (``<grid_param>_grid``)."""
        return list(getattr(self, f"{self.grid_param}_grid"))

    def _candidates(self, train, validation, grid: list) -> Iterator[tuple[Any, Any, list[dict], dict]]:
        """``(value, model, history, validation scores)`` per grid value, in order (scores: {} without validation)."""
        for value in grid:
            model, history = self._fit_one(*train, validation, value)
            yield value, model, history, (self._scores(model, validation) if validation is not None else {})

    def _check_limits(self) -> None:
        """A parameter value that cannot work is a :class:`SettingsError`, before any fitting."""
        for name, allowed in self.choices.items():
            if hasattr(self, name) and not isinstance(getattr(self, name), dict) and getattr(self, name) not in allowed:
                shown = ", ".join(str(choice) for choice in allowed)
                raise SettingsError(f"{self.kind} head: {name} must be one of {shown} (got {getattr(self, name)!r})")
        for name, (low, inclusive) in self.limits.items():
            value = getattr(self, name)
            for item in value if isinstance(value, (tuple, list)) else [value]:
                if isinstance(item, str) and name in self.auto_params:
                    if item != "auto":
                        raise SettingsError(f"{self.kind} head: {name} must be a number or auto (got {item!r})")
                    continue
                if item < low or (item == low and not inclusive):
                    bound = f"at least {low:g}" if inclusive else f"more than {low:g}"
                    raise SettingsError(f"{self.kind} head: {name} must be {bound} (got {item:g})")

    def _standardizes(self) -> bool:
        return bool(self.standardize)

    def _row_weights(self, y: np.ndarray, targets: np.ndarray) -> np.ndarray | None:
        """float32[N] class weights of each training row (``class_weight``: "balanced" or {label: weight}),
        or None: all rows alike."""
        if not isinstance(self.class_weight, dict) and self.class_weight in (None, "none"):
            return None
        per_class = compute_class_weight(self.class_weight, classes=self.classes_, y=y)
        return per_class[targets].astype(np.float32)

    def _scale(self, X: np.ndarray) -> np.ndarray:
        return X if self.scaler_ is None else self.scaler_.transform(X).astype(np.float32, copy=False)

    def _targets(self, y: np.ndarray) -> np.ndarray:
        y = np.asarray(y)
        unknown = np.setdiff1d(y, self.classes_)
        if unknown.size:
            raise HeadError(f"validation labels {unknown.tolist()} are not among the training classes "
                            f"{self.classes_.tolist()}")
        return np.searchsorted(self.classes_, y)

    def _scores(self, model: Any, validation: tuple[np.ndarray, np.ndarray]) -> dict[str, float]:
        X_val, t_val = validation
        return proba_scores(self._model_proba(model, X_val), t_val)

    def _fit_one(self, X: np.ndarray, t: np.ndarray, weights: np.ndarray | None, validation, value
                 ) -> tuple[Any, list[dict]]:
        """Fit one candidate on standardised float32[N, D], targets int64[N] in 0..C-1 and row weights
        float32[N] (or None: all rows alike)."""
        raise NotImplementedError

    def _model_proba(self, model: Any, X: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _iterations(self, model: Any) -> int | None:
        """Solver iterations of the kept candidate (``n_iter_``), for heads with an iteration limit."""
        return None

    def _model_arrays(self) -> tuple[dict[str, np.ndarray], dict]:
        """The fitted ``model_`` as named arrays and plain (JSON) values, for a head file."""
        raise NotImplementedError

    def _model_from_arrays(self, arrays: dict[str, np.ndarray], values: dict) -> Any:
        """The ``model_`` that :meth:`_model_arrays` gave these arrays and values for."""
        raise NotImplementedError


def proba_scores(proba: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """Validation accuracy, balanced accuracy (mean recall of the classes present) and log loss of
    probabilities float64[M, C] for targets int64[M] in 0..C-1."""
    picked = np.clip(proba[np.arange(len(targets)), targets], selection.PROBABILITY_FLOOR, 1.0)
    right = proba.argmax(axis=1) == targets
    present = np.bincount(targets, minlength=proba.shape[1])
    recall = np.bincount(targets, weights=right, minlength=proba.shape[1])[present > 0] / present[present > 0]
    return {"val_accuracy": float(right.mean()), "val_balanced_accuracy": float(recall.mean()),
            "val_log_loss": float(-np.log(picked).mean())}
