"""Stage 7: classifier heads on cached features, one scikit-learn-style interface.

Every head follows the estimator rules: ``__init__`` only stores parameters; ``fit(X, y, X_val=None,
y_val=None)`` returns ``self``; fitted attributes end in ``_``; ``predict`` returns labels of
``classes_``; ``predict_proba`` returns float64[N, len(classes_)], columns in ``classes_`` order.
``X`` is float32[N, D] (concatenated backbone features), ``y`` int64[N].

- Standardisation (per feature mean/std) is fitted on the training rows only, in ``scaler_``.
- Model selection uses the validation rows when given: each head tries the values of its grid
  (``C_grid`` for the linear heads: one warm-started path, increasing C, stopped ``C_patience``
  values past the best; ``n_neighbors_grid`` for kNN; ``weight_decay_grid`` with early stopping
  for the MLP) and keeps the best by validation accuracy, ties broken by log loss. Every
  candidate's scores are in ``selection_``, the winner in ``best_params_``, and the grid
  parameter is set to it, so ``get_params()`` (and ``sklearn.base.clone``) give the chosen model.
  Without validation rows the single value ``C`` / ``n_neighbors`` / ``weight_decay`` is used and
  the MLP trains for ``max_epochs``.
- The linear heads (logreg, svm) and the MLP train in torch on ``device`` (``auto``: cuda when
  there, else cpu); the fitted model lives on the CPU.
- The heads pass scikit-learn's ``check_estimator`` (tests/test_heads.py lists the exclusions).

Head files are data, never a pickle (:mod:`featurekit.head_file`): each head gives its fitted model
as named arrays and plain values (``_model_arrays``) and rebuilds it from them (``_model_from_arrays``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.preprocessing import StandardScaler
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data
from torch import nn

from . import linear
from .errors import FeaturekitError, SettingsError
from .linear import LinearFit
from .runner import resolve_device

# 45 log-spaced C in [1e-6, 1e5], four per decade, to 3 significant digits (1e-6, 1.78e-6, 3.16e-6, ...):
# the linear-probe protocols' sweep, affordable since each C starts from the last solution
C_GRID = tuple(float(f"{C:.3g}") for C in np.logspace(-6, 5, 45))


class HeadError(FeaturekitError, ValueError):
    """A head cannot be trained on these rows (one class only, validation labels it never saw)."""


class Head(ClassifierMixin, BaseEstimator):
    """Shared fit/predict logic. Subclasses name their grid parameter and fit one candidate."""

    kind: ClassVar[str]
    grid_param: ClassVar[str]  # the parameter swept on validation; its grid is ``<grid_param>_grid``
    # parameter -> (smallest value that works, whether the bound itself works); sequences: each element
    limits: ClassVar[dict[str, tuple[float, bool]]] = {}
    auto_params: ClassVar[frozenset[str]] = frozenset()  # parameters that may also be "auto"

    def fit(self, X: np.ndarray, y: np.ndarray, X_val: np.ndarray | None = None,
            y_val: np.ndarray | None = None) -> "Head":
        """Fit on float32[N, D] / labels[N]. With validation rows, sweep the grid and keep the best:
        afterwards the grid parameter holds the chosen value (``get_params()``, ``clone``)."""
        self._check_limits()
        X, y = validate_data(self, X, y, dtype=np.float32)
        check_classification_targets(y)
        self.classes_ = np.unique(y)
        if len(self.classes_) < 2:
            raise HeadError(f"{self.kind} head: the training rows hold 1 class ({self.classes_[0]}); "
                            "a classifier needs at least 2")
        self.scaler_ = StandardScaler().fit(X) if self.standardize else None
        train = (self._scale(X), np.searchsorted(self.classes_, y))
        validation = None
        if X_val is not None:
            validation = (self._scale(validate_data(self, X_val, reset=False, dtype=np.float32)), self._targets(y_val))
        start = time.perf_counter()
        self.model_, self.history_, self.selection_, self.best_params_ = self._select(train, validation)
        self.set_params(**self.best_params_)
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

    def _select(self, train: tuple[np.ndarray, np.ndarray], validation: tuple[np.ndarray, np.ndarray] | None
                ) -> tuple[Any, list[dict], list[dict], dict]:
        """``(model, history, selection records, best params)``: every grid value (with validation
        rows) or the single value, each from :meth:`_candidates`; the best by validation accuracy, then log loss."""
        grid = list(getattr(self, f"{self.grid_param}_grid")) if validation is not None else \
            [getattr(self, self.grid_param)]
        selection, best_score, best = [], None, None
        for value, model, history, scores in self._candidates(train, validation, grid):
            selection.append({self.grid_param: value, **scores, "epochs": len(history) or None})
            score = linear.selection_score(scores)
            if best_score is None or score > best_score:
                best_score, best = score, (model, history, {self.grid_param: value})
        model, history, params = best
        return model, history, selection, params

    def _candidates(self, train, validation, grid: list) -> Iterator[tuple[Any, Any, list[dict], dict]]:
        """``(value, model, history, validation scores)`` per grid value, in order (scores: {} without validation)."""
        for value in grid:
            model, history = self._fit_one(*train, validation, value)
            yield value, model, history, (self._scores(model, validation) if validation is not None else {})

    def _check_limits(self) -> None:
        """A parameter value that cannot work is a :class:`SettingsError`, before any fitting."""
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

    def _fit_one(self, X: np.ndarray, t: np.ndarray, validation, value) -> tuple[Any, list[dict]]:
        """Fit one candidate on standardised float32[N, D] and targets int64[N] in 0..C-1."""
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
    """Validation accuracy and log loss of probabilities float64[M, C] for targets int64[M] in 0..C-1."""
    picked = np.clip(proba[np.arange(len(targets)), targets], 1e-15, 1.0)
    return {"val_accuracy": float((proba.argmax(axis=1) == targets).mean()),
            "val_log_loss": float(-np.log(picked).mean())}


# --------------------------------------------------------------------------- linear heads


class LinearHead(Head):
    """A linear head fitted by :mod:`featurekit.linear`: every class at once, L-BFGS in torch on
    ``device``. With validation rows, one path over ``C_grid`` (sorted increasing), each C
    warm-started from the last, scored on validation and stopped ``C_patience`` values past the best
    (:func:`~featurekit.linear.select_on_validation`); without, the one ``C``. ``tol``, ``max_iter``:
    the stopping rule at each C. ``model_`` is the kept :class:`~featurekit.linear.LinearFit`, on the
    CPU: ``coef`` float32[K, D], ``intercept`` float32[K] over standardised features, and for the
    SVM its inverse ``temperature``."""

    grid_param = "C"
    loss: ClassVar[str]
    limits = {"C": (0, False), "C_grid": (0, False), "tol": (0, False), "max_iter": (1, True),
              "C_patience": (1, True)}

    def _select(self, train, validation):
        device = torch.device(resolve_device(self.device))
        X, t = (torch.from_numpy(a).to(device) for a in train)
        stopping = {"tol": self.tol, "max_iter": self.max_iter}
        if validation is None:
            fit = next(linear.fit_path(X, t, [self.C], self.loss, n_classes=len(self.classes_), **stopping))
            fit = self._without_validation(X, t, fit, stopping)
            selection = [{"C": fit.C, "iterations": fit.n_iter, "passes": fit.n_passes, "converged": fit.converged}]
        else:
            X_val, t_val = (torch.from_numpy(a).to(device) for a in validation)
            path = linear.fit_path(X, t, sorted(map(float, self.C_grid)), self.loss, n_classes=len(self.classes_),
                                   **stopping)
            fit, selection = linear.select_on_validation(path, X_val, t_val, self.C_patience)
        return fit.to("cpu"), [], selection, {"C": fit.C}

    def _without_validation(self, X: torch.Tensor, t: torch.Tensor, fit: LinearFit, stopping: dict) -> LinearFit:
        """``fit`` with what its probabilities need when there are no validation rows to fit it on."""
        return fit

    def _model_proba(self, model: LinearFit, X: np.ndarray) -> np.ndarray:
        return model.predict_proba(torch.from_numpy(X)).numpy()

    def _iterations(self, model: LinearFit) -> int:
        return model.n_iter

    def _model_arrays(self):
        fit = self.model_
        scale = 1.0 if fit.temperature is None else fit.temperature  # one formula for readers: softmax(scale * s)
        return ({"coef": fit.coef.numpy(), "intercept": fit.intercept.numpy()},
                {"loss": fit.loss, "C": fit.C, "inverse_temperature": scale, "iterations": fit.n_iter,
                 "passes": fit.n_passes, "converged": fit.converged, "objective": fit.objective})

    def _model_from_arrays(self, arrays, values):
        temperature = float(values["inverse_temperature"]) if self.loss == "squared_hinge" else None
        return LinearFit(float(values["C"]), self.loss, torch.from_numpy(arrays["coef"]),
                         torch.from_numpy(arrays["intercept"]), int(values["iterations"]), float(values["passes"]),
                         bool(values["converged"]), float(values["objective"]), temperature)


class LogisticHead(LinearHead):
    """Multinomial logistic regression: scikit-learn's ``LogisticRegression(C)`` objective;
    probabilities are the softmax of the scores."""

    kind = "logreg"
    loss = "logistic"

    def __init__(self, C: float = 1.0, C_grid=C_GRID, tol: float = linear.TOL, max_iter: int = linear.MAX_ITER,
                 C_patience: int = linear.PATIENCE, device: str = "auto", standardize: bool = True):
        self.C = C
        self.C_grid = C_grid
        self.tol = tol
        self.max_iter = max_iter
        self.C_patience = C_patience
        self.device = device
        self.standardize = standardize


class LinearSVMHead(LinearHead):
    """One-vs-rest linear SVM with the squared hinge (``LinearSVC``'s default loss, intercept not
    penalised). Probabilities: the softmax of the scores times one inverse temperature, fitted on
    the validation rows (the log loss that ranks the Cs is cross-fitted, so the temperature does
    not flatter it); without validation rows, on out-of-fold scores of the training rows: ``folds``
    fits at the one C, each warm-started from the full fit."""

    kind = "svm"
    loss = "squared_hinge"
    limits = {**LinearHead.limits, "folds": (2, True)}

    def __init__(self, C: float = 1.0, C_grid=C_GRID, tol: float = linear.TOL, max_iter: int = linear.MAX_ITER,
                 C_patience: int = linear.PATIENCE, folds: int = 3, device: str = "auto", standardize: bool = True):
        self.C = C
        self.C_grid = C_grid
        self.tol = tol
        self.max_iter = max_iter
        self.C_patience = C_patience
        self.folds = folds
        self.device = device
        self.standardize = standardize

    def _without_validation(self, X, t, fit, stopping):
        scores = linear.out_of_fold_scores(X, t, fit, self.folds, **stopping)
        return replace(fit, temperature=linear.fit_temperature(scores, t))


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
    """

    kind = "knn"
    grid_param = "n_neighbors"
    limits = {"n_neighbors": (1, True), "n_neighbors_grid": (1, True), "temperature": (0, False)}

    def __init__(self, n_neighbors: int = 10, n_neighbors_grid=(1, 3, 5, 10, 20, 50), temperature: float = 0.07,
                 standardize: bool = True):
        self.n_neighbors = n_neighbors
        self.n_neighbors_grid = n_neighbors_grid
        self.temperature = temperature
        self.standardize = standardize

    def _candidates(self, train, validation, grid):
        X, t = train
        rows, targets = _unit_rows(X), t.astype(np.int64)
        ks = [int(min(value, len(X))) for value in grid]
        if validation is not None:
            closeness, nearest = _nearest(rows, _unit_rows(validation[0]), max(ks))
        for value, k in zip(grid, ks):
            scores = {} if validation is None else \
                proba_scores(self._vote_proba(closeness[:, :k], targets[nearest[:, :k]]), validation[1])
            yield value, Neighbours(rows, targets, k), [], scores

    def _model_proba(self, model: Neighbours, X: np.ndarray) -> np.ndarray:
        closeness, nearest = _nearest(model.rows, _unit_rows(X), model.k)
        return self._vote_proba(closeness, model.targets[nearest])

    def _vote_proba(self, closeness: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """float64[M, C] from the similarities float64[M, k] of each query's k neighbours and their targets."""
        k, n_classes = closeness.shape[1], len(self.classes_)
        weights = np.exp((closeness - closeness.max(axis=1, keepdims=True)) / self.temperature)
        weights *= k / weights.sum(axis=1, keepdims=True)
        votes = np.zeros((len(weights), n_classes))
        np.add.at(votes, (np.arange(len(weights))[:, None], labels), weights)
        return (votes + 1.0 / n_classes) / (k + 1)

    def _model_arrays(self):
        return {"rows": self.model_.rows, "targets": self.model_.targets}, {"k": self.model_.k}

    def _model_from_arrays(self, arrays, values):
        return Neighbours(arrays["rows"], arrays["targets"], int(values["k"]))


def _unit_rows(X: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return (X / np.maximum(norms, 1e-12)).astype(np.float32)


def _nearest(rows: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(similarity float64[M, k], index int64[M, k])`` of each unit-norm query's k most similar unit-norm
    rows, most similar first; similarities of 1024 queries at a time (bounded memory)."""
    closeness, nearest = np.empty((len(queries), k)), np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), 1024):
        similarity = queries[start:start + 1024] @ rows.T
        top = np.argpartition(-similarity, k - 1, axis=1)[:, :k] if k < similarity.shape[1] else \
            np.broadcast_to(np.arange(similarity.shape[1]), similarity.shape)
        values = np.take_along_axis(similarity, top, axis=1)
        order = np.argsort(-values, axis=1, kind="stable")
        closeness[start:start + 1024] = np.take_along_axis(values, order, axis=1)
        nearest[start:start + 1024] = np.take_along_axis(top, order, axis=1)
    return closeness, nearest


# --------------------------------------------------------------------------- MLP head


def build_mlp(in_features: int, hidden_sizes: tuple[int, ...], n_classes: int, dropout: float) -> nn.Sequential:
    """The recipe's head: (Dropout, Linear, ReLU) per hidden size, then Dropout, Linear(., C)."""
    layers: list[nn.Module] = []
    width = in_features
    for size in hidden_sizes:
        layers += [nn.Dropout(dropout), nn.Linear(width, size), nn.ReLU(inplace=True)]
        width = size
    return nn.Sequential(*layers, nn.Dropout(dropout), nn.Linear(width, n_classes))


class MLPHead(Head):
    """The recipe's MLP (Dropout 0.5, Linear(D,1000), ReLU, Dropout 0.5, Linear(1000,C)), Adam.

    With validation rows: each ``weight_decay_grid`` value trains until the validation score has
    not improved for ``patience`` epochs, and its best epoch's weights are kept. ``history_`` has
    one dict per epoch of the kept candidate: train_loss, val_accuracy, val_log_loss, seconds.
    Training runs on ``device``; the fitted module lives on the CPU. ``fit(..., views=)``: other
    views of the training rows (augmented features, float32[N, K, D]); each epoch then trains on
    one of the K + 1 views of each row, the plain one among them, drawn with the batch order's generator.
    """

    kind = "mlp"
    grid_param = "weight_decay"
    limits = {"hidden_sizes": (1, True), "dropout": (0, True), "lr": (0, False), "batch_size": (1, True),
              "max_epochs": (1, True), "patience": (1, True), "weight_decay": (0, True), "weight_decay_grid": (0, True)}
    auto_params = frozenset({"batch_size"})

    def __init__(self, hidden_sizes=(1000,), dropout: float = 0.5, lr: float = 1e-3, batch_size: int | str = "auto",
                 max_epochs: int = 50, patience: int = 3, weight_decay: float = 0.0,
                 weight_decay_grid=(0.0, 1e-4, 1e-3), device: str = "auto", seed: int = 0, standardize: bool = True):
        self.hidden_sizes = hidden_sizes
        self.dropout = dropout
        self.lr = lr
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.patience = patience
        self.weight_decay = weight_decay
        self.weight_decay_grid = weight_decay_grid
        self.device = device
        self.seed = seed
        self.standardize = standardize

    def fit(self, X: np.ndarray, y: np.ndarray, X_val: np.ndarray | None = None, y_val: np.ndarray | None = None,
            views: np.ndarray | None = None) -> "MLPHead":
        """:meth:`Head.fit`; ``views``: float32[N, K, D], K other views of each row of ``X`` (see the class)."""
        if views is not None:
            views = np.asarray(views, dtype=np.float32)
            if views.ndim != 3 or views.shape[0] != len(X) or views.shape[2] != np.shape(X)[1]:
                raise SettingsError(f"mlp head: views must be [N, K, D] = [{len(X)}, K, {np.shape(X)[1]}], "
                                    f"not {list(views.shape)}")
        self._views = views  # for _fit_one only: never kept in the fitted head
        try:
            return super().fit(X, y, X_val, y_val)
        finally:
            del self._views

    def _select(self, train, validation):
        X, t = train
        views = getattr(self, "_views", None)
        if views is not None:  # [N, K + 1, D], plain first, standardised as X was; once for every candidate
            X = np.concatenate([X[:, None], self._scale(views.reshape(-1, X.shape[1])).reshape(views.shape)], 1)
        return super()._select((X, t), validation)

    def _fit_one(self, X, t, validation, value):
        """``X``: float32[N, D], or [N, K + 1, D] with the views (:meth:`_select`)."""
        device = torch.device(resolve_device(self.device))
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.seed)  # same init and dropout masks for every candidate and run
            model = build_mlp(X.shape[-1], tuple(self.hidden_sizes), len(self.classes_), self.dropout).to(device)
            return self._train(model, torch.from_numpy(X).to(device), torch.from_numpy(t).to(device), validation, value)

    def _train(self, model: nn.Module, X: torch.Tensor, t: torch.Tensor, validation, weight_decay: float):
        """``X``: float32[N, D], or [N, V, D] views of each row, one drawn per row and epoch."""
        # fused: one kernel per step for all parameters (the step is a fifth of a CPU epoch at 2.6M weights)
        optimizer = torch.optim.Adam(model.parameters(), lr=self.lr, weight_decay=weight_decay, fused=True)
        order = torch.Generator().manual_seed(self.seed)
        history, best, best_state, stale = [], None, None, 0
        for epoch in range(self.max_epochs):
            start = time.perf_counter()
            rows = X
            if X.ndim == 3:  # this epoch's view of each row
                chosen = torch.randint(X.shape[1], (len(X),), generator=order).to(X.device)
                rows = X[torch.arange(len(X), device=X.device), chosen]
            train_loss = train_epoch(model, optimizer, rows, t, self.batch_size_for(len(X)), order)
            record = {"epoch": epoch + 1, "train_loss": train_loss, "seconds": time.perf_counter() - start}
            if validation is not None:
                record.update(self._scores(model, validation))
                score = linear.selection_score(record)
                if best is None or score > best:
                    best, stale = score, 0
                    best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
                else:
                    stale += 1
            history.append(record)
            if stale >= self.patience:
                break
        model = model.to("cpu").eval()
        if best_state is not None:
            model.load_state_dict(best_state)
        return model, history

    def batch_size_for(self, n_rows: int) -> int:
        """``batch_size``, or for ``"auto"`` the largest of 256, 128 that still gives 16 optimizer steps
        per epoch, else 64: big batches where a CPU epoch is compute-bound (5,000 x 2,560 rows: half the
        seconds of batch 64), enough steps per epoch where a set has a few hundred images."""
        if self.batch_size != "auto":
            return int(self.batch_size)
        return next((size for size in (256, 128) if n_rows // size >= 16), 64)

    @torch.no_grad()
    def _model_proba(self, model: nn.Module, X: np.ndarray) -> np.ndarray:
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        proba = [F.softmax(model(torch.from_numpy(X[i:i + 4096]).to(device)).double(), dim=1).cpu()
                 for i in range(0, len(X), 4096)]  # float64 softmax: rows sum to 1 within float64 rounding
        model.train(was_training)
        return torch.cat(proba).numpy()

    def _model_arrays(self):
        state = {name: tensor.numpy() for name, tensor in self.model_.state_dict().items()}
        return state, {"in_features": int(self.n_features_in_), "hidden_sizes": [int(s) for s in self.hidden_sizes],
                       "n_classes": len(self.classes_), "dropout": float(self.dropout)}

    def _model_from_arrays(self, arrays, values):
        model = build_mlp(int(values["in_features"]), tuple(int(s) for s in values["hidden_sizes"]),
                          int(values["n_classes"]), float(values["dropout"]))
        model.load_state_dict({name: torch.from_numpy(array) for name, array in arrays.items()})
        return model.eval()


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, X: torch.Tensor, t: torch.Tensor,
                batch_size: int, generator: torch.Generator) -> float:
    """One pass over float32[N, D] / int64[N] tensors in a random order; returns the mean loss.

    The loss is accumulated on the device and read once, so a GPU never waits per batch.
    """
    model.train()
    order = torch.randperm(len(X), generator=generator).to(X.device)
    total = torch.zeros((), device=X.device)
    for begin in range(0, len(X), batch_size):
        batch = order[begin:begin + batch_size]
        loss = F.cross_entropy(model(X[batch]), t[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach() * len(batch)
    return float(total) / len(X)


# --------------------------------------------------------------------------- registry

HEADS: dict[str, type[Head]] = {cls.kind: cls for cls in (MLPHead, LogisticHead, LinearSVMHead, KNNHead)}


def make_head(kind: str, **params) -> Head:
    """A head of ``kind`` (mlp, logreg, svm, knn). A parameter it does not take is a :class:`SettingsError`."""
    return make_heads([kind], params)[0]


def make_heads(kinds: list[str], params: dict) -> list[Head]:
    """One head per kind, each given the ``params`` it takes; a parameter none of them takes is a
    :class:`SettingsError` (an option silently ignored would make a run mean something else)."""
    unknown = [kind for kind in kinds if kind not in HEADS]
    if unknown:
        raise SettingsError(f"unknown head {unknown[0]!r} (choices: {', '.join(HEADS)})")
    accepted = {kind: HEADS[kind]().get_params() for kind in kinds}
    unused = [name for name in params if not any(name in taken for taken in accepted.values())]
    if unused:
        takes = "; ".join(f"{kind}: {', '.join(sorted(taken))}" for kind, taken in accepted.items())
        raise SettingsError(f"{' or '.join(kinds)} head takes no parameter {unused[0]!r} ({takes})")
    return [HEADS[kind](**{k: v for k, v in params.items() if k in accepted[kind]}) for kind in kinds]
