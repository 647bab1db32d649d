"""The ``featurekit`` command line. Each subcommand is a thin layer over one stage module.

Every error a user can cause (:class:`~featurekit.errors.FeaturekitError`: bad data, missing
weights, stale or damaged stores, bad images, bad options) and every OS error ends the process
with exit code 1 and one line on stderr naming the file and the reason. Anything else is a bug
and keeps its traceback. Building the parser imports neither torch nor scikit-learn.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

from .errors import FeaturekitError, SettingsError, describe_os_error, one_line

# heads.HEADS' keys, spelled out so that building the parser imports neither torch nor sklearn
# (``featurekit info`` and ``--help`` answer in a fraction of a second); a test keeps them equal.
HEAD_KINDS = ("mlp", "logreg", "svm", "knn")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args) or 0
    except KeyboardInterrupt:
        print("featurekit: interrupted; committed chunks are kept, rerun the same command to resume", file=sys.stderr)
        return 130
    except (FeaturekitError, OSError) as error:
        message = describe_os_error(error) if isinstance(error, OSError) else str(error)
        print(f"featurekit: error: {one_line(message)}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="featurekit", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    _add_extract(commands)
    _add_verify(commands)
    _add_info(commands)
    _add_list_backbones(commands)
    _add_train_head(commands)
    _add_predict(commands)
    _add_finetune(commands)
    return parser


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
"""


def _add_extract(commands) -> None:
    p = commands.add_parser("extract", help="run frozen trunks over an image folder and write HDF5 feature stores",
                            epilog=EXTRACT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_root", type=Path, help="folder holding <split>/<class>/<image>")
    p.add_argument("--split", nargs="+", default=["train", "valid"], help="splits to extract (default: train valid)")
    p.add_argument("--backbone", nargs="+", required=True, help="registry names or torchvision models")
    p.add_argument("--out", type=Path, default=Path("features"), help="output folder (default: features/)")
    p.add_argument("--weights", default="DEFAULT",
                   help="DEFAULT (the recipe's ImageNet weights), a torchvision weight name, IMAGENET, or random")
    p.add_argument("--weights-path", help="local state-dict file (one backbone), loaded by names and shapes")
    p.add_argument("--node", help="graph node to take features from instead of the default (spatial maps are averaged)")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="storage dtype")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="compute precision (auto: bf16 on CUDA and on CPUs with AVX512-BF16/AMX, else fp32)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=None, help="decoding workers (default: sized to the cores)")
    p.add_argument("--chunk-size", type=int, default=512, help="rows committed at a time (resume granularity)")
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
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_extract)


def _run_extract(args) -> int:
    from . import distributed

    launch = distributed.from_environment()  # torchrun: one process per GPU, rank 0 reports
    try:
        return _extract(args, launch)
    finally:
        distributed.shutdown()


