"""Linear heads in torch: every class at once, L-BFGS, warm-started along a path of C values.

Two losses, both fitted on standardised features ``X`` float32[N, D] (a tensor on the device that
does the work: cuda when there, cpu otherwise) and targets ``y`` int64[N] in ``0..K-1``. The
coefficients are ``W`` float32[K, D] and ``b`` float32[K]; decision scores are ``X @ W.T + b``.
``C`` is scikit-learn's: the intercept is not penalised, and the objective below is scikit-learn's
divided by ``C * N`` (same minimiser, gradients of order one whatever N and C)::

    logistic:       (1/N) sum_i CE(softmax(s_i), y_i)                 + ||W||^2 / (2 C N)
    squared_hinge:  (1/N) sum_i sum_k max(0, 1 - t_ik s_ik)^2         + ||W||^2 / (2 C N)
                    with t_ik = +1 if y_i = k else -1

- ``logistic`` is ``sklearn.linear_model.LogisticRegression(C=C)`` (multinomial, lbfgs).
- ``squared_hinge`` is one-vs-rest, ``sklearn.svm.LinearSVC(C=C)`` with its default loss, except
  that liblinear also penalises the intercept (as a feature of value ``intercept_scaling``). We take
  squared hinge one-vs-rest rather than Crammer-Singer because it is differentiable with a Lipschitz
  gradient, so the same L-BFGS solver converges on it, and it is LinearSVC's default, so its figures
  compare with the former svm head; Crammer-Singer's max over classes is not differentiable.

Solver: L-BFGS (memory ``history``), one memory and step length per independent block (logistic:
one block; squared hinge: one per class, whose converged classes then drop out of the products with
X), with a diagonal preconditioner (the Hessian's diagonal at each C's start, estimated on at most
2,048 evenly spaced rows). Each iteration takes two products with X, ``X @ dW.T`` along the search
direction and the gradient ``dL/dS.T @ X``: the line search (Armijo by quadratic backtracking, or
Hager and Zhang's approximate Wolfe test where float32 rounding flattens the objective, then one
secant step on the slope) and a Newton refit of the intercept alone move along the scores, which
costs no product with X. Along a path each C starts from the better of the previous solution and
the secant extrapolation of the last two in log C; the first C starts from W = 0 with the
intercept at its optimum for W = 0. **Stopping rule**, per C: the largest absolute entry of the
objective's gradient (W and b) is at most ``tol`` (scikit-learn's lbfgs ``gtol``, on the same
normalised objective); or ``max_iter`` iterations, or no step that lowers the objective in the
features' precision, and then ``LinearFit.converged`` is False.

Memory: X stays one tensor, never copied; the work arrays are [N, K] (scores) and [K, D] (the
coefficients, L-BFGS memory), plus the squares of the preconditioner's row sample. Nothing is N x N.

Probabilities: logistic, softmax of the scores. Squared hinge, softmax of the scores times one
fitted inverse temperature (:func:`fit_temperature`, against targets smoothed so that it stays
finite where the scores separate the rows), fitted on rows that were not used to fit W:
the validation rows, where :func:`select_on_validation` scores each C by a *cross-fitted* log loss
(each half of the validation rows is scored with the temperature fitted on the other half), so the
log loss used to break ties is not flattered by the calibration; or, with no validation rows,
out-of-fold training scores (:func:`out_of_fold_scores`, a few warm-started fits at one C).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

import torch

from ._objective import LOSSES, Loss, Point, Problem, Trial, check_problem, loss_terms

__all__ = ["LOSSES", "MAX_ITER", "PATIENCE", "TOL", "LinearFit", "Loss", "cross_fitted_log_loss", "fit_path",
           "fit_temperature", "log_loss", "objective", "out_of_fold_scores", "select_on_validation", "selection_score"]

_ARMIJO = 1e-4
TOL = 1e-3  # default stopping tolerance of fit_path (see its docstring for why not scikit-learn's 1e-4)
MAX_ITER = 500  # default L-BFGS iterations per C
PATIENCE = 5  # default Cs past the best before select_on_validation stops following the path


@dataclass(frozen=True)
class LinearFit:
    """One solution of the path. Tensors live on the device of the features they were fitted on."""

    C: float
    loss: str
    coef: torch.Tensor  # float32[K, D]
    intercept: torch.Tensor  # float32[K]
    n_iter: int  # L-BFGS iterations at this C
    n_passes: float  # products with X at this C, in units of one product with all K classes (the cost)
    converged: bool  # max |gradient| <= tol was reached (not max_iter, not stalled in rounding)
    objective: float  # the normalised objective above, at (coef, intercept)
    temperature: float | None = None  # inverse temperature for squared-hinge probabilities (None: not fitted)

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
              loss: Loss) -> float:
    """The normalised objective of the module docstring at ``coef`` float[K, D], ``intercept`` float[K]."""
    K = check_problem(X, y, loss, len(coef))
    problem = Problem(X, y, K, loss)
    problem.penalty = 1.0 / (C * len(X))
    return float(problem.value(problem.point(torch.cat([coef, intercept[:, None]], dim=1).to(X))).sum())



def _lbfgs(problem: Problem, point: Point, tol: float, max_iter: int, history: int) -> tuple[Point, int, bool]:
    """Minimise ``problem`` from ``point``; returns (solution, iterations, converged).

    Each iteration reads X twice: once for the scores' rate of change along the search direction
    (the line search then moves along the scores, at no further cost) and once for the gradient.
    """
    noise = 10 * torch.finfo(point.theta.dtype).eps  # relative rounding of the objective (rows summed in float64)
    precondition = problem.preconditioner(point)
    pairs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (s, y, 1 / s'y per block, 0: unusable)
    stalled = torch.zeros(problem.blocks, dtype=torch.bool, device=point.theta.device)
    for iteration in range(max_iter):
        done = point.grad.abs().reshape(problem.blocks, -1).amax(dim=1) <= tol
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
    done = point.grad.abs().reshape(problem.blocks, -1).amax(dim=1) <= tol
    return point, max_iter, bool(done.all())


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
        loss, dscores = loss_terms(scores, problem.y, problem.signs, problem.loss)
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
        trial = _where_blocks(problem, refined.value < trial.value, refined, trial)
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
            hessian = (torch.diag(p.sum(dim=0)) - p.T @ p).double() / problem.N
            hessian += torch.eye(len(hessian), dtype=hessian.dtype, device=hessian.device) * 1e-9
            shift = -torch.linalg.solve(hessian, gradient.double())
            shift = (shift - shift.mean()).to(point.theta.dtype)
        else:
            curvature = 2.0 * (moved.dscores != 0).sum(dim=0).to(point.theta.dtype) / problem.N
            shift = torch.where(curvature > 0, -gradient / curvature.clamp_min(1e-12), 0.0)
            shift = torch.where(finished, 0.0, shift)
        scores = moved.scores + shift
        loss, dscores = loss_terms(scores, problem.y, problem.signs, problem.loss)
        better = loss < moved.loss
        if not bool(better.any()):
            break
        total += torch.where(better, shift, 0.0) if problem.blocks > 1 else shift
        moved = _where_blocks(problem, better, replace(moved, scores=scores, dscores=dscores, loss=loss), moved)
    if moved is point:
        return point
    theta = point.theta.clone()
    theta[:, -1] += total
    return replace(moved, theta=theta)


def _where_blocks(problem: Problem, condition: torch.Tensor, a, b):
    """Block by block (the blocks are independent), ``a`` where ``condition`` bool[blocks], else ``b``:
    two Point or two Trial."""
    if bool(condition.all()):
        return a
    if not bool(condition.any()):
        return b
    rows, columns = problem.on_rows(condition) > 0, problem.on_columns(condition) > 0
    chosen = {}
    for kind, mask in ((a.ROWS, rows), (a.COLUMNS, columns), (a.BLOCKS, condition)):
        for name in kind:
            first, second = getattr(a, name), getattr(b, name)
            chosen[name] = None if first is None or second is None else torch.where(mask, first, second)
    return replace(a, **chosen)


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
             tol: float = TOL, max_iter: int = MAX_ITER, history: int = 10,
             init: LinearFit | None = None) -> Iterator[LinearFit]:
    """Yield one :class:`LinearFit` per C, in the order given, each warm-started from the previous.

    ``X`` float32[N, D] standardised features on the device to use (float64 works too), ``y``
    int64[N] on the same device, in ``0..n_classes-1`` (default ``y.max() + 1``). Give ``Cs``
    increasing: small-C solutions are near zero and cheap, and each is a good start for the next.
    ``tol``, ``max_iter``: the stopping rule of the module docstring, per C; scikit-learn's default
    tol is 1e-4, but on caltech101 lite0 + lite2 features 1e-3 chose heads within 4 of 2,893
    validation rows of it for half the passes (benchmarks/bench_linear.py). ``init``: a solution to
    start the first C from (e.g. the full-data fit, for fold fits). A generator, so the caller can
    score each C and stop early (:func:`select_on_validation`).
    """
    K = check_problem(X, y, loss, n_classes)
    if any(not C > 0 for C in Cs):
        raise ValueError(f"every C must be positive, got {list(Cs)}")
    problem = Problem(X, y, K, loss)
    theta = problem.initial(K, X.shape[1]) if init is None else torch.cat([init.coef, init.intercept[:, None]], 1)
    last: list[tuple[float, Point]] = []  # (log C, solution) of the last two Cs, at the last C's penalty
    for C in map(float, Cs):
        problem.passes, old_penalty, problem.penalty = 0.0, problem.penalty, 1.0 / (C * len(X))
        if last:
            last = [(log_C, problem.at_penalty(solution, old_penalty)) for log_C, solution in last]
            start = _warm_start(problem, last, math.log(C))
        else:
            start = problem.point(theta)
        solution, n_iter, converged = _lbfgs(problem, start, tol, max_iter, history)
        last = last[-1:] + [(math.log(C), solution)]
        yield LinearFit(C, loss, solution.theta[:, :-1].clone(), solution.theta[:, -1].clone(), n_iter,
                        problem.passes, converged, float(problem.value(solution).sum()))


def _warm_start(problem: Problem, last: list[tuple[float, Point]], log_C: float) -> Point:
    """The point to start the next C from: per block, the better of the last solution and the secant
    extrapolation of the last two solutions in log C (one evaluation)."""
    log_C1, solution = last[-1]
    if len(last) < 2:
        return solution
    log_C0, before = last[0]
    guess = problem.point(solution.theta + (solution.theta - before.theta) * ((log_C - log_C1) / (log_C1 - log_C0)))
    return _where_blocks(problem, problem.value(guess) < problem.value(solution), guess, solution)


# --------------------------------------------------------------------------- probabilities and selection


def fit_temperature(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Inverse temperature ``a`` >= 0 minimising the mean cross-entropy of ``softmax(a * scores)``
    against the targets smoothed by Laplace's rule of succession: probability ``(M + 1) / (M + 2)``
    on each row's class, the rest shared by the others (as Platt smooths his targets).

    ``scores`` float[M, K], ``targets`` int64[M]. Without the smoothing, scores that separate the
    M rows perfectly would make the best ``a`` infinite and the probabilities 0 or 1, a log loss of
    0 that no classifier has on new rows (on a small validation set that won ties between heads);
    with it, ``a`` is finite and M rows all right give the true class about (M + 1) / (M + 2). On
    thousands of rows the change is below a thousandth. The loss is convex in ``a``: Newton's
    method on its derivative ``mean(E_p[s] - E_target[s])``, bisecting (in log ``a``) whenever a step
    would leave the bracket [1e-3, 1e3] / std(scores), to a relative change of 1e-6.
    """
    scores = scores.double()
    M, K = scores.shape
    own = (M + 1) / (M + 2)
    true_scores = scores.gather(1, targets[:, None])[:, 0]
    target_scores = own * true_scores + (1 - own) * (scores.sum(dim=1) - true_scores) / max(K - 1, 1)
    scale = float(scores.std().clamp_min(1e-12))
    low, high = 1e-3 / scale, 1e3 / scale

    def derivatives(a: float) -> tuple[float, float]:
        p = torch.softmax(a * scores, dim=1)
        mean = (p * scores).sum(dim=1)
        return float((mean - target_scores).mean()), float(((p * scores * scores).sum(dim=1) - mean * mean).mean())

    if derivatives(high)[0] <= 0:
        return high
    if derivatives(low)[0] >= 0:
        return low
    a = 1.0 / scale
    for _ in range(100):
        slope, curvature = derivatives(a)
        low, high = (a, high) if slope < 0 else (low, a)
        newton = a - slope / curvature if curvature > 0 else -1.0
        following = newton if low < newton < high else math.sqrt(low * high)
        if abs(following - a) <= 1e-6 * a:
            return following
        a = following
    return a


