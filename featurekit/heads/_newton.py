"""Squared hinge: Newton steps on each class's active rows, with an exact line search, in float64.

On the rows inside its margin (the active set A: ``1 - t_i s_i > 0``) a one-vs-rest squared hinge is a
quadratic, so its minimiser for a fixed A solves a linear system in the span of those rows (Keerthi
and DeCoste's finite Newton method, in the form Chapelle gives it)::

    W = X_A' beta,   [G_AA + diag(1 / (2 C w_i)), 1; 1', 0] [beta; b] = [t_A; 0],   G = X X'

(``w_i``: row weights, 1 without ``class_weight``). Each step moves from the current point towards
that minimiser by the **exact** line search: along a direction the objective is a piecewise quadratic
whose pieces change where a row enters or leaves the margin, so its minimum is found by sorting those
breakpoints (Keerthi and DeCoste's modified finite Newton method, which ends in finitely many steps).
Whole steps alone overshoot and cycle where rows sit on the margin (the prototype stalled at C = 100
on few-shot sets at a 6% gap); backtracking on a non-smooth function stalls as well.

Everything is float64 and computed from the Gram matrix ``G`` (formed once per path, only when a step
is affordable): the parameters are kept as ``W = gamma W0 + X' beta`` (``W0``: the start, kept exact),
so scores, norms and the stopping rule's duality-gap bound need no product with X. At C = 100 the
support rows' margins are ~5e-5, about 100 times float32 scores' rounding, which made a float32
bound useless (its gradient is a difference of two nearly equal terms). Used when ``N <= GRAM_ROWS``
and the factorisations cost little next to a product with X (large C: small active sets); otherwise,
and whenever a step would cost too much, the L-BFGS solver takes over. Above ``NEWTON_FIRST_ROWS``
rows L-BFGS goes first, and Newton takes over where it is slow (:func:`~.solver.fit_path`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._objective import Point, Problem

__all__ = ["GRAM_ROWS", "LBFGS_FIRST", "NEWTON_FIRST_ROWS", "affordable", "newton"]

GRAM_ROWS = 8192  # Newton steps up to this many rows: X X' is formed once per path (float64[N, N]: 512 MiB)
# Above this many rows a Newton step's float64 products with X X' (and the Gram matrix itself: N^2 D) cost
# more than the few L-BFGS iterations a small C needs (caltech101, 5,784 rows: 1.1-1.5 s a C against
# 0.1-0.3 s), so L-BFGS goes first there and Newton takes over after LBFGS_FIRST iterations at one C
# (large C: 500 L-BFGS iterations left C = 1 unconverged after 26 s; Newton converged in 12 s).
NEWTON_FIRST_ROWS = 4096
LBFGS_FIRST = 30
NEWTON_ROWS = 2048  # ... and only while every class has at most this many rows in its margin
NEWTON_PASSES = 10  # ... and a step costs at most the operations of this many products with X (5 L-BFGS iterations)
NEWTON_FLOPS = 1e7  # ... or this many (negligible)
_GROUP_BYTES = 64 << 20  # classes factorised together: padded systems of at most this many bytes


def affordable(problem: Problem, sizes: torch.Tensor) -> bool:
    """Whether a Newton step on active sets of these ``sizes`` int[classes] costs little: its Cholesky
    factorisations and its products with the Gram matrix (4 K N^2) next to products with X (2 N D K each)."""
    if problem.N > GRAM_ROWS or len(sizes) == 0:
        return len(sizes) == 0
    flops = float((sizes.double() ** 3).sum()) / 3 + 4.0 * len(sizes) * problem.N ** 2
    product = 2.0 * problem.N * problem.X.shape[1] * problem.K
    return int(sizes.max()) <= NEWTON_ROWS and flops <= max(NEWTON_PASSES * product, NEWTON_FLOPS)


@dataclass
class _State:
    """``W = gamma W0 + beta X`` (float64: gamma [K], beta [K, N]), intercept ``b`` [K], and ``GB = beta G``."""

    gamma: torch.Tensor
    beta: torch.Tensor
    b: torch.Tensor
    GB: torch.Tensor


class _Kernel:
    """The float64 algebra of one start ``W0``: X64, the Gram matrix, ``W0``'s scores and norms."""

    def __init__(self, problem: Problem, theta: torch.Tensor):
        if problem.kernel is None:  # X in float64 and its Gram matrix, once per path
            X64 = problem.X.double()
            problem.kernel = (X64, X64 @ X64.T)
            problem.passes += problem.N / problem.K
        self.X64, self.G = problem.kernel
        self.W0 = theta[:, :-1].double()
        self.s0 = self.W0 @ self.X64.T  # [K, N]
        self.n0 = (self.W0 * self.W0).sum(dim=1)
        problem.passes += 1
        self.signs = problem.signs.T.double()  # [K, N]
        self.weights = torch.ones(problem.N, dtype=torch.float64, device=theta.device) if problem.weights is None \
            else problem.weights.double()

    def start(self, theta: torch.Tensor) -> _State:
        K, N = self.s0.shape
        zeros = torch.zeros(K, N, dtype=torch.float64, device=self.G.device)
        return _State(torch.ones(K, dtype=torch.float64, device=self.G.device), zeros, theta[:, -1].double(), zeros)

    def scores(self, state: _State) -> torch.Tensor:
        return state.gamma[:, None] * self.s0 + state.GB + state.b[:, None]

    def inner(self, a: _State, b: _State) -> torch.Tensor:
        """float64[K]: <W_a, W_b> per class."""
        return (a.gamma * b.gamma * self.n0 + a.gamma * (b.beta * self.s0).sum(1) + b.gamma * (a.beta * self.s0).sum(1)
                + (a.GB * b.beta).sum(1))

    def theta(self, state: _State, dtype: torch.dtype) -> torch.Tensor:
        W = state.gamma[:, None] * self.W0 + state.beta @ self.X64
        return torch.cat([W, state.b[:, None]], dim=1).to(dtype)


