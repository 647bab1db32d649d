"""Linear heads in torch: every class at once, warm-started along a path of C values, solved to a stated accuracy.

Two losses, both fitted on standardised features ``X`` float32[N, D] (a tensor on the device that
does the work: cuda when there, cpu otherwise) and targets ``y`` int64[N] in ``0..K-1``. The
coefficients are ``W`` float32[K, D] and ``b`` float32[K]; decision scores are ``X @ W.T + b``.
``C`` is scikit-learn's: the intercept is not penalised, and the objective below is scikit-learn's
divided by ``C * N`` (same minimiser, gradients of order one whatever N and C)::

    logistic:       (1/N) sum_i w_i CE(softmax(s_i), y_i)                 + ||W||^2 / (2 C N)
    squared_hinge:  (1/N) sum_i w_i sum_k max(0, 1 - t_ik s_ik)^2         + ||W||^2 / (2 C N)
                    with t_ik = +1 if y_i = k else -1; row weights w_i = 1 (or class_weight's, mean 1)

- ``logistic`` is ``sklearn.linear_model.LogisticRegression(C=C)`` (multinomial, lbfgs).
- ``squared_hinge`` is one-vs-rest, ``sklearn.svm.LinearSVC(C=C)`` with its default loss, except
  that liblinear also penalises the intercept (as a feature of value ``intercept_scaling``). We take
  squared hinge one-vs-rest rather than Crammer-Singer because it is differentiable with a Lipschitz
  gradient, and it is LinearSVC's default, so its figures compare with the former svm head.

**Stopping rule**, per C and per block (logistic: one; squared hinge: one per class): the bound
``||dF/dW||^2 / (2 penalty) + sum_k (dF/db_k)^2 / (2 h_bk)`` is at most ``tol * min(F, F_null - F)``
(:meth:`~._objective.Problem.gap`, :meth:`~._objective.Problem.threshold`): the first term is the
duality gap at the dual point the scores give, an upper bound of ``F - F*`` (penalty = 1 / (C N) is
the objective's least curvature), the second the intercept's Newton decrement; ``F_null`` is the
objective at W = 0 with the best intercept. So ``tol`` is the relative accuracy of the objective,
and of the part of it the features explain (at small C, where ``F*`` is nearly ``F_null``, a
relative test on F alone took W = 0 for the solution), the same at every C, cold or warm.
``LinearFit.converged`` is True only when the rule held; ``max_iter`` iterations or no step that
lowers the objective in the features' precision leave it False. (An
absolute gradient test, as scikit-learn's ``gtol`` on this same normalised objective, loosens like
``C N tol^2`` in objective terms: at C = 1 our former rule stopped hymenoptera's fit after 3
iterations at 30 times the optimal objective, "converged".)

Solvers: L-BFGS (memory ``history``, one memory and step length per block, whose converged classes
then drop out of the products with X), with a diagonal preconditioner (the Hessian's diagonal at
each C's start, estimated on at most 2,048 evenly spaced rows). Each iteration takes two products
with X, ``X @ dW.T`` along the search direction and the gradient ``dL/dS.T @ X``: the line search
(Armijo by quadratic backtracking, or Hager and Zhang's approximate Wolfe test where float32
rounding flattens the objective, then one secant step on the slope) and a Newton refit of the
intercept alone move along the scores, which costs no product with X. Squared hinge on up to
8,192 rows at large C, where L-BFGS takes thousands of iterations: active-set Newton steps with an
exact line search, in float64 (:mod:`._newton`); above 4,096 rows only once L-BFGS has taken 30
iterations at a C of the path (:func:`_solve`). Along a path each C starts from the better of the
previous solution and the secant extrapolation of the last two in log C; the first C starts from
W = 0 with the intercept at its optimum for W = 0.

Memory: X stays one tensor, never copied; the work arrays are [N, K] (scores) and [K, D] (the
coefficients, L-BFGS memory), plus the squares of the preconditioner's row sample; the squared
hinge's Newton steps add X in float64 and its Gram matrix (float64[N, N], N <= 8,192: 512 MiB).

Probabilities: logistic, softmax of the scores. Squared hinge, softmax of the scores times one
fitted inverse temperature (:func:`fit_temperature`), fitted on rows that were not used to fit W:
the validation rows, where :func:`select_on_validation` scores each C by a *cross-fitted* log loss
(:func:`cross_fitted_log_loss`), or, with no validation rows, out-of-fold training scores
(:func:`out_of_fold_scores`, a few warm-started fits at one C).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch

from . import selection
from ._calibration import accuracies, cross_fitted_log_loss, fit_temperature, log_loss
from ._newton import GRAM_ROWS, LBFGS_FIRST, NEWTON_FIRST_ROWS, affordable, newton
from ._objective import LOSSES, Loss, Point, Problem, Trial, check_problem, where_blocks

__all__ = ["LOSSES", "MAX_ITER", "SWEEP_TOL", "TOL", "LinearFit", "Loss", "cross_fitted_log_loss",
           "fit_path", "fit_temperature", "log_loss", "objective", "out_of_fold_scores", "select_on_validation",
           "sweep", "validation_scores"]

_ARMIJO = 1e-4
TOL = 1e-4  # default stopping rule of fit_path: the relative objective gap it allows (module docstring)
SWEEP_TOL = 1e-2  # the heads' sweeps: each C to 1%, then the kept C refitted to TOL (docs/heads.md: measured)
MAX_ITER = 500  # default iterations per C


@dataclass(frozen=True)
class LinearFit:
    """One solution of the path. Tensors live on the device of the features they were fitted on."""

    C: float
    loss: str
    coef: torch.Tensor  # float32[K, D]
    intercept: torch.Tensor  # float32[K]
    n_iter: int  # iterations at this C: L-BFGS iterations and (squared hinge) Newton steps
    n_passes: float  # products with X at this C, in units of one product with all K classes (the cost)
    converged: bool  # the stopping rule held at tol (not max_iter, not stalled in rounding)
    objective: float  # the normalised objective above, at (coef, intercept)
    temperature: float | None = None  # inverse temperature for squared-hinge probabilities (None: not fitted)
    tol: float = TOL  # the stopping rule it was fitted to

    def to(self, device: torch.device | str) -> "LinearFit":
        """The same fit with its tensors on ``device``."""
        return replace(self, coef=self.coef.to(device), intercept=self.intercept.to(device))

    def decision_function(self, X: torch.Tensor) -> torch.Tensor:
        """float32[M, K] scores of standardised features float32[M, D]."""
        return torch.addmm(self.intercept, X.to(self.coef), self.coef.T)

    def predict_proba(self, X: torch.Tensor) -> torch.Tensor:
        """float64[M, K]: softmax of the scores (times ``temperature`` for squared hinge)."""
        scores = self.decision_function(X).double()
        if self.loss == "squared_hinge":
            if self.temperature is None:
                raise ValueError("squared-hinge fit has no temperature: fit one (fit_temperature) before predict_proba")
            scores = scores * self.temperature
        return torch.softmax(scores, dim=1)


def objective(X: torch.Tensor, y: torch.Tensor, coef: torch.Tensor, intercept: torch.Tensor, C: float,
              loss: Loss, weights: torch.Tensor | None = None) -> float:
    """The normalised objective of the module docstring at ``coef`` float[K, D], ``intercept`` float[K]."""
    K = check_problem(X, y, loss, len(coef), weights)
    problem = Problem(X, y, K, loss, weights)
    problem.penalty = 1.0 / (C * len(X))
    return float(problem.value(problem.point(torch.cat([coef, intercept[:, None]], dim=1).to(X), False)).sum())


def _lbfgs(problem: Problem, point: Point, tol: float, max_iter: int, history: int) -> tuple[Point, int, bool]:
    """Minimise ``problem`` from ``point``; returns (solution, iterations, converged).

    Each iteration reads X twice: once for the scores' rate of change along the search direction
    (the line search then moves along the scores, at no further cost) and once for the gradient.
    """
    point = problem.with_gradient(point)
    noise = 10 * torch.finfo(point.theta.dtype).eps  # relative rounding of the objective (rows summed in float64)
    precondition = problem.preconditioner(point)
    pairs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (s, y, 1 / s'y per block, 0: unusable)
    stalled = torch.zeros(problem.blocks, dtype=torch.bool, device=point.theta.device)
    for iteration in range(max_iter):
        done = problem.gap(point) <= problem.threshold(problem.value(point), tol)
        if bool((done | stalled).all()):
            return point, iteration, bool(done.all())
        direction = -_two_loop(problem, point.grad, pairs, precondition)
        # rounding can make a direction uphill: take the preconditioned gradient there instead
        uphill = problem.dot(point.grad, direction) >= 0
        direction = torch.where(problem.on_rows(uphill) > 0, -precondition * point.grad, direction)
        direction *= problem.on_rows(~(done | stalled))  # finished blocks stay where they are
        # one-vs-rest: once most classes have converged, products with X are taken for the others only
        moving = torch.nonzero(~(done | stalled))[:, 0] if problem.blocks > 1 else None
        moving = None if moving is not None and len(moving) == problem.blocks else moving
        trial, stalled_now = _line_search(problem, point, direction, problem.scores(direction, moving),
                                          done | stalled, noise)
        stalled |= stalled_now
        trial = _refit_intercept(problem, trial, done | stalled)
        trial.grad = problem.gradient(trial.theta, trial.dscores, moving, point.grad)
        s, y_ = trial.theta - point.theta, trial.grad - point.grad
        sy = problem.dot(s, y_)
        usable = sy > 1e-12 * (problem.dot(s, s) * problem.dot(y_, y_)).sqrt()
        pairs = (pairs + [(s, y_, torch.where(usable, 1.0 / sy, torch.zeros_like(sy)))])[-history:]
        point = trial
    return point, max_iter, bool((problem.gap(point) <= problem.threshold(problem.value(point), tol)).all())


def _line_search(problem: Problem, point: Point, direction: torch.Tensor, direction_scores: torch.Tensor,
                 finished: torch.Tensor, noise: float) -> tuple[Point, torch.Tensor]:
    """A step per block along ``direction``; returns the new point (gradient not yet computed) and the
    blocks where no step passed (left in place). Trials need no product with X: they move along the
    scores, and the penalty is a quadratic in the step.

    From step 1: backtrack by quadratic interpolation until Armijo's test passes, or Hager and
    Zhang's approximate Wolfe test where the objective is flat within rounding; then, where the
    slope is still steep, one secant step on the slope, kept where it lowers the objective (a third
    fewer iterations on caltech101 features).
    """
    W, dW = point.theta[:, :-1], direction[:, :-1]
    along, across = problem.dot(W, dW), problem.dot(dW, dW)

    def at(step: torch.Tensor) -> Trial:
        scores = point.scores + problem.on_columns(step) * direction_scores
        loss, dscores = problem.terms(scores)
        norm2 = point.norm2 + step * (2 * along + step * across)
        slope = problem.score_slope(dscores, direction_scores) + problem.penalty * (along + step * across)
        return Trial(step, scores, dscores, loss, norm2, loss + 0.5 * problem.penalty * norm2, slope)

    value = problem.value(point)
    slope = problem.score_slope(point.dscores, direction_scores) + problem.penalty * along
    accepted = finished.clone()
    trial = at(torch.ones_like(slope))
    for _ in range(30):
        armijo = trial.value <= value + _ARMIJO * trial.step * slope
        flat = (trial.value <= value + noise * value.abs()) & (trial.slope <= -0.8 * slope)
        accepted |= armijo | flat
        if bool(accepted.all()):
            break
        step = trial.step
        quadratic = -slope * step * step / (2 * (trial.value - value - slope * step))
        trial = at(torch.where(accepted, step, torch.minimum(torch.maximum(quadratic, 0.1 * step), 0.5 * step)))
    else:
        return _settle(problem, point, direction, at(torch.where(accepted, trial.step, 0.0))), ~accepted
    steep = (trial.slope.abs() > 0.2 * slope.abs()) & ~finished
    if bool(steep.any()):
        step = trial.step
        refined = at(torch.where(steep, (step * slope / (slope - trial.slope)).clamp(0.1 * step, 10 * step), step))
        trial = where_blocks(problem, refined.value < trial.value, refined, trial)
    return _settle(problem, point, direction, trial), ~accepted


def _settle(problem: Problem, point: Point, direction: torch.Tensor, trial: Trial) -> Point:
    """The point that ``trial`` stands for (its norm computed afresh, so rounding cannot accumulate)."""
    theta = point.theta + problem.on_rows(trial.step) * direction
    return Point(theta, trial.scores, trial.dscores, trial.loss, problem.norm2(theta), None)


def _refit_intercept(problem: Problem, point: Point, finished: torch.Tensor, steps: int = 2) -> Point:
    """``point`` with its intercept moved by Newton steps for b alone (gradient not computed).

    The intercept's curvature, net of its coupling with W, is far below the Hessian's diagonal in b
    (on caltech101 features, L-BFGS took twice the iterations with b lagging W); b alone is cheap
    to optimise, since shifting b shifts the scores' columns and leaves the penalty: no product
    with X. Logistic: the K x K Hessian of the softmax in b (its null direction, all b equal, is
    projected out); squared hinge: each class's own curvature. Kept per block where the loss falls.
    """
    moved = point
    total = torch.zeros(point.theta.shape[0], dtype=point.theta.dtype, device=point.theta.device)
    for _ in range(steps):
        gradient = moved.dscores.sum(dim=0)  # d objective / d b, float[K]
        if problem.loss == "logistic":
            p = torch.softmax(moved.scores, dim=1)
            weighted = p if problem.weights is None else p * problem.weights[:, None]
            hessian = (torch.diag(weighted.sum(dim=0)) - weighted.T @ p).double() / problem.N
            hessian += torch.eye(len(hessian), dtype=hessian.dtype, device=hessian.device) * 1e-9
            shift = -torch.linalg.solve(hessian, gradient.double())
            shift = (shift - shift.mean()).to(point.theta.dtype)
        else:
            curvature = problem.intercept_curvature(moved.scores, moved.dscores)
            shift = torch.where(curvature > 0, -gradient / curvature.clamp_min(1e-12), 0.0)
            shift = torch.where(finished, 0.0, shift)
        scores = moved.scores + shift
        loss, dscores = problem.terms(scores)
        better = loss < moved.loss
        if not bool(better.any()):
            break
        total += torch.where(better, shift, 0.0) if problem.blocks > 1 else shift
        moved = where_blocks(problem, better, replace(moved, scores=scores, dscores=dscores, loss=loss), moved)
    if moved is point:
        return point
    theta = point.theta.clone()
    theta[:, -1] += total
    return replace(moved, theta=theta)


def _two_loop(problem: Problem, grad: torch.Tensor, pairs: list, precondition: torch.Tensor) -> torch.Tensor:
    """H @ grad, per block, for the L-BFGS inverse-Hessian estimate with initial matrix gamma * precondition."""
    q = grad.clone()
    alphas = []
    for s, y_, rho in reversed(pairs):
        alpha = rho * problem.dot(s, q)
        q -= problem.on_rows(alpha) * y_
        alphas.append(alpha)
    if pairs:
        s, y_, rho = pairs[-1]
        gamma = torch.where(rho > 0, 1.0 / (rho * problem.dot(y_, precondition * y_)).clamp_min(1e-300), 1.0)
        q *= precondition * problem.on_rows(gamma)  # s'y / y'Py: the scale of the last step
    else:
        q *= precondition
    for (s, y_, rho), alpha in zip(pairs, reversed(alphas)):
        beta = rho * problem.dot(y_, q)
        q += problem.on_rows(alpha - beta) * s
    return q


# --------------------------------------------------------------------------- path


def fit_path(X: torch.Tensor, y: torch.Tensor, Cs: Sequence[float], loss: Loss, *, n_classes: int | None = None,
             tol: float = TOL, max_iter: int = MAX_ITER, history: int = 10, init: LinearFit | None = None,
             weights: torch.Tensor | None = None) -> Iterator[LinearFit]:
    """Yield one :class:`LinearFit` per C, in the order given, each warm-started from the previous.

    ``X`` float32[N, D] standardised features on the device to use (float64 works too), ``y``
    int64[N] on the same device, in ``0..n_classes-1`` (default ``y.max() + 1``); ``weights``
    float[N] > 0: row weights (class_weight), or None. Give ``Cs`` increasing: small-C solutions are
    near zero and cheap, and each is a good start for the next. ``tol``, ``max_iter``: the stopping
    rule of the module docstring, per C. ``init``: a solution to start the first C from (e.g. the
    full-data fit, for fold fits). A generator, so the caller can score each C and stop early
    (:func:`select_on_validation`).
    """
    K = check_problem(X, y, loss, n_classes, weights)
    if any(not C > 0 for C in Cs):
        raise ValueError(f"every C must be positive, got {list(Cs)}")
    problem = Problem(X, y, K, loss, weights)
    problem.set_null()
    theta = problem.initial(K, X.shape[1]) if init is None else torch.cat([init.coef, init.intercept[:, None]], 1)
    last: list[tuple[float, Point]] = []  # (log C, solution) of the last two Cs, at the last C's penalty
    schedule = [(float(C), True) for C in Cs]
    if loss == "squared_hinge" and init is None and schedule and len(X) <= GRAM_ROWS and \
            schedule[0][0] * len(X) >= 1 and not affordable(problem, torch.full((K,), len(X))):
        # a cold squared-hinge fit on many rows at a large C (C N >= 1: the curvature of the data, up to ~100 on
        # standardised features, outweighs the penalty's 1 / (C N)): Newton steps from W = 0 (every row in every
        # margin) cost too much, and L-BFGS alone crawls (caltech101, C = 100: 500 iterations, not converged);
        # climb to the first C from 1000 times smaller (2 per decade). A path from a small C needs no climb.
        schedule = [(schedule[0][0] * 10 ** (-k / 2), False) for k in range(6, 0, -1)] + schedule
    carried = [0, 0.0]  # iterations and passes of the climb, counted in the first C's
    for C, wanted in schedule:
        problem.passes, old_penalty, problem.penalty = carried[1], problem.penalty, 1.0 / (C * len(X))
        if last:
            last = [(log_C, problem.at_penalty(solution, old_penalty)) for log_C, solution in last]
            start = _warm_start(problem, last, math.log(C))
        else:
            start = problem.point(theta)
        rule = tol if wanted else max(tol, SWEEP_TOL)  # the climb: starts only
        solution, n_iter, converged = _solve(problem, start, rule, max_iter - carried[0], history)  # the climb's
        last = last[-1:] + [(math.log(C), solution)]  # iterations count in the first C's
        n_iter, carried = n_iter + carried[0], ([carried[0] + n_iter, problem.passes] if not wanted else [0, 0.0])
        if wanted:
            yield LinearFit(C, loss, solution.theta[:, :-1].clone(), solution.theta[:, -1].clone(), n_iter,
                            problem.passes, converged, float(problem.value(solution).sum()), tol=tol)


def _solve(problem: Problem, start: Point, tol: float, budget: int, history: int) -> tuple[Point, int, bool]:
    """(solution, iterations, converged) at the problem's current C, from ``start``. Squared hinge:
    Newton steps where they are affordable (:mod:`._newton`), L-BFGS where they are not; above
    ``NEWTON_FIRST_ROWS`` rows L-BFGS first, Newton after ``LBFGS_FIRST`` iterations, and Newton first
    at every later C of the path."""
    n_iter, converged, handed_over = 0, False, True
    if problem.loss == "squared_hinge":
        if problem.N > NEWTON_FIRST_ROWS and not problem.newton_first:
            start, n_iter, converged = _lbfgs(problem, start, tol, min(budget, LBFGS_FIRST), history)
            if converged:
                return start, n_iter, True
            problem.newton_first = True  # the Cs that follow are larger: Newton only gets cheaper there
        start, more, converged, handed_over = newton(problem, start, tol, budget - n_iter)
        n_iter += more
    if handed_over:
        start, more, converged = _lbfgs(problem, start, tol, budget - n_iter, history)
        n_iter += more
    return start, n_iter, converged


def _warm_start(problem: Problem, last: list[tuple[float, Point]], log_C: float) -> Point:
    """The point to start the next C from: per block, the better of the last solution and the secant
    extrapolation of the last two solutions in log C. The guess's scores are extrapolated too (scores
    are linear in theta), so comparing costs no product with X; its gradient costs one, if it is kept."""
    log_C1, solution = last[-1]
    if len(last) < 2:
        return solution
    log_C0, before = last[0]
    step = (log_C - log_C1) / (log_C1 - log_C0)
    theta = solution.theta + (solution.theta - before.theta) * step
    scores = solution.scores + (solution.scores - before.scores) * step
    loss, dscores = problem.terms(scores)
    guess = Point(theta, scores, dscores, loss, problem.norm2(theta), None)
    better = problem.value(guess) < problem.value(solution)
    if not bool(better.any()):
        return solution
    return where_blocks(problem, better, problem.with_gradient(guess), problem.with_gradient(solution))


# --------------------------------------------------------------------------- probabilities and selection


def out_of_fold_scores(X: torch.Tensor, y: torch.Tensor, fit: LinearFit, folds: int = 3,
                       weights: torch.Tensor | None = None, **options) -> torch.Tensor:
    """float32[N, K] scores of every training row by a fit at ``fit.C`` on the other folds (rows
    ``i % folds``), each warm-started from ``fit``: for a temperature when there are no validation
    rows. ``options``: :func:`fit_path`'s tol, max_iter, history."""
    fold = torch.arange(len(y), device=y.device) % folds
    scores = torch.empty(len(y), len(fit.coef), dtype=X.dtype, device=X.device)
    for f in range(folds):
        rest = fold != f
        fold_fit = next(fit_path(X[rest], y[rest], [fit.C], fit.loss, n_classes=len(fit.coef), init=fit,
                                 weights=None if weights is None else weights[rest], **options))
        scores[fold == f] = fold_fit.decision_function(X[fold == f])
    return scores