def log_loss(scores: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean ``-log softmax(temperature * scores)[target]`` of float[M, K] scores, exactly (no clipping)."""
    return float(-torch.log_softmax(temperature * scores.double(), dim=1).gather(1, targets[:, None]).mean())


def cross_fitted_log_loss(scores: torch.Tensor, targets: torch.Tensor, folds: int = 2) -> float:
    """Log loss of temperature-scaled ``scores`` float[M, K], each row scored with the temperature
    fitted on the rows of the other folds (rows ``i % folds``): an estimate that the fitted
    temperature does not flatter, for ranking squared-hinge fits by validation log loss. With fewer
    rows than two per fold, fewer folds; with one row, its own temperature (nothing to cross-fit)."""
    folds = min(folds, len(targets) // 2)
    if folds < 2:
        return log_loss(scores, targets, fit_temperature(scores, targets))
    fold = torch.arange(len(targets), device=targets.device) % folds
    total = 0.0
    for f in range(folds):
        held, rest = fold == f, fold != f
        total += log_loss(scores[held], targets[held], fit_temperature(scores[rest], targets[rest])) * int(held.sum())
    return total / len(targets)


def out_of_fold_scores(X: torch.Tensor, y: torch.Tensor, fit: LinearFit, folds: int = 3, **options) -> torch.Tensor:
    """float32[N, K] scores of every training row by a fit at ``fit.C`` on the other folds (rows
    ``i % folds``), each warm-started from ``fit``: for a temperature when there are no validation
    rows. ``options``: :func:`fit_path`'s tol, max_iter, history."""
    fold = torch.arange(len(y), device=y.device) % folds
    scores = torch.empty(len(y), len(fit.coef), dtype=X.dtype, device=X.device)
    for f in range(folds):
        rest = fold != f
        fold_fit = next(fit_path(X[rest], y[rest], [fit.C], fit.loss, n_classes=len(fit.coef), init=fit, **options))
        scores[fold == f] = fold_fit.decision_function(X[fold == f])
    return scores


def selection_score(scores: Mapping[str, float]) -> tuple[float, float]:
    """How every sweep and ``--head all`` rank candidates: higher validation accuracy, then lower
    validation log loss (``scores``: a selection record; without validation scores, (0, 0))."""
    return scores.get("val_accuracy", 0.0), -scores.get("val_log_loss", 0.0)


def select_on_validation(path: Iterable[LinearFit], X_val: torch.Tensor, y_val: torch.Tensor,
                         patience: int = PATIENCE) -> tuple[LinearFit, list[dict]]:
    """Score each fit of ``path`` on validation rows; keep the best; stop early.

    ``X_val`` float32[M, D] standardised like the training rows, ``y_val`` int64[M], on the fits'
    device. Score: validation accuracy, ties broken by lower validation log loss (softmax for
    logistic; for squared hinge the cross-fitted temperature log loss of
    :func:`cross_fitted_log_loss`). The path is not followed further once ``patience`` consecutive
    Cs have not beaten the best. Returns the best fit (squared hinge: with its temperature fitted on
    all validation rows) and one record per C scored: C, val_accuracy, val_log_loss, iterations,
    passes, converged, seconds (fit and scoring).
    """
    best, best_score, records, since_best = None, None, [], 0
    start = time.perf_counter()
    for fit in path:
        scores = fit.decision_function(X_val)
        accuracy = float((scores.argmax(dim=1) == y_val).double().mean())
        loss = log_loss(scores, y_val) if fit.loss == "logistic" else cross_fitted_log_loss(scores, y_val)
        records.append({"C": fit.C, "val_accuracy": accuracy, "val_log_loss": loss, "iterations": fit.n_iter,
                        "passes": fit.n_passes, "converged": fit.converged, "seconds": time.perf_counter() - start})
        start = time.perf_counter()
        score = selection_score(records[-1])
        if best_score is None or score > best_score:
            best, best_score, since_best = fit, score, 0
        else:
            since_best += 1
            if since_best >= patience:
                break
    if best is None:
        raise ValueError("select_on_validation: the path has no C")
    if best.loss == "squared_hinge":
        best = replace(best, temperature=fit_temperature(best.decision_function(X_val), y_val))
    return best, records
