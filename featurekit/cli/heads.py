"""featurekit train-head and convert-head."""

from __future__ import annotations

import sys
from pathlib import Path

from ..store.layout import TTA_VIEWS
from ._options import backbone_option, command

HEAD_KINDS = ("mlp", "logreg", "svm", "knn")

def add_train_head(commands) -> None:
    parser = command(commands, "train-head", "train a classifier head on the stores of one or more backbones",
                      description="Fit a head on the concatenated features of stores, choose its hyper-parameters "
                                  "on the validation split, and write the head file and a report.")
    parser.add_argument("features_dir", metavar="FEATURES_DIR", type=Path, help="extract's --out folder")
    backbone_option(parser, "stores to concatenate, in this order: backbone names as extract wrote them "
                             "(backbone, or backbone@node)")
    parser.add_argument("--head", default="mlp", choices=[*HEAD_KINDS, "all"],
                        help="head kind; all: every kind, the best on validation kept")
    parser.add_argument("--train-split", default="train", help="split to fit on")
    parser.add_argument("--valid-split", default="valid",
                        help="split to choose hyper-parameters on and evaluate; none: no validation, no selection")
    parser.add_argument("--out", type=Path, help="output folder (default: FEATURES_DIR/heads/<head>-<backbones>)")
    parser.add_argument("--device", help="training device of the mlp, logreg and svm heads: auto (cuda if "
                                         "available), cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--epochs", type=int, dest="max_epochs", help="MLP: most epochs per candidate (default: 50)")
    parser.add_argument("--batch-size", type=int,
                        help="MLP batch size (default: 256, 128 or 64: the largest with 16 steps per epoch)")
    parser.add_argument("--hidden", type=int, nargs="+", dest="hidden_sizes",
                        help="MLP hidden layer sizes (default: 1000)")
    parser.add_argument("--lr", type=float, help="MLP Adam learning rate (default: 1e-3)")
    parser.add_argument("--patience", type=int, help="MLP early stopping patience in epochs (default: 3)")
    parser.add_argument("--seed", type=int, help="MLP initialisation and batch order seed (default: 0)")
    parser.add_argument("--no-augmented", action="store_true",
                        help="ignore the train stores' augmented views (extract --augment), to compare")
    parser.add_argument("--tta", default="none", choices=list(TTA_VIEWS),
                        help="also report valid accuracy with test-time augmentation; the valid stores must hold "
                             "those views (extract --split VALID --tta MODE)")
    parser.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    parser.set_defaults(run=_run_train_head)


# train-head options that become head parameters; None (not given) leaves each head's default.
HEAD_OPTIONS = ("device", "max_epochs", "batch_size", "hidden_sizes", "lr", "patience", "seed")


def _run_train_head(args) -> int:
    from ..heads.train import default_out_dir, train_head

    params = {key: getattr(args, key) for key in HEAD_OPTIONS if getattr(args, key) is not None}
    if "hidden_sizes" in params:
        params["hidden_sizes"] = tuple(params["hidden_sizes"])
    valid_split = None if args.valid_split.lower() == "none" else args.valid_split
    report = train_head(args.features_dir, args.backbone, args.head, args.out, args.train_split, valid_split,
                        params, plots=not args.no_plots, log=lambda line: print(line, file=sys.stderr),
                        augmented=not args.no_augmented, tta=args.tta)
    out = args.out or default_out_dir(args.features_dir, args.head, args.backbone)
    valid, tta = report["valid"], report["valid_tta"]
    print(f"{report['head']} head: " + (f"{valid['split']} accuracy {valid['accuracy']:.4f}, " if valid else "")
          + (f"with {tta['mode']} test-time augmentation {tta['accuracy']:.4f}, " if tta else "")
          + f"written to {out}/ ({', '.join(report['files'])})")
    return 0


def add_convert_head(commands) -> None:
    parser = command(commands, "convert-head", "rewrite an old pickle head (head.joblib) as a head file (head.h5)",
                      description="Read a head file of featurekit before head format 2 (a joblib pickle) and write "
                                  "it as a head.h5 file, which loads without running code. Unpickling runs any code "
                                  "the old file holds: give --trust only if you trust who made it.")
    parser.add_argument("old", type=Path, metavar="OLD", help="the old head file (head.joblib)")
    parser.add_argument("new", type=Path, metavar="NEW", help="the head file to write (e.g. head.h5 beside it)")
    parser.add_argument("--trust", action="store_true", help="unpickle OLD (required: it runs the code OLD holds)")
    parser.set_defaults(run=_run_convert_head)


def _run_convert_head(args) -> int:
    from ..heads.head_file import convert_pickle_head

    print(f"wrote {convert_pickle_head(args.old, args.new, args.trust)}")
    return 0
