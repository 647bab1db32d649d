"""featurekit predict and neighbors."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ..backbones.registry import RANDOM
from ..errors import SettingsError
from ..store.layout import TTA_VIEWS
from ._options import command, stderr, warn_random, weights_paths

PREDICT_EPILOG = """\
what PATH may be:
  an image file; a labelled folder <class>/<image> whose subfolders are all classes of the head
  (such as data/valid): listed as extract lists a split, accuracy printed and a report written
  beside --out (OUT.report.md, OUT.report.json, OUT.confusion_matrix.png; with --out - the accuracy
  only); any other folder: the images directly in it (subfolders are not searched, and are named
  on stderr).
"""


def add_predict(commands) -> None:
    parser = command(commands, "predict", "classify images with a trained head, re-extracting their features",
                      epilog=PREDICT_EPILOG)
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files, or folders of them (see below)")
    parser.add_argument("--head", required=True, type=Path,
                        help="head.h5 written by train-head, model.json written by finetune, or the folder "
                             "holding one of them")
    parser.add_argument("--out", default="predictions.csv",
                        help="CSV file (and OUT.json beside it: how the features were made); - writes the CSV to "
                             "stdout and no .json")
    parser.add_argument("--format", default="csv", choices=["csv", "kaggle"],
                        help="csv: path, predicted, one probability per class; kaggle: id,label with the "
                             "probability of the second class (dogs-vs-cats)")
    parser.add_argument("--topk", type=int, metavar="K",
                        help="csv columns top1, top1_prob, ... topK, topK_prob instead of one per class "
                             "(default: one column per class)")
    parser.add_argument("--class-names", type=Path, metavar="JSON",
                        help="JSON object of class folder name -> readable name (e.g. cat_to_name.json), written "
                             "in the predicted and topI columns (default: the folder names)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    parser.add_argument("--workers", type=int, default=None, help="decoding processes (default: sized to the cores)")
    parser.add_argument("--weights-path", nargs="+", default=[], metavar="STORE=FILE",
                        help="load a backbone's weights from FILE instead of the path recorded in the head "
                             "(default: the recorded path)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"],
                        help="compute precision (default: the one the head's stores were extracted at); "
                             "another one is written in the output's .json")
    parser.add_argument("--tta", default="none", choices=list(TTA_VIEWS),
                        help="average each image's class probabilities over test-time views: flip (and mirror), "
                             "five-crop (centre and corners)")
    parser.add_argument("--no-plots", action="store_true", help="labelled folders: no confusion-matrix PNG")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=_run_predict)



def _run_predict(args) -> int:
    from ..backbones.settings import RunSettings
    from ..finetuning.artifact import find_head_file, load_classifier
    from ..predict.classify import predict_files
    from ..predict.outputs import check_output, read_class_names, write_predictions

    paths = weights_paths(args.weights_path)
    started = time.perf_counter()
    head_path = find_head_file(args.head)
    loaded = load_classifier(head_path)
    metadata = loaded[1]
    names = read_class_names(args.class_names) if args.class_names else None
    check_output(metadata["classes"], args.format, args.topk, names)  # before any image is read
    warn_random([b["store_name"] for b in metadata["backbones"] if b["weights"] == RANDOM], stderr)
    settings = RunSettings(device=args.device, batch_size=args.batch_size, num_workers=args.workers,
                           progress=not args.quiet)
    predictions = predict_files(head_path, args.paths, settings, paths, args.precision, args.tta, loaded)
    for line in predictions.notices:
        stderr(line)
    for path, reason in predictions.errors:
        stderr(f"skipped {path}: {reason}")
    if not predictions.paths:
        raise SettingsError(f"none of the {len(predictions.errors)} files could be decoded")
    to_stdout = args.out == "-"
    out = sys.stdout if to_stdout else Path(args.out)
    written = write_predictions(predictions, out, head_path, args.format, args.topk, names)
    elapsed = time.perf_counter() - started
    say = stderr if to_stdout else print
    _report_labelled(predictions, head_path, None if to_stdout else Path(args.out), not args.no_plots, say)
    count = len(predictions.paths)
    say(f"{count} predictions written to {'stdout' if to_stdout else ', '.join(map(str, written))}"
        + (f" ({len(predictions.errors)} files skipped)" if predictions.errors else "")
        + f" ({predictions.settings.device}, {predictions.settings.precision}) in {elapsed:.1f} s, "
        f"{count / elapsed:.1f} images/s")
    return 0


def _report_labelled(predictions, head_path: Path, out: Path | None, plots: bool, say) -> None:
    """Accuracy over the images of labelled folders, and the report files beside ``out``."""
    from ..heads.report import labelled_metrics, write_prediction_report

    evaluation = labelled_metrics(predictions.truth, predictions.proba, predictions.classes)
    if evaluation is None:
        return
    say(f"labelled images: accuracy {evaluation['accuracy']:.4f} over {evaluation['n']} images, balanced accuracy "
        f"{evaluation['balanced_accuracy']:.4f}")
    if out is not None:
        about = {"head": str(head_path), "folders": predictions.labelled_folders, "rows": len(predictions.paths)}
        files = write_prediction_report(out, about, evaluation, predictions.classes, plots, stderr)
        say(f"per-class report: {', '.join(map(str, files))}")



NEIGHBORS_EPILOG = """\
examples:
  featurekit neighbors --head features/heads/logreg-efficientnet_lite0 --sheet worst.png
      each validation image the head gets wrong, worst first, with its nearest training images
  featurekit neighbors --features features --backbone efficientnet_lite0 --image photo.jpg
      the training images nearest to photo.jpg
