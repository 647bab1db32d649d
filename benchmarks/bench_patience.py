"""How many Cs past its last improvement must a linear head's path follow? (``C_patience``, issue 21)

The linear heads stop their C path once ``patience`` Cs in a row have not changed what the selection
rule keeps; every C past the kept one costs more than the one before (larger C: more iterations).
Here each loss follows the whole 45-C grid (each C to the sweep's 1% gap, scored on the valid split),
and the heads' own stop (``select_on_validation``) is fed that path for patience 2-5 under every
rule: the C kept, the Cs followed and their seconds, against the whole path's choice.
``selection.PATH_PATIENCE`` comes from this (docs/heads.md has the table).

    python benchmarks/bench_patience.py FEATURES --backbone efficientnet_lite0 efficientnet_lite2
    python benchmarks/bench_patience.py --synthetic        # bench_head's many-classes rows
"""

from __future__ import annotations

import argparse
import time

import featurekit  # noqa: F401  (first: it sets OMP_WAIT_POLICY before torch loads)

# isort: split

import numpy as np
import torch
from bench_linear import standardised, synthetic

from featurekit.heads import selection, solver
from featurekit.heads.base import C_GRID
from featurekit.store.dataset import load_features

PATIENCES = (2, 3, 4, 5)


def whole_path(loss: str, X, y, X_val, y_val, limit: float) -> tuple[list[solver.LinearFit], list[float]]:
    """Every C of the grid solved to the sweep's gap (until ``limit`` seconds have passed), and the
    seconds each took."""
    fits, seconds, start = [], [], time.perf_counter()
    last = start
    for fit in solver.fit_path(X, y, list(C_GRID), loss, tol=solver.SWEEP_TOL):
        now = time.perf_counter()
        fits.append(fit)
        seconds.append(now - last)
        last = now
        if now - start > limit:
            break
    return fits, seconds


def replay(fits: list[solver.LinearFit], seconds: list[float], X_val, y_val, rule: str,
           patience: int) -> tuple[float, int, float]:
    """(C kept, Cs followed, their seconds): the heads' own stop (``select_on_validation``) fed the
    solved path."""
    kept, records = solver.select_on_validation(iter(fits), X_val, y_val, patience, rule)
    return kept.C, len(records), sum(seconds[:len(records)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("features", nargs="?")
    parser.add_argument("--backbone", nargs="+")
    parser.add_argument("--synthetic", action="store_true", help="5,000 / 2,500 x 2,560, 100 classes (float16-rounded)")
    parser.add_argument("--limit", type=float, default=240, help="seconds after which a whole path stops")
    args = parser.parse_args()
    if args.synthetic:
        X, y, V, t = synthetic(5000, 2500, 2560, 100)
        X, V = (a.astype(np.float16).astype(np.float32) for a in (X, V))
    else:
        train, valid = (load_features(args.features, split, args.backbone) for split in ("train", "valid"))
        X, y, V, t = train.features.astype(np.float32), train.labels, valid.features.astype(np.float32), valid.labels
    X, V = standardised(X, V)
    X, y, V, t = (torch.from_numpy(np.ascontiguousarray(a)) for a in (X, np.asarray(y, np.int64), V,
                                                                        np.asarray(t, np.int64)))
    print(f"{args.features or 'synthetic'}: {len(y)} train, {len(t)} valid, {X.shape[1]} features")
    for loss in solver.LOSSES:
        fits, seconds = whole_path(loss, X, y, V, t, args.limit)
        print(f"  {loss}: whole path {len(fits)} Cs, {sum(seconds):.1f} s")
        for rule in selection.SELECT_RULES:
            best = replay(fits, seconds, V, t, rule, len(fits))[0]  # a patience the path never runs out
            cells = []
            for patience in PATIENCES:
                C, followed, spent = replay(fits, seconds, V, t, rule, patience)
                cells.append(f"{patience}: {'same' if C == best else f'C {C:g}'}, {followed} Cs, {spent:.1f} s")
            print(f"    {rule:17s} whole path keeps C {best:<9g} | " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