def newton(problem: Problem, point: Point, tol: float, max_iter: int) -> tuple[Point, int, bool, bool]:
    """Minimise the squared hinge from ``point`` by active-set Newton steps, class by class.

    Returns ``(solution, steps, converged, handed_over)``: ``handed_over`` when a step would cost too
    much (active sets too large: small C, or a cold start on many rows), and the L-BFGS solver should
    go on from ``solution``. Stopping rule, per class: the duality-gap bound of :meth:`Problem.gap`,
    in float64, within :meth:`Problem.threshold`; it is computed where the step's Newton decrement
    (``F`` minus the minimum of the active set's quadratic) says the class is nearly there.
    """
    sizes = (point.dscores != 0).sum(dim=0)
    if max_iter < 1 or not affordable(problem, sizes):
        return point, 0, False, True
    kernel = _Kernel(problem, point.theta)
    state = kernel.start(point.theta)
    done = torch.zeros(problem.K, dtype=torch.bool, device=point.theta.device)
    N, penalty = problem.N, problem.penalty
    for step in range(max_iter):
        scores = kernel.scores(state)
        violation = 1 - kernel.signs * scores
        moving = torch.nonzero(~done)[:, 0]
        sizes = (violation[moving] > 0).sum(dim=1)
        if not affordable(problem, sizes):
            return _point(problem, kernel, state), step, False, True
        target = _target(kernel, state, violation, moving, penalty, N)
        if target is None:  # a system that is not positive definite in float64: let L-BFGS go on
            return _point(problem, kernel, state), step, False, True
        direction = _State(-state.gamma * ~done, (target.beta - state.beta) * (~done)[:, None],
                           (target.b - state.b) * ~done, None)
        direction.GB = direction.beta @ kernel.G
        problem.passes += N / problem.X.shape[1] * len(moving) / problem.K
        change = kernel.signs * kernel.scores(direction)  # t_i ds_i: how each row's violation falls along it
        value = _value(kernel, state, violation, penalty, N)
        across = kernel.inner(direction, direction)
        decrement = 0.5 * ((2.0 / N) * (kernel.weights * (violation > 0) * change.square()).sum(1) + penalty * across)
        allowed = problem.threshold(value, tol)
        nearly = ~done & (decrement <= allowed)
        if bool(nearly.any()):
            done |= nearly & (_gap(kernel, state, violation, penalty, N) <= allowed)
            if bool(done.all()):
                return _point(problem, kernel, state), step, True, False
        step_length = _exact_step(violation, change, kernel.weights, penalty, kernel.inner(state, direction),
                                  across, N) * ~done
        state = _State(state.gamma + step_length * direction.gamma,
                       state.beta + step_length[:, None] * direction.beta, state.b + step_length * direction.b,
                       state.GB + step_length[:, None] * direction.GB)
    scores = kernel.scores(state)
    violation = 1 - kernel.signs * scores
    converged = bool((done | (_gap(kernel, state, violation, penalty, N)
                              <= problem.threshold(_value(kernel, state, violation, penalty, N), tol))).all())
    return _point(problem, kernel, state), max_iter, converged, False


def _value(kernel: _Kernel, state: _State, violation: torch.Tensor, penalty: float, N: int) -> torch.Tensor:
    """float64[K]: each class's objective."""
    active = violation.clamp_min(0)
    return (kernel.weights * active.square()).sum(1) / N + 0.5 * penalty * kernel.inner(state, state)


def _gap(kernel: _Kernel, state: _State, violation: torch.Tensor, penalty: float, N: int) -> torch.Tensor:
    """float64[K]: :meth:`Problem.gap`'s bound, exactly: ``dF/dW = X'(u + penalty beta) + penalty gamma W0``."""
    u = -2.0 / N * kernel.weights * kernel.signs * violation.clamp_min(0)  # dLoss/dscores, [K, N]
    r = u + penalty * state.beta
    norm2 = ((r @ kernel.G) * r).sum(1) + 2 * penalty * state.gamma * (r * kernel.s0).sum(1) \
        + (penalty * state.gamma) ** 2 * kernel.n0
    h_b = (2.0 / N * kernel.weights * (violation > 0)).sum(1).clamp_min(1e-12)
    return norm2.clamp_min(0) / (2 * penalty) + u.sum(1) ** 2 / (2 * h_b)