nearness: cosine similarity of features standardised with the training split's mean and std.
"""


def add_neighbors(commands) -> None:
    parser = command(commands, "neighbors", "show the training images nearest to query images or to a head's "
                      "mistakes, as text and a contact sheet", epilog=NEIGHBORS_EPILOG)
    parser.add_argument("--head", type=Path, help="a head file or its folder: its stores are searched, and without "
                                                  "--image its misclassified validation images are the queries "
                                                  "(default: none; then give --features and --backbone)")
    parser.add_argument("--features", type=Path, metavar="FEATURES_DIR",
                        help="extract's --out folder (default: the one the head was trained from)")
    parser.add_argument("--backbone", "--backbones", dest="backbone", nargs="+", metavar="NAME",
                        help="stores to search, concatenated (default: the head's)")
    parser.add_argument("--image", nargs="+", metavar="PATH",
                        help="query image files or folders, as predict takes them (default: the head's "
                             "misclassified validation images)")
    parser.add_argument("--split", help="split searched for neighbours (default: the head's training split, or train)")
    parser.add_argument("--valid-split", help="split of the misclassified images (default: the head's validation "
                                              "split)")
    parser.add_argument("-k", "--neighbors", dest="k", type=int, default=5, help="neighbours per query")
    parser.add_argument("--sheet", type=Path, metavar="PNG", help="write a contact sheet of the queries and their "
                                                                  "neighbours (default: none)")
    parser.add_argument("--worst", type=int, default=16, help="queries on the contact sheet, worst first")
    parser.add_argument("--json", action="store_true", help="print one line of JSON instead of text")
    parser.add_argument("--device", default="auto", help="query images: auto (cuda if available), cpu, cuda or cuda:N")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=_run_neighbors)


def _run_neighbors(args) -> int:
    from ..backbones.settings import RunSettings
    from ..finetuning.artifact import find_head_file
    from ..heads.head_file import load_head
    from ..predict.neighbors import (
        Gallery,
        contact_sheet,
        describe_query,
        image_queries,
        misclassified_queries,
        queries_json,
    )
    from ..store.dataset import load_features

    if args.k < 1 or args.worst < 1:
        raise SettingsError(f"-k and --worst must be at least 1 (got {args.k}, {args.worst})")
    head, metadata = load_head(find_head_file(args.head)) if args.head else (None, None)
    if head is None and not (args.features and args.backbone and args.image):
        raise SettingsError("give --head HEAD (its mistakes, or --image), or --features DIR --backbone NAME --image "
                            "PATH")
    if head is not None and args.backbone:
        raise SettingsError("--backbone: a head searches the stores it was trained on; leave --backbone out")
    features_dir = args.features or Path(metadata["features_dir"])
    stores = args.backbone or [b["store_name"] for b in metadata["backbones"]]
    split = args.split or (metadata["train_split"] if metadata else "train")
    gallery = Gallery(load_features(features_dir, split, stores))
    warn_random([i.store_name for i in gallery.train.stores if i.header.weights == RANDOM], stderr)
    about = {"features_dir": str(features_dir), "stores": stores, "split": split, "head": str(args.head or "")}
    if args.image:
        settings = RunSettings(device=args.device, num_workers=None, progress=not args.quiet)
        queries, notices = image_queries(gallery, args.image, args.k, head, metadata, settings)
        for line in notices:
            stderr(line)
        summary = f"{len(queries)} query images, {args.k} nearest of {len(gallery.train)} {split} images each"
    else:
        valid_split = args.valid_split or metadata["valid_split"]
        if not valid_split:
            raise SettingsError(f"{args.head}: trained without a validation split; give --valid-split or --image")
        queries, scored = misclassified_queries(gallery, head, metadata, features_dir, valid_split, args.k)
        summary = (f"{len(queries)} of {scored} {valid_split} images misclassified, worst first, each with its "
                   f"{args.k} nearest {split} images")
    if args.json:
        print(queries_json(queries, about))
    else:
        for query in queries:
            print("\n".join(describe_query(query)))
    if args.sheet and queries:
        shown = queries[:args.worst]
        title = f"{', '.join(stores)}: {summary}" + (f" (first {len(shown)})" if len(shown) < len(queries) else "")
        summary += f"; contact sheet {contact_sheet(shown, args.sheet, gallery.decode, title)}"
    stderr(summary)
    return 0
