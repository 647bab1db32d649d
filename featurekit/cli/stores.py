"""featurekit verify, info and list-backbones."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..backbones.registry import RANDOM, REGISTRY, random_weights_warning, torchvision_model_names
from ._options import command

# --------------------------------------------------------------------------- verify


def add_verify(commands) -> None:
    p = command(commands, "verify", "check stores: complete, sound, unedited, and current with their image folder",
                 description="Check feature stores. Exit status 1 if any store is incomplete or damaged, has wrong "
                             "shapes or dtypes, NaN/Inf features, was edited, or no longer matches its image folder "
                             "(images added, removed or modified are named), or if stores of one split do not align.")
    p.add_argument("store", type=Path, nargs="+", help="store files (OUT/<split>/<backbone>.h5)")
    p.add_argument("--data-root", type=Path,
                   help="check against this folder (default: the data root recorded in each store)")
    p.set_defaults(run=_run_verify)


def _run_verify(args) -> int:
    from ..store.verify import verify_stores

    reports = verify_stores(args.store, args.data_root)
    for report in reports:
        if report.ok:
            print(f"{report.path}: OK ({report.rows} rows, {report.skipped} skipped, matches its image folder)")
        for problem in report.problems:
            print(f"{report.path}: {problem}")
    failed = sum(not report.ok for report in reports)
    if failed:
        print(f"featurekit: verify: {failed} of {len(reports)} stores have problems", file=sys.stderr)
    return 1 if failed else 0


# --------------------------------------------------------------------------- info, list-backbones


def add_info(commands) -> None:
    p = command(commands, "info", "describe feature stores: rows, classes, backbone, weights, how they were made")
    p.add_argument("store", type=Path, nargs="+", help="store files (OUT/<split>/<backbone>.h5)")
    p.add_argument("--json", action="store_true", help="print each store's attributes as one line of JSON")
    p.set_defaults(run=_run_info)


def _run_info(args) -> int:
    from ..store.format import read_store

    for path in args.store:
        contents = read_store(path, features=False)
        header = contents.header
        if header.weights == RANDOM:
            print(random_weights_warning([str(path)]), file=sys.stderr)
        if args.json:
            print(json.dumps({"path": str(path), **header.to_dict(), "rows": len(contents.paths),
                              "classes": contents.classes}))
            continue
        counts = dict.fromkeys(contents.classes, 0)
        for label in contents.labels:
            counts[contents.classes[label]] += 1
        print(f"{path}")
        print(f"  split {header.split} of {header.data_root}")
        print(f"  backbone {header.backbone} node {header.node}: features {header.dtype}[{len(contents.paths)}, "
              f"{header.feature_dim}]")
        if header.extra_datasets:
            shapes = header.feature_shapes(len(contents.paths))
            about = {"features_aug": f"{header.augment_views} augmented views, policy "
                                     f"{(header.augment_policy or {}).get('name')}, seed {header.augment_seed}",
                     "features_tta": f"{header.tta} test-time views"}
            print("  views: " + ", ".join(f"{name} {header.dtype}{list(shapes[name])} ({about[name]})"
                                          for name in header.extra_datasets))
        print(f"  weights {header.weights} sha256 {header.weights_sha256} ({header.weights_source})")
        print(f"  preprocessing {json.dumps(header.preprocessing)}")
        print(f"  decode {json.dumps(header.decode)}, precision {header.precision} on {header.device}")
        print("  classes ({}): ".format(len(counts)) + ", ".join(f"{k} {v}" for k, v in counts.items()))
        print(f"  skipped {len(contents.skipped)} of {header.n_listed} listed"
              + "".join(f"\n    {p}: {r}" for p, r in contents.skipped))
        print(f"  fingerprint {header.fingerprint}, created {header.created}, versions {json.dumps(header.versions)}")
    return 0


def add_list_backbones(commands) -> None:
    p = command(commands, "list-backbones", "list the backbones extract knows: the registry and torchvision's models")
    p.set_defaults(run=_run_list_backbones)


def _run_list_backbones(args) -> int:
    for spec in REGISTRY.values():
        print(f"{spec.name:20s} {spec.feature_dim or '?':>5} features  node {spec.feature_node:14s} "
              f"weights {spec.default_weights:14s} {spec.description}")
    others = [name for name in torchvision_model_names() if name not in REGISTRY]
    print("\nany other torchvision classification model (DEFAULT weights, input of the final classifier layer):\n  "
          + ", ".join(others))
    return 0
