"""``featurekit extract``."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..backbones.settings import BackboneChoice, RunSettings
from ..extraction.settings import ExtractSettings
from ..images.decode import DecodePolicy
from ..images.sources import SourceSettings
from ..options import add_settings, from_args, given, parent, weights_path_parent
from ..views.augment import ViewPlan
from ._options import add_backbones, command, say

__all__ = ["add_extract"]

EPILOG = """\
A store that matches this run (its fingerprint: files, backbone, weights, preprocessing, settings) is
"up to date"; a killed run resumes from its last committed chunk when the same command runs again;
stores or chunks of other inputs are refused unless --overwrite (docs/reliability.md, docs/scale-out.md)."""


def add_extract(commands) -> None:
    p = command(commands, "extract", "run frozen backbones over an image folder and write HDF5 feature stores",
                epilog=EPILOG, parents=[parent(RunSettings, "device", "precision", "batch_size", "num_workers",
                                               "on_error", "progress"), weights_path_parent()])
    p.add_argument("data_root", nargs="?", help="folder holding <split>/<class>/<image> (<split>/<image>: unlabelled), "
                   "a class folder with --valid-fraction, or WebDataset shards 'dir/train-{000000..000099}.tar'")
    p.add_argument("--split", nargs="+", default=["train", "valid"], help="splits to extract")
    add_backbones(p, "registry names, torchvision models, timm:MODEL, open_clip:MODEL/TAG, hf:REPO (featurekit "
                     "list-backbones)")
    p.add_argument("--out", type=Path, default=Path("features"), help="output folder; stores go to OUT/<split>/")
    add_settings(p, BackboneChoice)
    p.add_argument("--resume", dest="overwrite", action="store_false", default=argparse.SUPPRESS,
                   help="(default) reuse stores and committed chunks of this very run; refuse ones from other inputs")
    add_settings(p, SourceSettings)
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
        results = extract(args.data_root, args.split, args.backbone, args.out, settings,
                          weights_paths=args.weights_path, source=from_args(SourceSettings, args),
                          **given(BackboneChoice, args))
        if launch.rank == 0:
            say(results.lines())
        return 0
    finally:
        distributed.shutdown()
