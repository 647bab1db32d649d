"""How candidates are chosen on validation rows: the rules of ``--select`` (no torch here).

A candidate is a record of validation scores (``val_accuracy``, ``val_balanced_accuracy``,
``val_log_loss``): a C of the linear heads' path, a k of the kNN head, a weight decay of the MLP
(and an epoch within it), or a head kind's kept candidate under ``--head all``. Every rule returns
the first of equal candidates (the grid's order, the order fitted).

- ``accuracy``: the highest validation accuracy, ties broken by the lowest log loss;
- ``balanced-accuracy``: the highest mean per-class recall, ties broken likewise;
- ``log-loss``: the lowest validation log loss, ties broken by the highest accuracy;
- ``accuracy-1se`` (the default): among the candidates whose accuracy is within one standard
  error of the best (``sqrt(a (1 - a) / M)`` for the best accuracy ``a`` on ``M`` rows: what the
  validation rows can tell apart), the lowest log loss. Accuracy alone ties on small validation
  sets and then kept nearly flat probabilities (hymenoptera: C = 3.16e-6, log loss 0.64, a coin
  flip's 0.69); log loss alone may give up accuracy the rows do show. docs/heads.md has the measurements.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

from .settings import SELECT, SELECT_RULES

__all__ = ["PATH_PATIENCE", "PROBABILITY_FLOOR", "SELECT", "SELECT_RULES", "check_rule", "choose", "eligible",
           "improved", "path_patience", "standard_error", "still_eligible"]

Record = Mapping[str, float]
# validation log loss: a probability below this counts as this (scikit-learn's former eps), in every
# head's scores and in the reports, so that heads are compared on one definition
PROBABILITY_FLOOR = 1e-15
# Cs a linear head's path follows past the last one that changed what the rule keeps, by rule: the rules
# that rank by log loss, smooth along a path, stop after 3; accuracy, whose ties and dips on small sets
# (hymenoptera) end a shorter wait at C = 1e-5, after 5. Measured on full 45-C paths of four sets
# (docs/heads.md): these keep the whole path's C on every path the former 5 kept it on, and 3 saves
# the costliest large-C fits.
PATH_PATIENCE = {"accuracy-1se": 3, "log-loss": 3, "accuracy": 5, "balanced-accuracy": 5}


def check_rule(rule: str) -> str:
    if rule not in SELECT_RULES:
        raise ValueError(f"unknown selection rule {rule!r} (choices: {', '.join(SELECT_RULES)})")
    return rule


def path_patience(rule: str) -> int:
    """The Cs a linear head's path follows past its last improvement under ``rule`` (:data:`PATH_PATIENCE`)."""
    return PATH_PATIENCE[check_rule(rule)]


def standard_error(accuracy: float, rows: int) -> float:
    """The standard error of an accuracy measured on ``rows`` rows (binomial)."""
    return math.sqrt(max(accuracy * (1 - accuracy), 0.0) / max(rows, 1))


def _accuracy(record: Record) -> float:
    return record.get("val_accuracy") or 0.0


def _loss(record: Record) -> float:
    loss = record.get("val_log_loss")
    return math.inf if loss is None else loss


def _key(record: Record, rule: str) -> tuple[float, float]:
    """Larger is better: the rule's score for the rules that rank by one score."""
    if rule == "balanced-accuracy":
        return record.get("val_balanced_accuracy") or 0.0, -_loss(record)
    if rule == "log-loss":
        return -_loss(record), _accuracy(record)
    return _accuracy(record), -_loss(record)


def eligible(records: Sequence[Record], rule: str, rows: int) -> list[int]:
    """Indices of the records the rule chooses among (accuracy-1se: those within one standard error
    of the best accuracy; the others: all)."""
    if rule != "accuracy-1se":
        return list(range(len(records)))
    best = max(_accuracy(r) for r in records)
    floor = best - standard_error(best, rows)
    return [i for i, r in enumerate(records) if _accuracy(r) >= floor - 1e-12]


def choose(records: Sequence[Record], rule: str, rows: int) -> int:
    """Index of the record that ``rule`` keeps among ``records`` (validation scores on ``rows`` rows);
    records without validation scores (nothing to compare): the first."""
    check_rule(rule)
    if not records:
        raise ValueError("choose: no candidate")
    if "val_accuracy" not in records[0] or records[0]["val_accuracy"] is None:
        return 0
    ranking = "log-loss" if rule == "accuracy-1se" else rule  # among the eligible, the log loss ranks
    return max(eligible(records, rule, rows), key=lambda i: (_key(records[i], ranking), -i))


def improved(records: Sequence[Record], rule: str, rows: int) -> bool:
    """Whether the last record changed what ``rule`` keeps or may keep (the chosen one, or for
    accuracy-1se a new best accuracy): what a sweep's patience counts."""
    last = len(records) - 1
    if choose(records, rule, rows) == last:
        return True
    return rule == "accuracy-1se" and _accuracy(records[last]) > max(_accuracy(r) for r in records[:last])


def still_eligible(records: Sequence[Record], rule: str, rows: int) -> set[int]:
    """Indices that a later record cannot rule out less than now: what a sweep must keep."""
    return set(eligible(records, rule, rows)) if rule == "accuracy-1se" else {choose(records, rule, rows)}
