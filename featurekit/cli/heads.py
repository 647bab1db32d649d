"""``featurekit train-head``, ``evaluate`` and ``convert-head``."""

from __future__ import annotations

from pathlib import Path

from ..heads.settings import EvaluateSettings, HeadOptions, TrainHeadSettings
from ..options import add_settings, from_args, given
from ._options import add_backbones, command, library, say

__all__ = ["add_convert_head", "add_evaluate", "add_train_head"]


def add_train_head(commands) -> None:
    p = command(commands, "train-head", "train a classifier head on the stores of one or more backbones",
                description="Fit a head on the concatenated features of stores, choose its hyper-parameters on the "
                            "validation split, and write the head file and a report.")
    p.add_argument("features_dir", metavar="FEATURES_DIR", type=Path, help="extract's --out folder")
    add_backbones(p, "stores to concatenate, in this order: backbone names as extract wrote them (backbone, or "
                     "backbone@node)")
    p.add_argument("--out", type=Path, help="output folder (default: FEATURES_DIR/heads/<head>-<backbones>)")
    add_settings(p, HeadOptions)
    add_settings(p, TrainHeadSettings)
    p.set_defaults(run=run_train_head)


def run_train_head(args) -> None:
    from ..heads.train import summary, train_head

    chosen = from_args(TrainHeadSettings, args)
    report = train_head(args.features_dir, args.backbone, chosen.head, args.out, chosen.train_split,
                        chosen.valid_split, given(HeadOptions, args), chosen.plots, chosen.augmented, chosen.tta,
                        chosen.exclude)
    say(summary(report))


def add_evaluate(commands) -> None:
    p = command(commands, "evaluate", "few-shot accuracy of heads: k training images per class, several draws",
                description="Fit each head at its defaults on k training images of every class per seeded draw, "
                            "score the whole valid split, and write the mean accuracy and its 95% interval per head "
                            "and k, and on all training images (evaluation.json, evaluation.md, a plot).")
    p.add_argument("features_dir", metavar="FEATURES_DIR", type=Path, help="extract's --out folder")
    add_backbones(p, "stores to concatenate, in this order (as train-head takes them)")
    add_settings(p, EvaluateSettings)
    add_settings(p, HeadOptions, skip=("select", "seed", "patience"))  # no validation rows; --seed: the draws'
    p.set_defaults(run=lambda args: say(library("heads.fewshot").evaluate_and_summarise(
        args.features_dir, args.backbone, from_args(EvaluateSettings, args), given(HeadOptions, args))))


def add_convert_head(commands) -> None:
    p = command(commands, "convert-head", "rewrite an old pickle head (head.joblib) as a head file (head.h5)",
                description="Read a head file of featurekit before head format 2 (a joblib pickle) and write it as "
                            "a head.h5 file, which loads without running code. Unpickling runs any code the old "
                            "file holds: give --trust only if you trust who made it.")
    p.add_argument("old", type=Path, metavar="OLD", help="the old head file (head.joblib)")
    p.add_argument("new", type=Path, metavar="NEW", help="the head file to write (e.g. head.h5 beside it)")
    p.add_argument("--trust", action="store_true", help="unpickle OLD (required: it runs the code OLD holds)")
    p.set_defaults(run=lambda args: say("wrote " + str(library("heads.head_file").convert_pickle_head(
        args.old, args.new, args.trust))))
