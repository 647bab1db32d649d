"""Which ``--select`` rule keeps the candidate that does best on rows it never saw (issue 21).

Selection scores candidates on the validation rows, so its own figures flatter the winner. Here the
validation split of real stores is cut in two class-stratified halves (seeded): each head is fitted
on the training split with every rule choosing on half A, and the kept model is scored on half B
(then the halves swap, and the two scores are averaged). Printed per (head, rule): the kept value,
held-out accuracy, mean per-class accuracy and log loss, and how far each rule's log loss is from the
best rule's. docs/heads.md's selection table comes from this.

    python benchmarks/bench_select.py FEATURES --backbone efficientnet_lite0 efficientnet_lite2
    python benchmarks/bench_select.py FEATURES --backbone efficientnet_lite0 --heads logreg knn
"""

from __future__ import annotations

import argparse
import time

import featurekit  # noqa: F401  (first: it sets OMP_WAIT_POLICY before torch loads)

# isort: split

import numpy as np
from sklearn import metrics

from featurekit.heads.registry import HEADS
from featurekit.heads.settings import SELECT, SELECT_RULES
from featurekit.store.dataset import load_features


def halves(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two class-stratified halves of the row indices of ``labels`` int64[M]."""
    rng = np.random.default_rng(seed)
    first = []
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        first += rows[: len(rows) // 2].tolist()
    mask = np.zeros(len(labels), dtype=bool)
    mask[first] = True
    return np.flatnonzero(mask), np.flatnonzero(~mask)


def held_out(head, X: np.ndarray, y: np.ndarray) -> dict[str, float]:
    proba = head.predict_proba(X)
    predicted = head.classes_[proba.argmax(axis=1)]
    return {"accuracy": metrics.accuracy_score(y, predicted),
            "balanced": metrics.balanced_accuracy_score(y, predicted),
            "log_loss": metrics.log_loss(y, proba, labels=head.classes_)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("features")
    parser.add_argument("--backbone", nargs="+", required=True)
    parser.add_argument("--heads", nargs="+", default=list(HEADS), choices=list(HEADS))
    parser.add_argument("--rules", nargs="+", default=list(SELECT_RULES), choices=list(SELECT_RULES))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    train = load_features(args.features, "train", args.backbone)
    valid = load_features(args.features, "valid", args.backbone)
    X, y = train.features.astype(np.float32), train.labels
    V, t = valid.features.astype(np.float32), valid.labels
    a, b = halves(t, args.seed)
    print(f"{args.features}: {len(y)} train, valid halves {len(a)} + {len(b)}, {X.shape[1]} features, "
          f"{len(np.unique(y))} classes; default rule {SELECT}")
    print("| head | rule | kept (A / B) | accuracy | mean per-class | log loss | seconds |")
    print("|---|---|---|---|---|---|---|")
    for kind in args.heads:
        for rule in args.rules:
            scores, kept, started = [], [], time.perf_counter()
            for choose_on, score_on in ((a, b), (b, a)):
                head = HEADS[kind](select=rule).fit(X, y, V[choose_on], t[choose_on])
                kept.append(f"{head.best_params_[head.grid_param]:.3g}")
                scores.append(held_out(head, V[score_on], t[score_on]))
            mean = {key: float(np.mean([s[key] for s in scores])) for key in scores[0]}
            print(f"| {kind} | {rule} | {' / '.join(kept)} | {mean['accuracy']:.4f} | {mean['balanced']:.4f} | "
                  f"{mean['log_loss']:.4f} | {time.perf_counter() - started:.1f} |", flush=True)


if __name__ == "__main__":
    main()
