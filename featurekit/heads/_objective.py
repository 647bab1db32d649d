"""The objective of the linear heads, per block, as the solvers of :mod:`.solver` see it.

The normalised objective (:mod:`.solver`'s docstring) at a parameter value: the scores, the loss and
its derivative along the scores, the penalty, the gradient, the preconditioner's diagonal and the
stopping rule's bound on the distance to the optimum, for one block (logistic) or one block per class
(squared hinge). Rows may carry weights (``class_weight``): every row's loss is multiplied by its
weight (mean 1). Private to the solvers.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

__all__ = ["LOSSES", "Loss", "Point", "Problem", "Trial", "check_problem", "where_blocks"]

Loss = Literal["logistic", "squared_hinge"]
LOSSES: tuple[str, ...] = ("logistic", "squared_hinge")
_PRECONDITIONER_ROWS = 2048  # rows the preconditioner's diagonal is estimated on (every stride-th)

# --------------------------------------------------------------------------- objective


def check_problem(X: torch.Tensor, y: torch.Tensor, loss: str, n_classes: int | None,
                  weights: torch.Tensor | None = None) -> int:
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r} (choices: {', '.join(LOSSES)})")
    if X.ndim != 2 or not X.is_floating_point():
        raise ValueError(f"features must be a 2-D float tensor [N, D], got {tuple(X.shape)} {X.dtype}")
    if y.shape != (len(X),) or y.dtype != torch.int64:
        raise ValueError(f"targets must be int64[{len(X)}], got {tuple(y.shape)} {y.dtype}")
    if weights is not None and (weights.shape != (len(X),) or not bool((weights > 0).all())):
        raise ValueError(f"row weights must be positive float[{len(X)}], got {tuple(weights.shape)}")
    K = int(y.max()) + 1 if n_classes is None else n_classes
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= K):
        raise ValueError(f"targets must lie in 0..{K - 1}, got {int(y.min())}..{int(y.max())}")
    return K


def signs_of(y: torch.Tensor, K: int, dtype: torch.dtype) -> torch.Tensor:
    """float[N, K]: +1 on each row's class, -1 elsewhere."""
    return 2 * F.one_hot(y, K).to(dtype) - 1


def loss_terms(S: torch.Tensor, y: torch.Tensor, signs: torch.Tensor | None, loss: str,
               weights: torch.Tensor | None = None):
    """(mean loss float64[B], dLoss/dS float[N, K] already divided by N) for scores S float[N, K].

    B = 1 for logistic; for squared hinge B = K, one value per one-vs-rest problem (they are separable).
    Logistic: rows whose own class dominates (large C) have a loss and a ``1 - p_y`` far below
    float32's eps; both come from the sum of the other classes' ``exp(s_k - s_max)`` (log1p), not from
    ``log(1 + tiny)`` and ``p_y - 1``, which round to 0 and lose those rows' loss.
    """
    N = len(S)
    if loss == "logistic":
        top, argmax = S.max(dim=1, keepdim=True)
        e = (S - top).exp_()
        others = e.scatter(1, argmax, 0.0).sum(dim=1)
        rows = torch.arange(N, device=S.device)
        lead = (top[:, 0] - S[rows, y]) + torch.log1p(others)  # -log p_y
        dS = e.div_((1 + others)[:, None])
        own = argmax[:, 0] == y
        dS[rows, y] = torch.where(own, -others / (1 + others), dS[rows, y] - 1)
        if weights is not None:
            lead, dS = lead * weights, dS.mul_(weights[:, None])
        return (lead.sum(dtype=torch.float64) / N).view(1), dS.div_(N)
    margin = (1 - signs * S).clamp_min_(0)
    weighted = margin if weights is None else margin * weights[:, None]
    value = (weighted * margin).sum(dim=0, dtype=torch.float64) / N
    return value, weighted.mul_(signs).mul_(-2.0 / N)


def curvature(S: torch.Tensor, signs: torch.Tensor | None, loss: str, weights: torch.Tensor | None = None
              ) -> torch.Tensor:
    """float[N, K]: each row's loss curvature in each class score, for the preconditioner."""
    if loss == "logistic":
        p = torch.softmax(S, dim=1)
        result = p * (1 - p)
    else:
        # rows past the margin count a quarter: a warm start's active set is about to change, and with the
        # exact diagonal, features seen only on inactive rows got steps of 1 / penalty (3x the iterations
        # along a path on digits at C = 1)
        result = torch.where(signs * S < 1, 2.0, 0.5).to(S.dtype)
    return result if weights is None else result * weights[:, None]


@dataclass
class Point:
    """A parameter value and what the solver knows there. Per block: ``loss`` and ``norm2``, so the
    objective at any C is ``loss + norm2 / (2 C N)`` (:meth:`Problem.value`)."""

    theta: torch.Tensor  # float[K, D + 1]: W, then b as the last column
    scores: torch.Tensor  # float[N, K]
    dscores: torch.Tensor  # float[N, K]: d(mean loss) / d(scores)
    loss: torch.Tensor  # float64[blocks]: the mean loss
    norm2: torch.Tensor  # float64[blocks]: ||W||^2
    grad: torch.Tensor | None  # like theta, at the problem's current penalty; None until computed

    ROWS: ClassVar = ("theta", "grad")  # which fields follow the blocks how, for where_blocks
    COLUMNS: ClassVar = ("scores", "dscores")
    BLOCKS: ClassVar = ("loss", "norm2")


