"""Linear heads: multinomial logistic regression and a one-vs-rest linear SVM, fitted by the solver.

``coef_`` float64[K, D] and ``intercept_`` float64[K] are in the caller's feature space (the
standardisation folded in: ``decision_function(X) = X @ coef_.T + intercept_``), as scikit-learn's
linear models give them; with two classes one row, the second class's scores minus the first's
(whose sign predicts), as scikit-learn's binary ``coef_`` and ``decision_function``."""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar

import numpy as np
import torch
from sklearn.utils.validation import check_is_fitted, validate_data

from ..devices import resolve_device
from . import solver
from .base import C_GRID, Head
from .selection import SELECT
from .solver import LinearFit

__all__ = ["LinearSVMHead", "LogisticHead"]


class LinearHead(Head):
    """A linear head fitted by :mod:`featurekit.heads.solver`: every class at once, in torch on
    ``device``. With validation rows, one path over ``C_grid`` (sorted increasing), each C
    warm-started from the last and solved to the relative objective gap ``sweep_tol``, scored on
    validation and stopped ``C_patience`` values past the last that changed the choice (``auto``: 3
    under the rules that rank by log loss, 5 under accuracy; :data:`~.selection.PATH_PATIENCE`,
    :func:`~featurekit.heads.solver.select_on_validation`); the kept C is then refitted from there to
    ``tol``. Without validation rows, the one ``C`` to ``tol``. ``tol`` (1e-4), ``max_iter``: the
    stopping rule at each C. ``model_`` is the kept :class:`~featurekit.heads.solver.LinearFit`, on the
    CPU: ``coef`` float32[K, D], ``intercept`` float32[K] over standardised features, and for the
    SVM its inverse ``temperature``."""

    grid_param = "C"
    loss: ClassVar[str]
    limits = {"C": (0, False), "C_grid": (0, False), "tol": (0, False), "sweep_tol": (0, False),
              "max_iter": (1, True), "C_patience": (1, True)}
    auto_params = frozenset({"C_patience"})

    def _select(self, train, validation):
        device = torch.device(resolve_device(self.device))
        X, t, weights = (None if a is None else torch.from_numpy(a).to(device) for a in train)
        stopping = {"max_iter": self.max_iter, "weights": weights, "n_classes": len(self.classes_)}
        if validation is None:
            fit = next(solver.fit_path(X, t, [self.C], self.loss, tol=self.tol, **stopping))
            fit = self._without_validation(X, t, weights, fit)
            selection = [{"C": fit.C, "iterations": fit.n_iter, "passes": fit.n_passes, "converged": fit.converged}]
            return fit.to("cpu"), [], selection, {"C": fit.C}
        X_val, t_val = (torch.from_numpy(a).to(device) for a in validation)
        fit, selection = solver.sweep(X, t, sorted(map(float, self._grid())), self.loss, X_val, t_val, tol=self.tol,
                                      sweep_tol=self.sweep_tol, select=self.select,
                                      patience=None if self.C_patience == "auto" else self.C_patience,
                                      **stopping)
        return fit.to("cpu"), [], selection, {"C": fit.C}

    def _without_validation(self, X: torch.Tensor, t: torch.Tensor, weights: torch.Tensor | None,
                            fit: LinearFit) -> LinearFit:
        """``fit`` with what its probabilities need when there are no validation rows to fit it on."""
        return fit

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """float64[N, K] scores ``X @ coef_.T + intercept_`` (two classes: float64[N], the second minus the first)."""
        check_is_fitted(self)
        X = self._scale(validate_data(self, X, reset=False, dtype=np.float32))
        scores = self.model_.decision_function(torch.from_numpy(X)).double().numpy()
        return scores[:, 1] - scores[:, 0] if len(self.classes_) == 2 else scores

    @property
    def coef_(self) -> np.ndarray:
        """float64[K, D] (two classes: [1, D]) in the caller's feature space."""
        check_is_fitted(self, "model_")
        coef = self.model_.coef.double().numpy()
        if self.scaler_ is not None:
            coef = coef / self.scaler_.scale_
        return coef[1:] - coef[:1] if len(self.classes_) == 2 else coef

    @property
    def intercept_(self) -> np.ndarray:
        """float64[K] (two classes: [1]) in the caller's feature space."""
        check_is_fitted(self, "model_")
        coef, intercept = self.model_.coef.double().numpy(), self.model_.intercept.double().numpy()
        if self.scaler_ is not None:
            intercept = intercept - (coef / self.scaler_.scale_) @ self.scaler_.mean_
        return intercept[1:] - intercept[:1] if len(self.classes_) == 2 else intercept

    def _model_proba(self, model: LinearFit, X: np.ndarray) -> np.ndarray:
        return model.predict_proba(torch.from_numpy(X)).numpy()

    def _iterations(self, model: LinearFit) -> int:
        return model.n_iter

    def _model_arrays(self):
        fit = self.model_
        scale = 1.0 if fit.temperature is None else fit.temperature  # one formula for readers: softmax(scale * s)
        return ({"coef": fit.coef.numpy(), "intercept": fit.intercept.numpy()},
                {"loss": fit.loss, "C": fit.C, "inverse_temperature": scale, "iterations": fit.n_iter,
                 "passes": fit.n_passes, "converged": fit.converged, "objective": fit.objective, "tol": fit.tol})

    def _model_from_arrays(self, arrays, values):
        temperature = float(values["inverse_temperature"]) if self.loss == "squared_hinge" else None
        return LinearFit(float(values["C"]), self.loss, torch.from_numpy(arrays["coef"]),
                         torch.from_numpy(arrays["intercept"]), int(values["iterations"]), float(values["passes"]),
                         bool(values["converged"]), float(values["objective"]), temperature,
                         float(values.get("tol", 1e-3)))  # head files before issue 21: max |gradient| 1e-3


class LogisticHead(LinearHead):
    """Multinomial logistic regression: scikit-learn's ``LogisticRegression(C)`` objective;
    probabilities are the softmax of the scores."""

    kind = "logreg"
    loss = "logistic"

    def __init__(self, C: float = 1.0, C_grid=C_GRID, tol: float = solver.TOL, sweep_tol: float = solver.SWEEP_TOL,
                 max_iter: int = solver.MAX_ITER, C_patience: int | str = "auto", select: str = SELECT,
                 class_weight: str | None = None, device: str = "auto", standardize: bool = True):
        self.C = C
        self.C_grid = C_grid
        self.tol = tol
        self.sweep_tol = sweep_tol
        self.max_iter = max_iter
        self.C_patience = C_patience
        self.select = select
        self.class_weight = class_weight
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

    def __init__(self, C: float = 1.0, C_grid=C_GRID, tol: float = solver.TOL, sweep_tol: float = solver.SWEEP_TOL,
                 max_iter: int = solver.MAX_ITER, C_patience: int | str = "auto", folds: int = 3,
                 select: str = SELECT, class_weight: str | None = None, device: str = "auto",
                 standardize: bool = True):
        self.C = C
        self.C_grid = C_grid
        self.tol = tol
        self.sweep_tol = sweep_tol
        self.max_iter = max_iter
        self.C_patience = C_patience
        self.folds = folds
        self.select = select
        self.class_weight = class_weight
        self.device = device
        self.standardize = standardize

    def _without_validation(self, X, t, weights, fit):
        scores = solver.out_of_fold_scores(X, t, fit, self.folds, weights, tol=self.tol, max_iter=self.max_iter)
        return replace(fit, temperature=solver.fit_temperature(scores, t))
