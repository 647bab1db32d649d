"""The objective of the linear heads, per block, as the L-BFGS solver of :mod:`.solver` sees it.

The normalised objective (:mod:`.solver`'s docstring) at a parameter value: the scores, the loss and
its derivative along the scores, the penalty, the gradient and the preconditioner's diagonal, for
one block (logistic) or one block per class (squared hinge). Private to the solver."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

Loss = Literal["logistic", "squared_hinge"]
LOSSES: tuple[str, ...] = ("logistic", "squared_hinge")
_PRECONDITIONER_ROWS = 2048  # rows the preconditioner's diagonal is estimated on (every stride-th)

# --------------------------------------------------------------------------- objective


def check_problem(X: torch.Tensor, y: torch.Tensor, loss: str, n_classes: int | None) -> int:
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r} (choices: {', '.join(LOSSES)})")
    if X.ndim != 2 or not X.is_floating_point():
        raise ValueError(f"features must be a 2-D float tensor [N, D], got {tuple(X.shape)} {X.dtype}")
    if y.shape != (len(X),) or y.dtype != torch.int64:
        raise ValueError(f"targets must be int64[{len(X)}], got {tuple(y.shape)} {y.dtype}")
    K = int(y.max()) + 1 if n_classes is None else n_classes
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= K):
        raise ValueError(f"targets must lie in 0..{K - 1}, got {int(y.min())}..{int(y.max())}")
    return K


def _signs(y: torch.Tensor, K: int, dtype: torch.dtype) -> torch.Tensor:
    """float[N, K]: +1 on each row's class, -1 elsewhere."""
    return 2 * F.one_hot(y, K).to(dtype) - 1


def loss_terms(S: torch.Tensor, y: torch.Tensor, signs: torch.Tensor | None, loss: str):
    """(mean loss float64[B], dLoss/dS float[N, K] already divided by N) for scores S float[N, K].

    B = 1 for logistic; for squared hinge B = K, one value per one-vs-rest problem (they are separable).
    """
    N = len(S)
    if loss == "logistic":
        log_p = torch.log_softmax(S, dim=1)
        value = -log_p.gather(1, y[:, None]).sum(dtype=torch.float64) / N
        dS = log_p.exp_()
        dS[torch.arange(N, device=S.device), y] -= 1
        return value.view(1), dS.div_(N)
    margin = (1 - signs * S).clamp_min_(0)
    value = (margin * margin).sum(dim=0, dtype=torch.float64) / N
    return value, margin.mul_(signs).mul_(-2.0 / N)


def _curvature(S: torch.Tensor, signs: torch.Tensor | None, loss: str) -> torch.Tensor:
    """float[N, K]: each row's loss curvature in each class score, for the preconditioner."""
    if loss == "logistic":
        p = torch.softmax(S, dim=1)
        return p * (1 - p)
    # rows past the margin count a quarter: a warm start's active set is about to change, and with the
    # exact diagonal, features seen only on inactive rows got steps of 1 / penalty (3x the iterations
    # along a path on digits at C = 1)
    return torch.where(signs * S < 1, 2.0, 0.5).to(S.dtype)



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

    ROWS: ClassVar = ("theta", "grad")  # which fields follow the blocks how, for _where_blocks
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
    units of one product with all K classes (each reads all of X: the unit of cost)."""

    def __init__(self, X: torch.Tensor, y: torch.Tensor, K: int, loss: str):
        self.X, self.y, self.loss, self.N = X, y, loss, len(X)
        self.signs = _signs(y, K, X.dtype) if loss == "squared_hinge" else None
        self.blocks = K if loss == "squared_hinge" else 1
        self.penalty = 0.0  # 1 / (C N), set per C
        self.passes = 0.0
        self.stride = -(-self.N // _PRECONDITIONER_ROWS)
        self.squared_sample: torch.Tensor | None = None

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

    def point(self, theta: torch.Tensor) -> Point:
        scores = self.scores(theta)
        loss, dscores = loss_terms(scores, self.y, self.signs, self.loss)
        return Point(theta, scores, dscores, loss, self.norm2(theta), self.gradient(theta, dscores))

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

    def at_penalty(self, point: Point, old_penalty: float) -> Point:
        """``point`` with its gradient moved from ``old_penalty`` to the current one."""
        grad = point.grad.clone()
        grad[:, :-1] += (self.penalty - old_penalty) * point.theta[:, :-1]
        return replace(point, grad=grad)

    def dot(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """float64[blocks]: inner products of two theta-shaped tensors, block by block."""
        return (a * b).reshape(self.blocks, -1).sum(dim=1).double()

    def score_slope(self, dscores: torch.Tensor, direction_scores: torch.Tensor) -> torch.Tensor:
        """float64[blocks]: the mean loss's derivative along a direction, from the scores."""
        along = dscores * direction_scores
        return (along.sum(dim=0) if self.blocks > 1 else along.sum().view(1)).double()

    def on_rows(self, values: torch.Tensor) -> torch.Tensor:
        """float64[blocks] (or bool) as a factor broadcasting over theta's rows."""
        return values.to(self.X.dtype).view(-1, 1)

    def on_columns(self, values: torch.Tensor) -> torch.Tensor:
        """float64[blocks] (or bool) as a factor broadcasting over the scores' columns."""
        return values.to(self.X.dtype).view(1, -1)

    def preconditioner(self, point: Point) -> torch.Tensor:
        """float[K, D + 1]: inverse of the Hessian's diagonal at ``point`` (curvature-weighted x_ij^2 +
        penalty), the W part estimated on every ``stride``-th row (at most _PRECONDITIONER_ROWS)."""
        weights = _curvature(point.scores, self.signs, self.loss)
        if self.squared_sample is None:  # once per path
            self.squared_sample = self.X[::self.stride].square()
        sample = weights[::self.stride]
        self.passes += len(sample) / self.N
        diagonal = torch.empty_like(point.theta)
        diagonal[:, :-1] = (sample.T @ self.squared_sample).div_(len(sample)).add_(self.penalty)
        diagonal[:, -1] = weights.mean(dim=0)
        # a class whose rows all sit past the margin has no curvature in b: keep its step finite
        return 1.0 / diagonal.clamp_min_(max(self.penalty, 1e-12))

    def initial(self, K: int, D: int) -> torch.Tensor:
        """W = 0 and the intercept that is optimal for W = 0 (log priors, or the mean of the signs)."""
        theta = torch.zeros(K, D + 1, dtype=self.X.dtype, device=self.X.device)
        share = torch.bincount(self.y, minlength=K).to(self.X.dtype) / self.N
        if self.loss == "logistic":
            log_share = share.clamp_min(1e-12).log()  # a class without rows: very negative, not -inf
            theta[:, -1] = log_share - log_share.mean()
        else:
            theta[:, -1] = 2 * share - 1
        return theta