def _extract(args, launch) -> int:
    from .backbones import load_backbone
    from .extraction import ExtractSettings, extract_listings, list_split, report_listing
    from .images import DecodePolicy

    if args.weights_path and len(args.backbone) != 1:
        raise SettingsError("--weights-path loads one state dict: give exactly one --backbone")
    decode = DecodePolicy(exif_transpose=not args.no_exif_transpose, backend=args.decoder,
                          refuse_damaged_jpeg=not args.no_jpeg_check,
                          draft_min_side=None if args.full_decode else DecodePolicy.draft_min_side)
    settings = ExtractSettings(
        device=args.device, precision=args.precision, dtype=args.dtype, batch_size=args.batch_size,
        num_workers=args.workers, chunk_size=args.chunk_size, on_error=args.on_error, overwrite=args.overwrite,
        decode=decode, compile=args.compile, progress=not args.quiet and launch.rank == 0, launch=launch,
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
    results = extract_listings(listings, backbones, args.out, settings, log)
    if not report:
        return 0
    elapsed = time.perf_counter() - started
    written = sum(r.rows + len(r.skipped) for r in results if r.status == "written")
    for result in results:
        print(f"{result.path}  {result.rows} rows  {result.status}"
              + (f"  {len(result.skipped)} skipped" if result.skipped else ""))
        for path, reason in result.skipped:
            print(f"  skipped {path}: {reason}")
    images = written // max(1, len(backbones))
    rate = f", {images / elapsed:.1f} images/s over {images} images" if images else ", all up to date"
    processes = f" x {launch.world_size} processes" if launch.world_size > 1 else ""
    print(f"{len(results)} stores in {elapsed:.1f} s{rate} ({settings.device}{processes}, {settings.precision})")
    return 0


def _report_backbone(backbone, weights_path) -> None:
    print(f"{backbone.store_name}: node {backbone.node}, {backbone.feature_dim} features, "
          f"weights {backbone.weights.name} "
          f"(sha256 {backbone.weights.sha256[:12]})", file=sys.stderr)
    report = backbone.weights.report
    if report.missing or report.unexpected or report.shape_mismatch:
        print(f"  {weights_path}: {report.summary()}", file=sys.stderr)


# --------------------------------------------------------------------------- verify


def _add_verify(commands) -> None:
    p = commands.add_parser(
        "verify", help="check stores: complete, sound, unedited, and current with their image folder",
        description="Exit status 1 if any store is incomplete or damaged, has wrong shapes or dtypes, NaN/Inf "
                    "features, was edited, or no longer matches its image folder (images added, removed or "
                    "modified are named), or if stores of one split do not align.")
    p.add_argument("store", type=Path, nargs="+")
    p.add_argument("--data-root", type=Path, help="check against this folder instead of the recorded data_root")
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
    p = commands.add_parser("info", help="describe a feature store")
    p.add_argument("store", type=Path, nargs="+")
    p.add_argument("--json", action="store_true", help="print the attributes as JSON")
    p.set_defaults(run=_run_info)


def _run_info(args) -> int:
    from .store import read_store

    for path in args.store:
        contents = read_store(path, features=False)
        header = contents.header
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
        print(f"  weights {header.weights} sha256 {header.weights_sha256} ({header.weights_source})")
        print(f"  preprocessing {json.dumps(header.preprocessing)}")
        print(f"  decode {json.dumps(header.decode)}, precision {header.precision} on {header.device}")
        print("  classes ({}): ".format(len(counts)) + ", ".join(f"{k} {v}" for k, v in counts.items()))
        print(f"  skipped {len(contents.skipped)} of {header.n_listed} listed"
              + "".join(f"\n    {p}: {r}" for p, r in contents.skipped))
        print(f"  fingerprint {header.fingerprint}, created {header.created}, versions {json.dumps(header.versions)}")
    return 0


def _add_list_backbones(commands) -> None:
    p = commands.add_parser("list-backbones", help="the backbone registry")
    p.set_defaults(run=_run_list_backbones)


def _run_list_backbones(args) -> int:
    from .backbones import REGISTRY, torchvision_classifiers

    for spec in REGISTRY.values():
        print(f"{spec.name:20s} {spec.feature_dim or '?':>5} features  node {spec.feature_node:14s} "
              f"weights {spec.default_weights:14s} {spec.description}")
    others = [name for name in torchvision_classifiers() if name not in REGISTRY]
    print("\nany other torchvision classification model (DEFAULT weights, input of the final classifier layer):\n  "
          + ", ".join(others))
    return 0


def _add_train_head(commands) -> None:
    parser = commands.add_parser("train-head", help="train a head on concatenated backbone features",
                                 description="fit a head on concatenated backbone features, evaluate, write a report")
    parser.add_argument("features_dir", metavar="FEATURES_DIR", type=Path)
    parser.add_argument("--backbones", nargs="+", required=True, metavar="STORE",
                        help="store names (backbone, or backbone@node), concatenated in this order")
    parser.add_argument("--head", default="mlp", choices=[*HEAD_KINDS, "all"],
                        help="all: every head, the best on validation kept")
    parser.add_argument("--train-split", default="train")
    parser.add_argument("--valid-split", default="valid", help="'none' trains without validation (no selection)")
    parser.add_argument("--out", type=Path, help="output folder (default FEATURES_DIR/heads/<head>-<backbones>)")
    parser.add_argument("--device", help="MLP training device (cpu, cuda, cuda:1; default cpu)")
    parser.add_argument("--epochs", type=int, dest="max_epochs", help="MLP: most epochs per candidate (default 50)")
    parser.add_argument("--batch-size", type=int, help="MLP batch size (default 64)")
    parser.add_argument("--hidden", type=int, nargs="+", dest="hidden_sizes", help="MLP hidden sizes (default 1000)")
    parser.add_argument("--lr", type=float, help="MLP Adam learning rate (default 1e-3)")
    parser.add_argument("--patience", type=int, help="MLP early stopping patience in epochs (default 5)")
    parser.add_argument("--seed", type=int, help="MLP initialisation and batch order seed (default 0)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.set_defaults(run=_run_train_head)


# train-head options that become head parameters; None (not given) leaves each head's default.
HEAD_OPTIONS = ("device", "max_epochs", "batch_size", "hidden_sizes", "lr", "patience", "seed")


def _run_train_head(args) -> int:
    from .train import HEAD_FILE, default_out_dir, train_head

    params = {key: getattr(args, key) for key in HEAD_OPTIONS if getattr(args, key) is not None}
    if "hidden_sizes" in params:
        params["hidden_sizes"] = tuple(params["hidden_sizes"])
    valid_split = None if args.valid_split.lower() == "none" else args.valid_split
    report = train_head(args.features_dir, args.backbones, args.head, args.out, args.train_split, valid_split,
                        params, plots=not args.no_plots, log=lambda line: print(line, file=sys.stderr))
    out = args.out or default_out_dir(args.features_dir, args.head, args.backbones)
    valid = report["valid"]
    print(f"{report['head']} head: " + (f"{valid['split']} accuracy {valid['accuracy']:.4f}, " if valid else "")
          + f"written to {out}/ ({HEAD_FILE}, report.json, report.md)")
    return 0


def _add_predict(commands) -> None:
    parser = commands.add_parser("predict", help="classify image files with a trained head",
                                 description="classify image files with a trained head, re-extracting their features")
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders (searched recursively)")
    parser.add_argument("--head", required=True, type=Path,
                        help="head.joblib written by train-head, or model.json (or its folder) written by finetune")
    parser.add_argument("--out", type=Path, default=Path("predictions.csv"))
    parser.add_argument("--topk", type=int, metavar="K",
                        help="write the K likeliest classes and their probabilities instead of one column per class")
    parser.add_argument("--class-names", type=Path, metavar="JSON",
                        help="JSON object of class folder name -> readable name (e.g. cat_to_name.json)")
    parser.add_argument("--format", default="csv", choices=["csv", "kaggle"],
                        help="kaggle: id,label with the probability of the second class (dogs-vs-cats)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None, help="decoding workers (default: sized to the cores)")
    parser.add_argument("--weights-path", nargs="+", default=[], metavar="STORE=FILE",
                        help="load a backbone's weights from FILE instead of the path recorded in the head")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"],
                        help="compute precision (default: the one the head's stores were extracted at); "
                             "another one is written in the output's .json")
    parser.set_defaults(run=_run_predict)


def _run_predict(args) -> int:
    from .predict import predict_files, read_class_names, write_predictions
    from .runner import RunSettings

    if args.topk is not None and (args.topk < 1 or args.format != "csv"):
        raise SettingsError("--topk takes a number of classes of at least 1, with --format csv")
    names = read_class_names(args.class_names) if args.class_names else None
    settings = RunSettings(device=args.device, batch_size=args.batch_size, num_workers=args.workers, progress=False)
    predictions = predict_files(args.head, args.paths, settings, _weights_paths(args.weights_path), args.precision)
    for path, reason in predictions.errors:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    if not predictions.paths:
        raise SettingsError(f"none of the {len(predictions.errors)} files could be decoded")
    write_predictions(predictions, args.out, args.head, args.format, args.topk, names)
    print(f"{len(predictions.paths)} predictions written to {args.out}"
          + (f" ({len(predictions.errors)} files skipped)" if predictions.errors else "")
          + f" ({predictions.settings.device}, {predictions.settings.precision})")
    return 0


FINETUNE_EPILOG = """\
regimes (docs/finetune.md):
  --unfreeze none     the trunks stay as they are; the classifier trains on augmented images
  --unfreeze layer4   every module from layer4 on trains too (_blocks.15, features.28, ...)
  --unfreeze all      the whole trunk trains
  STORE=NODE sets one backbone of a multi-backbone head (e.g. efficientnet_lite0=_blocks.15).
outputs (--out, default: the head's folder/finetuned):
  model.json (+ model.pt, trunks/): predict --head OUT/model.json classifies image files with it
  trunks/<store>.pt: each trained trunk's state dict, for extract --weights-path
  report.json, report.md, learning_curves.png, confusion_matrix.png; checkpoint.pt after every
  epoch: the same command continues a killed run from its last epoch.
"""


def _add_finetune(commands) -> None:
    p = commands.add_parser("finetune", help="fine-tune a head's trunks and classifier on images, from the head",
                            description="train a head's trunks and classifier on the train split's images, "
                                        "starting from the head exactly", epilog=FINETUNE_EPILOG,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_root", type=Path, help="folder holding <split>/<class>/<image>, classes as the head's")
    p.add_argument("--head", required=True, type=Path, help="head.joblib written by train-head")
    p.add_argument("--unfreeze", action="append", metavar="NODE",
                   help="first trainable module of each trunk (layer4, _blocks.15), none, all, or STORE=NODE "
                        "for one backbone (repeatable; default none)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate of the classifier (default 1e-4)")
    p.add_argument("--trunk-lr-scale", type=float, default=0.1, help="trunk learning rate = lr x this (default 0.1)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay of weights (default 0.01)")
    p.add_argument("--warmup-epochs", type=float, default=1.0,
                   help="linear warm-up, then cosine decay (default 1; at most half the steps)")
    p.add_argument("--augment", default="standard", metavar="POLICY",
                   help="train-split augmentation: standard (default), crop-flip or none")
    p.add_argument("--batchnorm", default="frozen", choices=["frozen", "train"],
                   help="BatchNorm of the unfrozen part: frozen statistics (default) or updated by training")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="batch order, augmentation and dropout seed")
    p.add_argument("--train-split", default="train")
    p.add_argument("--valid-split", default="valid", help="scored every epoch; the best epoch is kept")
    p.add_argument("--out", type=Path, help="output folder (default: the head's folder/finetuned)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="trunk compute precision (auto: bf16 on CUDA and on CPUs with AVX512-BF16/AMX, else fp32)")
    p.add_argument("--workers", type=int, default=None, help="decoding workers (default: sized to the cores)")
    p.add_argument("--on-error", default="fail", choices=["fail", "skip"],
                   help="bad images: stop at the first (fail) or leave them out and report them (skip)")
    p.add_argument("--weights-path", nargs="+", default=[], metavar="STORE=FILE",
                   help="load a backbone's weights from FILE instead of the path recorded in the head")
    p.add_argument("--overwrite", action="store_true", help="start over, discarding a checkpoint of another run")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_finetune)


def _weights_paths(pairs: list[str]) -> dict[str, str]:
    if any("=" not in pair for pair in pairs):
        raise SettingsError(f"--weights-path expects STORE=FILE, got {next(p for p in pairs if '=' not in p)!r}")
    return dict(pair.split("=", 1) for pair in pairs)


def _run_finetune(args) -> int:
    from .finetuning import FinetuneSettings, finetune

    settings = FinetuneSettings(
        device=args.device, precision=args.precision, batch_size=args.batch_size, num_workers=args.workers,
        on_error=args.on_error, progress=not args.quiet, unfreeze=tuple(args.unfreeze or ["none"]), epochs=args.epochs,
        lr=args.lr, trunk_lr_scale=args.trunk_lr_scale, weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs, augment=args.augment, batchnorm=args.batchnorm, seed=args.seed,
        train_split=args.train_split, valid_split=args.valid_split, overwrite=args.overwrite, plots=not args.no_plots)
    out = args.out or args.head.parent / "finetuned"
    report = finetune(args.head, args.data_root, out, settings, _weights_paths(args.weights_path),
                      log=lambda line: print(line, file=sys.stderr))
    valid = report["valid"]
    print(f"fine-tuned {report['head']} head: {valid['split']} accuracy {valid['accuracy']:.4f} (epoch "
          f"{report['chosen']['epoch']}; epoch 0, the head: {report['history'][0]['val_accuracy']:.4f}), "
          f"written to {out}/ (model.json, trunks/, report.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
