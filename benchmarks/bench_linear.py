"""featurekit.linear's warm-started C sweeps vs scikit-learn's solvers at one C, in one run.

Synthetic "stores-like" features (default 5,000 train + 2,500 valid rows x 2,560, 100 classes:
class means in a 64-dimensional latent space mixed into 2,560 correlated features, plus noise, so
a linear head is neither perfect nor at chance), standardised on the training rows. Printed:

- ours: the logistic and squared-hinge sweeps over ``--Cs`` log-spaced C in [1e-6, 1e5], each C
  warm-started from the one before, scored on the validation rows and stopped once validation
  has not improved for ``--patience`` Cs (``select_on_validation``): seconds, Cs fitted, passes
  over X, best C and its validation accuracy;
- scikit-learn at the best C found, other settings at their defaults: LogisticRegression (lbfgs),
  and LinearSVC inside CalibratedClassifierCV(cv=3) as the former svm head fits it (four SVM fits
  for one C; stopped after ``--sklearn-svm-limit`` seconds), and the ratios of one scikit-learn C
  to our whole sweep;
- a matrix-product figure measured in the same run (X @ W.T then its transpose product, the cost
  of one solver iteration), since this machine's two cores are shared.

Then the same sweeps on real lite0 + lite2 stores (``--stores``, default /tmp/real3/caltech: 101
classes, 2,560 features) with validation accuracy, log loss and seconds.

    python benchmarks/bench_linear.py                       # synthetic and caltech101
    python benchmarks/bench_linear.py --skip-sklearn-svm    # LinearSVC + calibration takes > 10 minutes here
    python benchmarks/bench_linear.py --full-path           # also the sweeps over all 45 Cs
    python benchmarks/bench_linear.py --device cuda --stores none
"""

from __future__ import annotations

import argparse
import multiprocessing
import time
import warnings
from pathlib import Path

import featurekit  # noqa: F401  (first: it sets OMP_WAIT_POLICY before torch loads)

# isort: split

import numpy as np
import torch
from sklearn.calibration import CalibratedClassifierCV
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from featurekit.heads import solver as linear
from featurekit.store.dataset import load_features

LITE = ["efficientnet_lite0", "efficientnet_lite2"]


def synthetic(n_train: int, n_valid: int, dim: int, classes: int, seed: int = 0):
    """(X_train, y_train, X_valid, y_valid): float32 features, int64 labels, classes balanced."""
    rng = np.random.default_rng(seed)
    latent = 64
    means = rng.normal(0.0, 0.7, (classes, latent))
    mixing = rng.normal(0.0, 1.0, (latent, dim)) * np.geomspace(1.0, 0.1, latent)[:, None]

    def rows(n):
        labels = np.arange(n) % classes
        z = means[labels] + rng.normal(0.0, 1.0, (n, latent))
        return (z @ mixing + rng.normal(0.0, 1.0, (n, dim))).astype(np.float32), labels.astype(np.int64)

    return (*rows(n_train), *rows(n_valid))