@dataclass
class Trial:
    """A step along a search direction, known from the scores alone (theta not yet formed)."""

    step: torch.Tensor  # float64[blocks]
    scores: torch.Tensor
    dscores: torch.Tensor
    loss: torch.Tensor
    norm2: torch.Tensor
    value: torch.Tensor  # float64[blocks]: the objective
    slope: torch.Tensor  # float64[blocks]: its derivative along the direction

    ROWS: ClassVar = ()
    COLUMNS: ClassVar = ("scores", "dscores")
    BLOCKS: ClassVar = ("step", "loss", "norm2", "value", "slope")


class Problem:
    """The objective at one C, as a sum over ``blocks`` independent parts: one for logistic (the
    softmax couples the classes), K for squared hinge (one binary problem per class). The solver
    keeps a step length and a curvature memory per block. ``passes`` counts products with X, in
    units of one product with all K classes (each reads all of X: the unit of cost). ``weights``:
    float[N] row weights or None."""

    def __init__(self, X: torch.Tensor, y: torch.Tensor, K: int, loss: str, weights: torch.Tensor | None = None):
        self.X, self.y, self.loss, self.N, self.K = X, y, loss, len(X), K
        self.weights = None if weights is None else weights.to(X.dtype)
        self.signs = signs_of(y, K, X.dtype) if loss == "squared_hinge" else None
        self.blocks = K if loss == "squared_hinge" else 1
        self.penalty = 0.0  # 1 / (C N), set per C
        self.passes = 0.0
        self.stride = -(-self.N // _PRECONDITIONER_ROWS)
        self.squared_sample: torch.Tensor | None = None
        self.kernel = None  # the squared hinge's Newton solver keeps its Gram matrix here, once per path
        self.newton_first = False  # squared hinge on many rows: set once L-BFGS was slow at a C of the path
        self.null = None  # float64[blocks]: the loss at W = 0 with the best intercept (set_null)

    def terms(self, scores: torch.Tensor):
        """:func:`loss_terms` of this problem's targets and weights."""
        return loss_terms(scores, self.y, self.signs, self.loss, self.weights)

    def scores(self, theta: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """float[N, K] = X @ W.T + b (for a search direction: the scores' rate of change); with
        ``rows`` (class indices) only those columns, the others zero."""
        if rows is None:
            self.passes += 1
            return torch.addmm(theta[:, -1], self.X, theta[:, :-1].T)
        self.passes += len(rows) / len(theta)
        scores = torch.zeros(self.N, len(theta), dtype=theta.dtype, device=theta.device)
        scores[:, rows] = torch.addmm(theta[rows, -1], self.X, theta[rows, :-1].T)
        return scores

    def point(self, theta: torch.Tensor, gradient: bool = True) -> Point:
        scores = self.scores(theta)
        loss, dscores = self.terms(scores)
        return Point(theta, scores, dscores, loss, self.norm2(theta),
                     self.gradient(theta, dscores) if gradient else None)

    def value(self, point: Point | Trial) -> torch.Tensor:
        """float64[blocks]: the objective at the current C."""
        return point.loss + 0.5 * self.penalty * point.norm2

    def norm2(self, theta: torch.Tensor) -> torch.Tensor:
        return self.dot(theta[:, :-1], theta[:, :-1])

    def gradient(self, theta: torch.Tensor, dscores: torch.Tensor, rows: torch.Tensor | None = None,
                 previous: torch.Tensor | None = None) -> torch.Tensor:
        """Gradient like theta; with ``rows``, only those rows are computed, the others copied from
        ``previous`` (blocks that did not move keep their gradient)."""
        if rows is None:
            self.passes += 1
            grad = torch.empty_like(theta)
            grad[:, :-1] = torch.addmm(theta[:, :-1], dscores.T, self.X, beta=self.penalty)
            grad[:, -1] = dscores.sum(dim=0)
            return grad
        self.passes += len(rows) / len(theta)
        grad = previous.clone()
        moved = dscores[:, rows]
        grad[rows, :-1] = torch.addmm(theta[rows, :-1], moved.T, self.X, beta=self.penalty)
        grad[rows, -1] = moved.sum(dim=0)
        return grad

    def with_gradient(self, point: Point) -> Point:
        return point if point.grad is not None else replace(point, grad=self.gradient(point.theta, point.dscores))

    def at_penalty(self, point: Point, old_penalty: float) -> Point:
        """``point`` with its gradient moved from ``old_penalty`` to the current one."""
        grad = point.grad.clone()
        grad[:, :-1] += (self.penalty - old_penalty) * point.theta[:, :-1]
        return replace(point, grad=grad)

    def dot(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """float64[blocks]: inner products of two theta-shaped tensors, block by block."""
        return (a * b).reshape(self.blocks, -1).sum(dim=1).double()

    def per_block(self, values: torch.Tensor) -> torch.Tensor:
        """float64[blocks] from float[K] per-class values (summed for the one logistic block)."""
        values = values.double()
        return values if self.blocks > 1 else values.sum().view(1)

    def score_slope(self, dscores: torch.Tensor, direction_scores: torch.Tensor) -> torch.Tensor:
        """float64[blocks]: the mean loss's derivative along a direction, from the scores."""
        return self.per_block((dscores * direction_scores).sum(dim=0))

    def on_rows(self, values: torch.Tensor) -> torch.Tensor:
        """float64[blocks] (or bool) as a factor broadcasting over theta's rows."""
        return values.to(self.X.dtype).view(-1, 1)

    def on_columns(self, values: torch.Tensor) -> torch.Tensor:
        """float64[blocks] (or bool) as a factor broadcasting over the scores' columns."""
        return values.to(self.X.dtype).view(1, -1)

    def preconditioner(self, point: Point) -> torch.Tensor:
        """float[K, D + 1]: inverse of the Hessian's diagonal at ``point`` (curvature-weighted x_ij^2 +
        penalty), the W part estimated on every ``stride``-th row (at most _PRECONDITIONER_ROWS)."""
        weights = curvature(point.scores, self.signs, self.loss, self.weights)
        if self.squared_sample is None:  # once per path
            self.squared_sample = self.X[::self.stride].square()
        sample = weights[::self.stride]
        self.passes += len(sample) / self.N
        diagonal = torch.empty_like(point.theta)
        diagonal[:, :-1] = (sample.T @ self.squared_sample).div_(len(sample)).add_(self.penalty)
        diagonal[:, -1] = weights.mean(dim=0)
        # a class whose rows all sit past the margin has no curvature in b: keep its step finite
        return 1.0 / diagonal.clamp_min_(max(self.penalty, 1e-12))

    def intercept_curvature(self, scores: torch.Tensor, dscores: torch.Tensor) -> torch.Tensor:
        """float[K]: the loss's second derivative in each intercept alone (its Hessian's diagonal in b)."""
        if self.loss == "logistic":
            return curvature(scores, None, self.loss, self.weights).mean(dim=0)
        active = (dscores != 0).to(scores.dtype)
        return 2.0 * (active if self.weights is None else active * self.weights[:, None]).mean(dim=0)

    def gap(self, point: Point) -> torch.Tensor:
        """float64[blocks]: the stopping rule's bound on the objective's distance to its minimum.

        W part: ``||dF/dW||^2 / (2 penalty)``, the duality gap at the dual point that the scores give
        (``u_i = dLoss/ds_i``: for any convex loss with an L2 penalty, once the intercept is optimal,
        ``P(W) - D(u) = ||dF/dW||^2 / (2 penalty)``), hence an upper bound of ``F - F*``. b part
        (unpenalised): its Newton decrement ``g_b^2 / (2 h_b)``, ``h_b`` the loss's curvature in b.
        """
        grad_W, grad_b = point.grad[:, :-1], point.grad[:, -1]
        h_b = self.intercept_curvature(point.scores, point.dscores)
        intercept = grad_b.double() ** 2 / (2 * h_b.double().clamp_min(1e-12))
        return self.dot(grad_W, grad_W) / (2 * self.penalty) + self.per_block(intercept)

    def set_null(self) -> None:
        """The loss at W = 0 with the best intercept, ``F_null`` (no product with X: the scores are b)."""
        theta = self.initial(self.K, self.X.shape[1])
        self.null = self.terms(theta[:, -1].expand(self.N, -1).contiguous())[0]

    def threshold(self, value: torch.Tensor, tol: float) -> torch.Tensor:
        """float64[blocks]: what the stopping rule allows the gap bound at objective ``value``: ``tol``
        times the smaller of ``F`` and ``F_null - F`` (what the features explain): so W = 0 is never
        taken for a solution where the features say anything, and at small C, where ``F*`` is nearly
        ``F_null``, W is solved to the same relative accuracy as at large C."""
        return tol * torch.minimum(value, self.null - value)

    def initial(self, K: int, D: int) -> torch.Tensor:
        """W = 0 and the intercept that is optimal for W = 0 (log priors, or the mean of the signs),
        the rows counted with their weights."""
        theta = torch.zeros(K, D + 1, dtype=self.X.dtype, device=self.X.device)
        share = torch.zeros(K, dtype=self.X.dtype, device=self.X.device).index_add_(
            0, self.y, torch.ones_like(self.X[:, 0]) if self.weights is None else self.weights)
        share /= share.sum()
        if self.loss == "logistic":
            log_share = share.clamp_min(1e-12).log()  # a class without rows: very negative, not -inf
            theta[:, -1] = log_share - log_share.mean()
        else:
            theta[:, -1] = 2 * share - 1
        return theta


def where_blocks(problem: Problem, condition: torch.Tensor, a, b):
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
