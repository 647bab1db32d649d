"""Stage 7: classifier heads on cached features, one scikit-learn-style interface.

Every head follows the estimator rules: ``__init__`` only stores parameters; ``fit(X, y, X_val=None,
y_val=None)`` returns ``self``; fitted attributes end in ``_``; ``predict`` returns labels of
``classes_``; ``predict_proba`` returns float64[N, len(classes_)], columns in ``classes_`` order.
``X`` is float32[N, D] (concatenated backbone features), ``y`` int64[N].

- Standardisation (per feature mean/std) is fitted on the training rows only, in ``scaler_``.
- Model selection uses the validation rows when given: each head tries every value of its grid
  (``C_grid`` for the linear heads, ``n_neighbors_grid`` for kNN, ``weight_decay_grid`` with early
  stopping for the MLP) and keeps the best by validation accuracy, ties broken by log loss. Every
  candidate's scores are in ``selection_``, the winner in ``best_params_``, and the grid
  parameter is set to it, so ``get_params()`` (and ``sklearn.base.clone``) give the chosen model.
  Without validation rows the single value ``C`` / ``n_neighbors`` / ``weight_decay`` is used and
  the MLP trains for ``max_epochs``.
- The heads pass scikit-learn's ``check_estimator`` (tests/test_heads.py lists the exclusions).

A head file (:func:`save_head`) is one joblib pickle of ``{"format", "format_version", "kind",
"head", "metadata"}``; the MLP's module is stored on the CPU. Being a pickle, load only files you trust.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import joblib
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.calibration import CalibratedClassifierCV
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data
from torch import nn

from .errors import FeaturekitError, SettingsError, first_line
from .files import atomic_output

HEAD_FORMAT = "featurekit.head"
HEAD_FORMAT_VERSION = 1


class HeadFileError(FeaturekitError):
    """A head file cannot be read or is not a featurekit head. One line naming the file."""


class HeadError(FeaturekitError, ValueError):
    """A head cannot be trained on these rows (one class only, too few rows for calibration)."""


class Head(ClassifierMixin, BaseEstimator):
    """Shared fit/predict logic. Subclasses name their grid parameter and fit one candidate."""

    kind: ClassVar[str]
    grid_param: ClassVar[str]  # the parameter swept on validation; its grid is ``<grid_param>_grid``
    # parameter -> (smallest value that works, whether the bound itself works); sequences: each element
    limits: ClassVar[dict[str, tuple[float, bool]]] = {}

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
        grid = list(getattr(self, f"{self.grid_param}_grid")) if validation is not None else []
        start = time.perf_counter()
        self.selection_, best_score = [], None
        for value in grid or [getattr(self, self.grid_param)]:
            model, history = self._fit_one(*train, validation, value)
            scores = self._scores(model, validation) if validation is not None else {}
            self.selection_.append({self.grid_param: value, **scores, "epochs": len(history) or None})
            score = (scores.get("val_accuracy", 0.0), -scores.get("val_log_loss", 0.0))
            if best_score is None or score > best_score:
                best_score, self.model_, self.history_ = score, model, history
                self.best_params_ = {self.grid_param: value}
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

    def _check_limits(self) -> None:
        """A parameter value that cannot work is a :class:`SettingsError`, before any fitting."""
        for name, (low, inclusive) in self.limits.items():
            value = getattr(self, name)
            for item in value if isinstance(value, (tuple, list)) else [value]:
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
        proba = self._model_proba(model, X_val)
        picked = np.clip(proba[np.arange(len(t_val)), t_val], 1e-15, 1.0)
        return {"val_accuracy": float((proba.argmax(axis=1) == t_val).mean()),
                "val_log_loss": float(-np.log(picked).mean())}

    def _fit_one(self, X: np.ndarray, t: np.ndarray, validation, value) -> tuple[Any, list[dict]]:
        """Fit one candidate on standardised float32[N, D] and targets int64[N] in 0..C-1."""
        raise NotImplementedError

    def _model_proba(self, model: Any, X: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _iterations(self, model: Any) -> int | None:
        """Solver iterations of the kept candidate (``n_iter_``), for heads with an iteration limit."""
        return None


# --------------------------------------------------------------------------- scikit-learn heads


class _SklearnHead(Head):
    def _model_proba(self, model: Any, X: np.ndarray) -> np.ndarray:
        return _full_proba(model.predict_proba(X), model.classes_, len(self.classes_))


def _full_proba(proba: np.ndarray, model_classes: np.ndarray, n_classes: int) -> np.ndarray:
    """Columns for every target 0..C-1, even those a sub-model never saw (zero probability).

    Rows are renormalised in float64: sklearn returns float32 probabilities for float32 features.
    """
    full = np.zeros((len(proba), n_classes))
    full[:, model_classes] = proba
    return full / full.sum(axis=1, keepdims=True)


class LogisticHead(_SklearnHead):
    """Multinomial logistic regression (lbfgs), C swept on validation."""

    kind = "logreg"
    grid_param = "C"
    limits = {"C": (0, False), "C_grid": (0, False), "max_iter": (1, True)}

    def __init__(self, C: float = 1.0, C_grid=(0.001, 0.01, 0.1, 1.0, 10.0), max_iter: int = 2000,
                 standardize: bool = True):
        self.C = C
        self.C_grid = C_grid
        self.max_iter = max_iter
        self.standardize = standardize

    def _fit_one(self, X, t, validation, value):
        return LogisticRegression(C=value, max_iter=self.max_iter).fit(X, t), []

    def _iterations(self, model: LogisticRegression) -> int:
        return int(np.max(model.n_iter_))


class LinearSVMHead(_SklearnHead):
    """Linear SVM with probabilities from sigmoid calibration on internal cross-validation folds."""

    kind = "svm"
    grid_param = "C"
    limits = {"C": (0, False), "C_grid": (0, False), "max_iter": (1, True), "folds": (2, True)}

    def __init__(self, C: float = 1.0, C_grid=(0.0001, 0.001, 0.01, 0.1, 1.0), max_iter: int = 5000, folds: int = 3,
                 dual: bool = True, standardize: bool = True):
        self.C = C
        self.C_grid = C_grid
        self.max_iter = max_iter
        self.folds = folds
        self.dual = dual  # liblinear's dual solver: 6x faster than the primal one that "auto" picked on caltech101
        self.standardize = standardize

    def _fit_one(self, X, t, validation, value):
        smallest = int(np.bincount(t).min())
        if smallest < 2:
            raise HeadError("svm head: calibration needs at least 2 training rows per class; use --head logreg or knn")
        svm = LinearSVC(C=value, max_iter=self.max_iter, dual=self.dual, random_state=0)  # liblinear shuffles
        calibrated = CalibratedClassifierCV(svm, method="sigmoid", cv=min(self.folds, smallest), ensemble=False)
        return calibrated.fit(X, t), []

    def _iterations(self, model: CalibratedClassifierCV) -> int:
        return int(max(np.max(c.estimator.n_iter_) for c in model.calibrated_classifiers_))


@dataclass(frozen=True)
class Neighbours:
    """A fitted kNN: unit-norm training rows float32[N, D], their targets int64[N], and k."""

    rows: np.ndarray
    targets: np.ndarray
    k: int


class KNNHead(Head):
    """k nearest neighbours by cosine similarity; k swept on validation.

    Each of the k neighbours votes with weight ``exp(similarity / temperature)`` (the weighted kNN
    of DINO's evaluation), the votes scaled to sum to k, and the class probabilities are the
    additively smoothed vote shares ``(votes + 1) / (k + C)``: never exactly 0 or 1, so a kNN that
    merely ties the others on accuracy cannot win selection on log loss with hard 0/1 votes, and
    probabilities change smoothly with the features (no singular weight at distance 0).
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

    def _fit_one(self, X, t, validation, value):
        return Neighbours(_unit_rows(X), t.astype(np.int64), int(min(value, len(X)))), []

    def _model_proba(self, model: Neighbours, X: np.ndarray) -> np.ndarray:
        n_classes, k = len(self.classes_), model.k
        queries, proba = _unit_rows(X), np.empty((len(X), len(self.classes_)))
        for start in range(0, len(queries), 1024):  # similarities of 1024 queries at a time: bounded memory
            similarity = queries[start:start + 1024] @ model.rows.T
            nearest = np.argpartition(-similarity, k - 1, axis=1)[:, :k] if k < similarity.shape[1] else \
                np.broadcast_to(np.arange(similarity.shape[1]), similarity.shape)
            closeness = np.take_along_axis(similarity, nearest, axis=1).astype(np.float64)
            weights = np.exp((closeness - closeness.max(axis=1, keepdims=True)) / self.temperature)
            weights *= k / weights.sum(axis=1, keepdims=True)
            votes = np.zeros((len(weights), n_classes))
            np.add.at(votes, (np.arange(len(weights))[:, None], model.targets[nearest]), weights)
            proba[start:start + len(votes)] = (votes + 1.0) / (k + n_classes)
        return proba


def _unit_rows(X: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return (X / np.maximum(norms, 1e-12)).astype(np.float32)


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

    def __init__(self, hidden_sizes=(1000,), dropout: float = 0.5, lr: float = 1e-3, batch_size: int = 64,
                 max_epochs: int = 50, patience: int = 5, weight_decay: float = 0.0,
                 weight_decay_grid=(0.0, 1e-4, 1e-3), device: str = "cpu", seed: int = 0, standardize: bool = True):
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

    def _fit_one(self, X, t, validation, value):
        device = torch.device(self.device)
        views = getattr(self, "_views", None)
        if views is not None:  # [N, K + 1, D], plain first, standardised as X was
            views = np.concatenate([X[:, None], self._scale(views.reshape(-1, X.shape[1])).reshape(views.shape)], 1)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.seed)  # same init and dropout masks for every candidate and run
            model = build_mlp(X.shape[1], tuple(self.hidden_sizes), len(self.classes_), self.dropout).to(device)
            inputs = torch.from_numpy(X if views is None else views).to(device)
            return self._train(model, inputs, torch.from_numpy(t).to(device), validation, value)

    def _train(self, model: nn.Module, X: torch.Tensor, t: torch.Tensor, validation, weight_decay: float):
        """``X``: float32[N, D], or [N, V, D] views of each row, one drawn per row and epoch."""
        optimizer = torch.optim.Adam(model.parameters(), lr=self.lr, weight_decay=weight_decay)
        order = torch.Generator().manual_seed(self.seed)
        history, best, best_state, stale = [], None, None, 0
        for epoch in range(self.max_epochs):
            start = time.perf_counter()
            rows = X
            if X.ndim == 3:  # this epoch's view of each row
                chosen = torch.randint(X.shape[1], (len(X),), generator=order).to(X.device)
                rows = X[torch.arange(len(X), device=X.device), chosen]
            train_loss = train_epoch(model, optimizer, rows, t, self.batch_size, order)
            record = {"epoch": epoch + 1, "train_loss": train_loss, "seconds": time.perf_counter() - start}
            if validation is not None:
                record.update(self._scores(model, validation))
                score = (record["val_accuracy"], -record["val_log_loss"])
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

    @torch.no_grad()
    def _model_proba(self, model: nn.Module, X: np.ndarray) -> np.ndarray:
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        proba = [F.softmax(model(torch.from_numpy(X[i:i + 4096]).to(device)).double(), dim=1).cpu()
                 for i in range(0, len(X), 4096)]  # float64 softmax: rows sum to 1 within float64 rounding
        model.train(was_training)
        return torch.cat(proba).numpy()


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


# --------------------------------------------------------------------------- registry and files

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


def save_head(path: str | os.PathLike, head: Head, metadata: dict) -> Path:
    """Write a fitted head and its metadata to one file, atomically (temporary name, rename)."""
    check_is_fitted(head, "model_")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as temporary:
        joblib.dump({"format": HEAD_FORMAT, "format_version": HEAD_FORMAT_VERSION, "kind": head.kind,
                     "head": head, "metadata": metadata}, temporary)
    return path


def load_head(path: str | os.PathLike) -> tuple[Head, dict]:
    """``(head, metadata)`` from a file written by :func:`save_head`. Raises :class:`HeadFileError`."""
    path = Path(path)
    if not path.is_file():
        raise HeadFileError(f"{path}: no such head file")
    try:
        content = joblib.load(path)
    except Exception as error:
        raise HeadFileError(f"{path}: not a readable head file ({type(error).__name__}: {first_line(error)})") from None
    if not isinstance(content, dict) or content.get("format") != HEAD_FORMAT:
        raise HeadFileError(f"{path}: not a featurekit head file")
    if content["format_version"] > HEAD_FORMAT_VERSION:
        raise HeadFileError(f"{path}: head format {content['format_version']} is newer than this featurekit reads "
                            f"({HEAD_FORMAT_VERSION})")
    return content["head"], content["metadata"]
