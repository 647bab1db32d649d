"""``featurekit predict`` and ``neighbors``."""

from __future__ import annotations

import sys
from pathlib import Path

from ..backbones.settings import RunSettings
from ..images.sources import SourceSettings
from ..options import add_settings, from_args, parent, weights_path_parent
from ..predict.settings import NeighborsSettings, PredictOptions
from ._options import add_backbones, command, say

__all__ = ["add_neighbors", "add_predict"]


def add_predict(commands) -> None:
    p = command(commands, "predict", "classify images with a trained head, re-extracting their features (or "
                "scoring stored ones)", parents=[parent(RunSettings, "device", "batch_size", "num_workers", "progress"),
                                                 weights_path_parent(), parent(SourceSettings, "list_file")])
    p.add_argument("paths", nargs="*", metavar="PATH", help="image files, @LIST files; folders: the images in them, or "
                   "a labelled folder <class>/<image> of the head's classes (accuracy and a report beside --out)")
    p.add_argument("--head", required=True, type=Path, help="head.h5 written by train-head, model.json written by "
                                                            "finetune, or the folder holding one of them")
    p.add_argument("--out", default="predictions.csv", help="the table (and OUT.json beside it: how the features were "
                                                            "made); - writes it to stdout and no .json")
    add_settings(p, PredictOptions)
    p.set_defaults(run=run_predict)


def run_predict(args) -> None:
    from ..predict.outputs import predict_to

    to_stdout = args.out == "-"
    paths = args.paths + ([f"@{args.list_file}"] if args.list_file else [])
    lines = predict_to(args.head, paths, sys.stdout if to_stdout else args.out, from_args(PredictOptions, args),
                       from_args(RunSettings, args), args.weights_path)
    say(lines, error=to_stdout)


NEIGHBORS_EPILOG = """\
e.g. neighbors --head HEAD --sheet worst.png: the head's mistakes, worst first, with their nearest
training images; neighbors --features DIR --backbone NAME --image photo.jpg: the images nearest to it."""


def add_neighbors(commands) -> None:
    p = command(commands, "neighbors", "show the training images nearest to query images or to a head's mistakes, "
                "as text and a contact sheet", epilog=NEIGHBORS_EPILOG,
                parents=[parent(RunSettings, "device", "progress")])
    p.add_argument("--head", type=Path, help="a head file or its folder: its stores are searched, and without "
                   "--image its misclassified validation images are the queries (default: none; then give "
                   "--features and --backbone)")
    p.add_argument("--features", type=Path, metavar="FEATURES_DIR",
                   help="extract's --out folder (default: the one the head was trained from)")
    add_backbones(p, "stores to search, concatenated (default: the head's)", required=False)
    p.add_argument("--image", nargs="+", metavar="PATH", help="query image files or folders, as predict takes them "
                                                              "(default: the head's misclassified validation images)")
    add_settings(p, NeighborsSettings)
    add_settings(p, PredictOptions, "trust_paths")
    p.set_defaults(run=run_neighbors)


def run_neighbors(args) -> None:
    from ..predict.neighbors import neighbors_report

    lines, summary = neighbors_report(args.head, args.features, args.backbone, args.image, from_args(
        NeighborsSettings, args), from_args(RunSettings, args, num_workers=None), args.trust_paths)
    say(lines)
    say(summary, error=True)
