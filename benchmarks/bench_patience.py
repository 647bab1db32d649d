"""How many Cs past its last improvement must a linear head's path follow? (``C_patience``, issue 21)

The linear heads stop their C path once ``patience`` Cs in a row have not changed what the selection
rule keeps; every C past the kept one costs more than the one before (larger C: more iterations).
Here each loss follows the whole 45-C grid (each C to the sweep's 1% gap, scored on the valid split),
and the stop is replayed on those records for patience 2-5 under every rule: the C kept, the Cs
followed and their seconds, against the whole path's choice. ``selection.PATH_PATIENCE`` comes from
this (docs/heads.md has the table).

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


def whole_path(loss: str, X, y, X_val, y_val, limit: float) -> list[dict]:
    """One record per C of the grid (validation scores, seconds), until ``limit`` seconds have passed."""
    records, start = [], time.perf_counter()
    last = start
    for fit in solver.fit_path(X, y, list(C_GRID), loss, tol=solver.SWEEP_TOL):
        now = time.perf_counter()
        records.append({"C": fit.C, **solver.validation_scores(fit, X_val, y_val), "seconds": now - last})
        last = now
        if now - start > limit:
            break
    return records


def replay(records: list[dict], rule: str, rows: int, patience: int) -> tuple[float, int, float]:
    """(C kept, Cs followed, their seconds) had the path stopped ``patience`` Cs past its last improvement."""
    seen, since = [], 0
    for record in records:
        seen.append(record)
        since = 0 if selection.improved(seen, rule, rows) else since + 1
        if since >= patience:
            break
    return seen[selection.choose(seen, rule, rows)]["C"], len(seen), sum(r["seconds"] for r in seen)


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
        records = whole_path(loss, X, y, V, t, args.limit)
        total = sum(r["seconds"] for r in records)
        print(f"  {loss}: whole path {len(records)} Cs, {total:.1f} s")
        for rule in selection.SELECT_RULES:
            best = records[selection.choose(records, rule, len(t))]["C"]
            cells = []
            for patience in PATIENCES:
                C, followed, seconds = replay(records, rule, len(t), patience)
                cells.append(f"{patience}: {'same' if C == best else f'C {C:g}'}, {followed} Cs, {seconds:.1f} s")
            print(f"    {rule:17s} whole path keeps C {best:<9g} | " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