def _target(kernel: _Kernel, state: _State, violation: torch.Tensor, moving: torch.Tensor, penalty: float,
            N: int) -> _State | None:
    """The minimiser of each moving class's active-set quadratic (``gamma`` 0, ``beta`` on its active rows)."""
    beta, b = torch.zeros_like(state.beta), state.b.clone()
    active = violation[moving] > 0
    sizes = active.sum(dim=1)
    by_size = torch.argsort(sizes)
    start = 0
    while start < len(by_size):
        end = start + 1
        while end < len(by_size) and (end + 1 - start) * int(sizes[by_size[end]]) ** 2 * 8 <= _GROUP_BYTES:
            end += 1
        group = by_size[start:end]
        start = end
        m = int(sizes[group].max())
        if m == 0:  # no row in the margin: W = 0 minimises, b stays
            continue
        rows = torch.sort(active[group].to(torch.int8), dim=1, descending=True, stable=True).indices[:, :m]
        valid = torch.arange(m, device=rows.device)[None, :] < sizes[group][:, None]
        pair = valid[:, :, None] & valid[:, None, :]
        diagonal = torch.where(valid, 0.5 * penalty * N / kernel.weights[rows], 1.0)
        system = torch.where(pair, kernel.G[rows[:, :, None], rows[:, None, :]], 0.0) + torch.diag_embed(diagonal)
        classes = moving[group]
        right = torch.stack([kernel.signs[classes].gather(1, rows) * valid, valid.double()], dim=2)
        factor, info = torch.linalg.cholesky_ex(system)
        if bool((info != 0).any()):
            return None
        u, v = torch.cholesky_solve(right, factor).unbind(dim=2)
        intercept = u.sum(dim=1) / v.sum(dim=1)
        beta[classes] = torch.zeros_like(beta[classes]).scatter_(1, rows, torch.where(valid, u - intercept[:, None] * v,
                                                                                       0.0))
        b[classes] = intercept
    return _State(torch.zeros_like(state.gamma), beta, b, None)


def _exact_step(violation: torch.Tensor, change: torch.Tensor, weights: torch.Tensor, penalty: float,
                along: torch.Tensor, across: torch.Tensor, N: int) -> torch.Tensor:
    """float64[K]: per class, the step ``tau >= 0`` minimising the objective along a direction.

    Row i's violation is ``v_i - tau a_i`` (``violation`` v, ``change`` a: [K, N]); the slope in tau is
    ``-(2/N) sum_{active} w_i a_i (v_i - tau a_i) + penalty (along + tau across)``, piecewise linear and
    non-decreasing, its pieces changing where a row leaves (``a_i > 0``) or enters (``a_i < 0``) the
    margin, at ``tau = v_i / a_i``. The breakpoints are sorted and the slope's zero found on its piece.
    """
    scale = 2.0 / N * weights
    active = (violation > 0) | ((violation == 0) & (change < 0))
    slope0 = -(scale * change * violation * active).sum(1) + penalty * along
    curve0 = (scale * change.square() * active).sum(1) + penalty * across
    events = (active & (change > 0)) | (~active & (change < 0))
    times = torch.where(events, violation / torch.where(events, change, 1.0), torch.inf)
    sign = torch.where(active, -1.0, 1.0) * events  # leaving: the row's terms go, entering: they come
    times, order = torch.sort(times, dim=1)
    d_slope = (sign * -(scale * change * violation)).gather(1, order)
    d_curve = (sign * scale * change.square()).gather(1, order)
    slopes, curves = slope0[:, None] + d_slope.cumsum(1), curve0[:, None] + d_curve.cumsum(1)
    before_slope, before_curve = slopes - d_slope, curves - d_curve  # the piece that ends at each breakpoint
    reached = torch.isfinite(times) & (before_slope + before_curve * torch.where(torch.isfinite(times), times, 0) >= 0)
    first = torch.where(reached.any(1), reached.to(torch.int8).argmax(1), reached.shape[1] - 1)
    rows = torch.arange(len(first), device=first.device)
    slope = torch.where(reached.any(1), before_slope[rows, first], slopes[:, -1])
    curve = torch.where(reached.any(1), before_curve[rows, first], curves[:, -1])
    step = torch.where(curve > 0, -slope / curve.clamp_min(1e-300), 1.0)
    return torch.where(slope0 < 0, step.clamp_min(0), 0.0)


def _point(problem: Problem, kernel: _Kernel, state: _State) -> Point:
    """The float32 point of ``state`` (one product for its scores, one for its gradient)."""
    return problem.point(kernel.theta(state, problem.X.dtype))
