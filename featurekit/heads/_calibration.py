"""Probabilities of the linear heads' scores: the squared hinge's inverse temperature, exact log losses;
and the validation accuracies of scores on the device (the torch twin of :func:`.base.proba_scores`).

Private to :mod:`.solver`, which exports these functions, and :mod:`.mlp`.
"""

from __future__ import annotations

import math

import torch

__all__ = ["accuracies", "cross_fitted_log_loss", "fit_temperature", "log_loss"]


def accuracies(scores: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """``val_accuracy`` and ``val_balanced_accuracy`` (the mean recall of the classes present) of the
    argmax of ``scores`` float[M, K] (scores, logits or log-probabilities) against ``targets`` int64[M],
    computed where they are (one number each comes back from a GPU)."""
    right = (scores.argmax(dim=1) == targets).double()
    present = torch.bincount(targets, minlength=scores.shape[1])
    recall = torch.zeros(scores.shape[1], dtype=torch.float64, device=targets.device).index_add_(0, targets, right)
    return {"val_accuracy": float(right.mean()),
            "val_balanced_accuracy": float((recall[present > 0] / present[present > 0]).mean())}


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


def log_loss(scores: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, floor: float = 0.0) -> float:
    """Mean ``-log softmax(temperature * scores)[target]`` of float[M, K] scores, each probability
    counted as at least ``floor`` (0: exactly, no clipping)."""
    picked = torch.log_softmax(temperature * scores.double(), dim=1).gather(1, targets[:, None])
    return float(-(picked.clamp_min(math.log(floor)) if floor else picked).mean())


def cross_fitted_log_loss(scores: torch.Tensor, targets: torch.Tensor, folds: int = 2, floor: float = 0.0) -> float:
    """Log loss of temperature-scaled ``scores`` float[M, K], each row scored with the temperature
    fitted on the rows of the other folds (rows ``i % folds``): an estimate that the fitted
    temperature does not flatter, for ranking squared-hinge fits by validation log loss. With fewer
    rows than two per fold, fewer folds; with one row, its own temperature (nothing to cross-fit).
    ``floor``: as :func:`log_loss`'s."""
    folds = min(folds, len(targets) // 2)
    if folds < 2:
        return log_loss(scores, targets, fit_temperature(scores, targets), floor)
    fold = torch.arange(len(targets), device=targets.device) % folds
    total = 0.0
    for f in range(folds):
        held, rest = fold == f, fold != f
        total += log_loss(scores[held], targets[held], fit_temperature(scores[rest], targets[rest]),
                          floor) * int(held.sum())
    return total / len(targets)
