"""Linear heads: multinomial logistic regression and a one-vs-rest linear SVM, fitted by the solver."""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar

import numpy as np
import torch

from ..devices import resolve_device
from . import solver
from .base import C_GRID, Head
from .solver import LinearFit


class LinearHead(Head):
    """A linear head fitted by :mod:`featurekit.heads.solver`: every class at once, L-BFGS in torch on
    ``device``. With validation rows, one path over ``C_grid`` (sorted increasing), each C
    warm-started from the last, scored on validation and stopped ``C_patience`` values past the best
    (:func:`~featurekit.heads.solver.select_on_validation`); without, the one ``C``. ``tol``, ``max_iter``:
    the stopping rule at each C. ``model_`` is the kept :class:`~featurekit.heads.solver.LinearFit`, on the
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
            fit = next(solver.fit_path(X, t, [self.C], self.loss, n_classes=len(self.classes_), **stopping))
            fit = self._without_validation(X, t, fit, stopping)
            selection = [{"C": fit.C, "iterations": fit.n_iter, "passes": fit.n_passes, "converged": fit.converged}]
        else:
            X_val, t_val = (torch.from_numpy(a).to(device) for a in validation)
            path = solver.fit_path(X, t, sorted(map(float, self.C_grid)), self.loss, n_classes=len(self.classes_),
                                   **stopping)
            fit, selection = solver.select_on_validation(path, X_val, t_val, self.C_patience)
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

    def __init__(self, C: float = 1.0, C_grid=C_GRID, tol: float = solver.TOL, max_iter: int = solver.MAX_ITER,
                 C_patience: int = solver.PATIENCE, device: str = "auto", standardize: bool = True):
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

    def __init__(self, C: float = 1.0, C_grid=C_GRID, tol: float = solver.TOL, max_iter: int = solver.MAX_ITER,
                 C_patience: int = solver.PATIENCE, folds: int = 3, device: str = "auto", standardize: bool = True):
        self.C = C
        self.C_grid = C_grid
        self.tol = tol
        self.max_iter = max_iter
        self.C_patience = C_patience
        self.folds = folds
        self.device = device
        self.standardize = standardize

    def _without_validation(self, X, t, fit, stopping):
        scores = solver.out_of_fold_scores(X, t, fit, self.folds, **stopping)
        return replace(fit, temperature=solver.fit_temperature(scores, t))
