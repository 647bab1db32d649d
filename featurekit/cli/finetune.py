"""featurekit finetune."""

from __future__ import annotations

import sys
from pathlib import Path

from ._options import command, weights_paths

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


def add_finetune(commands) -> None:
    p = command(commands, "finetune", "fine-tune a head's trunks and classifier on images, starting from the head",
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
    from ..finetuning.artifact import find_head_file
    from ..finetuning.loop import FinetuneSettings
    from ..finetuning.run import finetune

    settings = FinetuneSettings(
        device=args.device, precision=args.precision, batch_size=args.batch_size, num_workers=args.workers,
        on_error=args.on_error, progress=not args.quiet, unfreeze=tuple(args.unfreeze or ["none"]), epochs=args.epochs,
        lr=args.lr, trunk_lr_scale=args.trunk_lr_scale, weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs, augment=args.augment, batchnorm=args.batchnorm, seed=args.seed,
        train_split=args.train_split, valid_split=args.valid_split, overwrite=args.overwrite, plots=not args.no_plots)
    head_file = find_head_file(args.head)
    out = args.out or head_file.parent / "finetuned"
    report = finetune(head_file, args.data_root, out, settings, weights_paths(args.weights_path),
                      log=lambda line: print(line, file=sys.stderr))
    valid = report["valid"]
    print(f"fine-tuned {report['head']} head: {valid['split']} accuracy {valid['accuracy']:.4f} (epoch "
          f"{report['chosen']['epoch']}; epoch 0, the head: {report['history'][0]['val_accuracy']:.4f}), "
          f"written to {out}/ (model.json, trunks/, report.md)")
    return 0
