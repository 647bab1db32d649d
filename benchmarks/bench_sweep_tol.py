"""Does a sweep solved to a 1% objective gap choose as the exact one does? (the linear heads' ``sweep_tol``)

The linear heads follow their C path with each C solved to ``sweep_tol`` (default 1e-2, a certified
1% of the objective), keep a C on validation, then refit that C to ``tol`` (1e-4). Here each head is
fitted on the same rows with ``sweep_tol`` 1e-2 and with ``sweep_tol`` equal to ``tol`` (every C exact),
in the same run: the kept C, validation accuracy and log loss of the returned model, and seconds.

    python benchmarks/bench_sweep_tol.py FEATURES --backbone efficientnet_lite0 efficientnet_lite2
    python benchmarks/bench_sweep_tol.py --synthetic        # bench_head's many-classes rows
"""

from __future__ import annotations

import argparse
import time

import featurekit  # noqa: F401  (first: it sets OMP_WAIT_POLICY before torch loads)

# isort: split

import numpy as np
from bench_linear import synthetic
from sklearn import metrics

from featurekit.heads.linear import LinearSVMHead, LogisticHead
from featurekit.heads.solver import TOL
from featurekit.store.dataset import load_features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("features", nargs="?")
    parser.add_argument("--backbone", nargs="+")
    parser.add_argument("--synthetic", action="store_true", help="5,000 / 2,500 x 2,560, 100 classes")
    args = parser.parse_args()
    if args.synthetic:
        X, y, V, t = synthetic(5000, 2500, 2560, 100)
        name = "synthetic 5000x2560"
    else:
        train, valid = (load_features(args.features, split, args.backbone) for split in ("train", "valid"))
        X, y, V, t = train.features.astype(np.float32), train.labels, valid.features.astype(np.float32), valid.labels
        name = args.features
    print(f"{name}: {len(y)} train, {len(t)} valid, {X.shape[1]} features")
    for head in (LogisticHead, LinearSVMHead):
        for sweep_tol in (1e-2, TOL):
            start = time.perf_counter()
            fitted = head(sweep_tol=sweep_tol).fit(X, y, V, t)
            seconds = time.perf_counter() - start
            proba = fitted.predict_proba(V)
            print(f"  {fitted.kind:6s} sweep_tol {sweep_tol:g}: kept C {fitted.C_:.3g} after "
                  f"{len(fitted.selection_)} Cs, "
                  f"valid accuracy {metrics.accuracy_score(t, fitted.classes_[proba.argmax(1)]):.4f}, log loss "
                  f"{metrics.log_loss(t, proba, labels=fitted.classes_):.4f}, converged {fitted.model_.converged}, "
                  f"{seconds:.1f} s", flush=True)


if __name__ == "__main__":
    main()