def validation_scores(fit: LinearFit, X_val: torch.Tensor, y_val: torch.Tensor) -> dict[str, float]:
    """Accuracy, balanced accuracy (mean per-class recall over the classes present) and log loss of
    ``fit`` on validation rows (squared hinge: the cross-fitted temperature log loss; probabilities
    counted as at least :data:`~featurekit.heads.selection.PROBABILITY_FLOOR`, as every head's)."""
    scores = fit.decision_function(X_val)
    loss = (log_loss(scores, y_val, floor=selection.PROBABILITY_FLOOR) if fit.loss == "logistic" else
            cross_fitted_log_loss(scores, y_val, floor=selection.PROBABILITY_FLOOR))
    return {**accuracies(scores, y_val), "val_log_loss": loss}


def select_on_validation(path: Iterable[LinearFit], X_val: torch.Tensor, y_val: torch.Tensor,
                         patience: int | None = None, select: str = selection.SELECT
                         ) -> tuple[LinearFit, list[dict]]:
    """Score each fit of ``path`` on validation rows; keep the one rule ``select`` chooses; stop early.

    ``X_val`` float32[M, D] standardised like the training rows, ``y_val`` int64[M], on the fits'
    device. Scores: :func:`validation_scores`; rules: :mod:`.selection`. The path is not followed
    further once ``patience`` consecutive Cs (None: the rule's :func:`~.selection.path_patience`)
    have not changed what the rule keeps (nor, for accuracy-1se, the best accuracy). Returns the
    kept fit (squared hinge: with its temperature fitted on all validation rows) and one record per
    C scored: C, val_accuracy, val_balanced_accuracy, val_log_loss, iterations, passes, converged,
    seconds (fit and scoring).
    """
    rule_patience = selection.path_patience(select)  # an unknown rule is refused before any C is fitted
    patience = rule_patience if patience is None else patience
    fits, records, since_best = {}, [], 0
    start = time.perf_counter()
    for fit in path:
        records.append({"C": fit.C, **validation_scores(fit, X_val, y_val), "iterations": fit.n_iter,
                        "passes": fit.n_passes, "converged": fit.converged, "seconds": time.perf_counter() - start})
        start = time.perf_counter()
        fits[len(records) - 1] = fit
        fits = {i: f for i, f in fits.items() if i in selection.still_eligible(records, select, len(y_val))}
        since_best = 0 if selection.improved(records, select, len(y_val)) else since_best + 1
        if since_best >= patience:
            break
    if not records:
        raise ValueError("select_on_validation: the path has no C")
    best = fits[selection.choose(records, select, len(y_val))]
    if best.loss == "squared_hinge":
        best = replace(best, temperature=fit_temperature(best.decision_function(X_val), y_val))
    return best, records


def sweep(X: torch.Tensor, y: torch.Tensor, Cs: Sequence[float], loss: Loss, X_val: torch.Tensor, y_val: torch.Tensor,
          *, tol: float = TOL, sweep_tol: float = SWEEP_TOL, patience: int | None = None,
          select: str = selection.SELECT, **options) -> tuple[LinearFit, list[dict]]:
    """What the linear heads do with validation rows: :func:`select_on_validation` over the path of
    ``Cs`` (increasing), each C solved to ``sweep_tol`` (a certified 1% of the objective chooses as
    the exact solutions do: docs/heads.md), then the kept C refitted to ``tol`` from its sweep
    solution (squared hinge: its temperature fitted again). ``options``: :func:`fit_path`'s."""
    path = fit_path(X, y, Cs, loss, tol=max(sweep_tol, tol), **options)
    fit, records = select_on_validation(path, X_val, y_val, patience, select)
    if fit.tol > tol:
        refit = next(fit_path(X, y, [fit.C], loss, tol=tol, init=fit, **options))
        fit = replace(refit, temperature=None if fit.temperature is None else
                      fit_temperature(refit.decision_function(X_val), y_val))
    return fit, records