def standardised(X_train: np.ndarray, X_valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scaler = StandardScaler().fit(X_train)
    return scaler.transform(X_train).astype(np.float32), scaler.transform(X_valid).astype(np.float32)


def sweep(loss: str, data, Cs, device: str, tol: float, patience: int) -> tuple[linear.LinearFit, list[dict], float]:
    X, y, X_val, y_val = (torch.as_tensor(a, device=device) for a in data)
    _sync(device)
    start = time.perf_counter()
    best, records = linear.select_on_validation(
        linear.fit_path(X, y, Cs, loss, n_classes=int(y.max()) + 1, tol=tol), X_val, y_val, patience)
    _sync(device)
    return best, records, time.perf_counter() - start


def product_seconds(n: int, dim: int, classes: int, device: str) -> float:
    """Seconds of X @ W.T plus G.T @ X at this shape (one solver iteration's products), best of 3."""
    X = torch.randn(n, dim, device=device)
    W = torch.randn(classes, dim, device=device)
    times = []
    for _ in range(3):
        _sync(device)
        start = time.perf_counter()
        (X @ W.T).T @ X
        _sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def report_sweep(name: str, best: linear.LinearFit, records: list[dict], seconds: float) -> None:
    chosen = next(r for r in records if r["C"] == best.C)
    passes = sum(r["passes"] for r in records)
    print(f"  ours {name}: {seconds:.1f} s for {len(records)} Cs ({passes:.0f} passes over X), best C "
          f"{best.C:.3g}: valid accuracy {chosen['val_accuracy']:.4f}, log loss {chosen['val_log_loss']:.4f}"
          + (f", inverse temperature {best.temperature:.3g}" if best.temperature else "")
          + ("" if all(r["converged"] for r in records) else " (some C not converged)"), flush=True)


def calibrated_svm(C: float) -> CalibratedClassifierCV:
    """The former svm head's fit at one C: four liblinear fits of every one-vs-rest problem."""
    return CalibratedClassifierCV(LinearSVC(C=C), method="sigmoid", cv=3, ensemble=False)


def sklearn_fit(make, data, limit: float | None = None) -> tuple[float, float | None, bool]:
    """(seconds, valid accuracy, converged) of ``make()`` (a scikit-learn estimator) fitted on
    ``data``'s train rows; with ``limit``, in a child process stopped after that many seconds
    (accuracy None then). Converged: no ConvergenceWarning."""
    if limit is None:
        return _fit_and_score(make, data)
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    child = context.Process(target=lambda: results.put(_fit_and_score(make, data)))
    start = time.perf_counter()
    child.start()
    child.join(limit)
    if child.is_alive():
        child.terminate()
        child.join()
        return time.perf_counter() - start, None, False
    return results.get()


def _fit_and_score(make, data) -> tuple[float, float, bool]:
    X, y, X_val, y_val = data
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        start = time.perf_counter()
        model = make().fit(X, y)
        seconds = time.perf_counter() - start
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return seconds, float((model.predict(X_val) == y_val).mean()), converged


def run(title: str, data, args, with_sklearn_svm: bool) -> None:
    n, dim = data[0].shape
    classes = int(data[1].max()) + 1
    Cs = np.logspace(-6, 5, args.Cs)
    print(f"\n{title}: {n} train / {len(data[2])} valid rows x {dim} features, {classes} classes; "
          f"{args.Cs} Cs in [1e-6, 1e5], tol {args.tol}, {args.device}")
    print(f"  one iteration's products (X @ W.T and back) at this shape: "
          f"{1000 * product_seconds(n, dim, classes, args.device):.0f} ms", flush=True)
    results = {}
    for loss in linear.LOSSES:
        results[loss] = sweep(loss, data, Cs, args.device, args.tol, args.patience)
        report_sweep(f"{loss}, stopped {args.patience} Cs past the best", *results[loss])
        if args.full_path:
            report_sweep(f"{loss}, all {len(Cs)} Cs", *sweep(loss, data, Cs, args.device, args.tol, len(Cs)))
    if args.skip_sklearn:
        return
    logistic_best, _, logistic_seconds = results["logistic"]
    seconds, accuracy, converged = sklearn_fit(lambda: LogisticRegression(C=logistic_best.C), data)
    print(f"  sklearn LogisticRegression(C={logistic_best.C:.3g}), defaults: {seconds:6.1f} s for one C, "
          f"valid accuracy {accuracy:.4f}{'' if converged else ' (ConvergenceWarning at max_iter=100)'}; "
          f"one sklearn C / our stopped sweep = {seconds / logistic_seconds:.2f}x", flush=True)
    if not with_sklearn_svm:
        return
    svm_best, _, svm_seconds = results["squared_hinge"]
    seconds, accuracy, converged = sklearn_fit(lambda: calibrated_svm(svm_best.C), data, args.sklearn_svm_limit)
    name = f"sklearn CalibratedClassifierCV(LinearSVC(C={svm_best.C:.3g}), cv=3)"
    if accuracy is None:
        print(f"  {name}: stopped after {seconds:.0f} s without finishing one C; one sklearn C / our stopped sweep "
              f"> {seconds / svm_seconds:.1f}x", flush=True)
        return
    print(f"  {name}: {seconds:6.1f} s for one C, valid accuracy {accuracy:.4f}"
          f"{'' if converged else ' (ConvergenceWarning)'}; one sklearn C / our stopped sweep = "
          f"{seconds / svm_seconds:.2f}x", flush=True)


def real_stores(stores: Path):
    train, valid = (load_features(stores, split, LITE) for split in ("train", "valid"))
    if train.classes != valid.classes:
        raise SystemExit(f"{stores}: train and valid stores list different classes")
    X_train, X_valid = standardised(train.features, valid.features)
    return X_train, train.labels, X_valid, valid.labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--dim", type=int, default=2560)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--Cs", type=int, default=45, help="log-spaced C values in [1e-6, 1e5]")
    parser.add_argument("--tol", type=float, default=1e-3, help="max |gradient| of the normalised objective")
    parser.add_argument("--patience", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--stores", default="/tmp/real3/caltech",
                        help="features dir with train/ and valid/ lite stores, or 'none'")
    parser.add_argument("--skip-synthetic", action="store_true")
    parser.add_argument("--skip-sklearn", action="store_true")
    parser.add_argument("--skip-sklearn-svm", action="store_true",
                        help="on the synthetic set (it is never run on the stores)")
    parser.add_argument("--full-path", action="store_true", help="also time the sweeps over all Cs, no early stop")
    parser.add_argument("--sklearn-svm-limit", type=float, default=600, help="seconds before the calibrated "
                        "LinearSVC (four SVM fits for one C) is stopped")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if not args.skip_synthetic:
        X_train, y_train, X_valid, y_valid = synthetic(args.rows, args.rows // 2, args.dim, args.classes)
        X_train, X_valid = standardised(X_train, X_valid)
        run("synthetic", (X_train, y_train, X_valid, y_valid), args, not args.skip_sklearn_svm)
    if args.stores.lower() != "none":
        run(f"{args.stores} ({' + '.join(LITE)})", real_stores(Path(args.stores)), args, False)


if __name__ == "__main__":
    main()
