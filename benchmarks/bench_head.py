"""Heads' speed: an MLP epoch vs a bare torch loop, and every head at a hundred classes vs scikit-learn.

``--scale recipe`` / ``small``: one MLP-head epoch over in-memory features vs a bare torch loop over
tensors of the same shapes. Both sides: the recipe's layers (Dropout 0.5, Linear(D,1000), ReLU,
Dropout 0.5, Linear(1000,C)), Adam, the same batch size, one shuffled pass. The head's figure is
the epoch time it records in ``history_`` (no validation set, so no evaluation inside the epoch);
its whole ``fit`` (scaler included) is printed too. Random features are fine for timing. Goal:
ratio <= 1.5.

``--scale many-classes`` (issue 11): synthetic stores-like features (bench_linear's ``synthetic``:
5,000 train / 2,500 valid x 2,560, 100 classes) written as float16 stores through the real store
writer, then ``train_head(..., "all")`` end to end (load, every head's sweep, evaluation, report
and plots), with each head's own fit seconds; then the same rows fitted by plain scikit-learn
defaults at one hyper-parameter value: LogisticRegression(), the former svm head's
CalibratedClassifierCV(LinearSVC(), cv=3) (stopped after ``--sklearn-limit`` s), KNeighborsClassifier(),
MLPClassifier() (stopped likewise), and the ratios. Goal: train-head --head all under 30 s on 2
CPU cores (issue 21; 60 s in issue 11), under 10 s on a GPU. bench_linear.py compares the linear
sweeps with scikit-learn C by C.

    python benchmarks/bench_head.py                 # recipe, small and many-classes
    python benchmarks/bench_head.py --scale small --device cuda
    nice python benchmarks/bench_head.py --scale many-classes --sklearn-limit 300
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import featurekit  # noqa: F401  (first: it sets OMP_WAIT_POLICY before torch loads)

# isort: split

import numpy as np
import torch
import torch.nn.functional as F
from bench_linear import calibrated_svm, sklearn_fit, standardised, synthetic
from bench_scale import STORE, header_for, make_folder
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.neural_network import MLPClassifier

from featurekit.heads.mlp import MLPHead, build_mlp
from featurekit.heads.train import train_head
from featurekit.images.listing import list_split
from featurekit.store.chunks import Chunk
from featurekit.store.writer import StoreWriter

SCALES = {"recipe": (25_000, 8_192, 2), "small": (2_000, 1_280, 10)}
MANY_CLASSES = (5_000, 2_560, 100)
SKLEARN_DEFAULTS = {"mlp": ("MLPClassifier()", MLPClassifier, True),  # (shown as, factory, stopped at the limit)
                    "logreg": ("LogisticRegression()", LogisticRegression, False),
                    "svm": ("CalibratedClassifierCV(LinearSVC(), cv=3)", lambda: calibrated_svm(1.0), True),
                    "knn": ("KNeighborsClassifier()", KNeighborsClassifier, False)}


def bare_epoch(X: torch.Tensor, t: torch.Tensor, n_classes: int, batch_size: int, device: str) -> float:
    """Seconds for one epoch of the plainest loop: randperm, slice, forward, backward, step."""
    torch.manual_seed(0)
    model = build_mlp(X.shape[1], (1000,), n_classes, 0.5).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    X, t = X.to(device), t.to(device)
    _sync(device)
    start = time.perf_counter()
    order = torch.randperm(len(X), device=device)
    for begin in range(0, len(X), batch_size):
        batch = order[begin:begin + batch_size]
        loss = F.cross_entropy(model(X[batch]), t[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    _sync(device)
    return time.perf_counter() - start


def head_epoch(X: np.ndarray, y: np.ndarray, batch_size: int, device: str) -> tuple[float, float]:
    """(seconds of the head's one training epoch, seconds of its whole fit)."""
    head = MLPHead(max_epochs=1, batch_size=batch_size, device=device)
    start = time.perf_counter()
    head.fit(X, y)
    return head.history_[0]["seconds"], time.perf_counter() - start


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(scale: str, batch_size: int, device: str, repeats: int) -> None:
    n, d, c = SCALES[scale]
    rng = np.random.default_rng(0)
    X = rng.standard_normal((n, d), dtype=np.float32)
    y = rng.integers(0, c, n)
    warm = batch_size * 4
    bare_epoch(torch.from_numpy(X[:warm]), torch.from_numpy(y[:warm]), c, batch_size, device)  # warm-up
    bare = min(bare_epoch(torch.from_numpy(X), torch.from_numpy(y), c, batch_size, device) for _ in range(repeats))
    head, fit = min(head_epoch(X, y, batch_size, device) for _ in range(repeats))
    print(f"{scale:6s} {n:>6} x {d:<5} C={c:<3} batch {batch_size:<4} {device}: bare loop {bare:7.2f} s/epoch, "
          f"MLPHead {head:7.2f} s/epoch (fit incl. scaler {fit:7.2f} s), ratio {head / bare:.2f}x")


def write_stores(base: Path, n: int, dim: int, classes: int) -> tuple[Path, tuple[np.ndarray, ...]]:
    """Float16 stores of bench_linear's synthetic rows (n train, n/2 valid) through the real writer;
    returns the features dir and the rows as train-head reads them (float16-rounded)."""
    data = synthetic(n, n // 2, dim, classes)
    arrays = []
    for split, (X, y) in (("train", data[:2]), ("valid", data[2:])):
        make_folder(base / "data", len(X), split, classes)  # file i in class folder i % classes, as synthetic's labels
        listing = list_split(base / "data", split)
        rows = np.array([int(Path(record.path).stem) for record in listing.records])
        writer = StoreWriter(base / "features", listing, STORE, header_for(listing, dim, "synthetic"), lambda _: None)
        assert writer.partial.create(writer.header.identity.to_dict())
        writer.commit(Chunk(0, len(rows), np.arange(len(rows), dtype=np.int64), X[rows].astype(np.float16)))
        writer.finish()
        arrays += [X[rows].astype(np.float16).astype(np.float32), y[rows]]
    return base / "features", tuple(arrays)


def many_classes(device: str, limit: float, plots: bool) -> None:
    n, dim, classes = MANY_CLASSES
    with tempfile.TemporaryDirectory() as base:
        features, (X, y, X_val, y_val) = write_stores(Path(base), n, dim, classes)
        print(f"\nmany classes: {n} train / {len(X_val)} valid x {dim} float16 features, {classes} classes, "
              f"{device}, {torch.get_num_threads()} threads", flush=True)
        start = time.perf_counter()
        report = train_head(features, [STORE], "all", Path(base) / "head", params={"device": device}, plots=plots)
        total = time.perf_counter() - start
    ours = {entry["head"]: entry for entry in report["choice"]["heads"]}
    fits = sum(entry["seconds"] for entry in ours.values())
    print(f"  train-head --head all, end to end: {total:.1f} s (head fits {fits:.1f} s; loading, evaluation, report"
          f"{' and plots' if plots else ''} {total - fits:.1f} s); kept {report['head']}, valid accuracy "
          f"{report['valid']['accuracy']:.4f}", flush=True)
    X, X_val = standardised(X, X_val)
    data = (X, y, X_val, y_val)
    print(f"  {'head':6s} {'ours: s':>8s} {'valid':>7s}  {'scikit-learn, defaults, one value':44s} {'s':>7s} "
          f"{'valid':>7s} {'sklearn / ours':>14s}")
    sklearn_total = 0.0
    for kind, (name, make, capped) in SKLEARN_DEFAULTS.items():
        seconds, accuracy, converged = sklearn_fit(make, data, limit if capped else None)
        sklearn_total += seconds
        note = "stopped" if accuracy is None else ("" if converged else "ConvergenceWarning")
        ratio = ("> " if accuracy is None else "") + f"{seconds / ours[kind]['seconds']:.1f}x"
        shown = "-" if accuracy is None else f"{accuracy:.4f}"
        print(f"  {kind:6s} {ours[kind]['seconds']:8.1f} {ours[kind]['val_accuracy']:7.4f}  {name:44s} "
              f"{seconds:7.1f} {shown:>7s} {ratio:>14s} {note}", flush=True)
    print(f"  all four: ours (train-head --head all, every sweep) {total:.1f} s, scikit-learn (one value each, "
          f"capped at {limit:.0f} s) {sklearn_total:.1f} s: {sklearn_total / total:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=[*SCALES, "many-classes", "all"], default="all")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=1, help="best of this many runs per side")
    parser.add_argument("--sklearn-limit", type=float, default=300,
                        help="many-classes: seconds before the calibrated LinearSVC and MLPClassifier are stopped")
    parser.add_argument("--no-plots", action="store_true", help="many-classes: train-head without its PNG plots")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    for scale in (SCALES if args.scale == "all" else [args.scale] if args.scale in SCALES else []):
        run(scale, args.batch_size, args.device, args.repeats)
    if args.scale in ("many-classes", "all"):
        many_classes(args.device, args.sklearn_limit, not args.no_plots)


if __name__ == "__main__":
    main()
