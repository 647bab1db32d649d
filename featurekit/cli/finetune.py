"""``featurekit finetune``."""

from __future__ import annotations

from pathlib import Path

from ..finetuning.settings import FinetuneSettings
from ..options import add_settings, from_args, weights_path_parent
from ._options import command, say

__all__ = ["add_finetune"]

EPILOG = """\
--unfreeze: none (the classifier trains on augmented images), a module (layer4, _blocks.15, blocks.10:
it and what follows train too), all, or STORE=NODE for one backbone. Writes model.json (predict --head
OUT), trunks/<store>.pt (extract --weights-path), reports, and checkpoint.pt after every epoch: the same
command continues a killed run (docs/finetune.md)."""


def add_finetune(commands) -> None:
    p = command(commands, "finetune", "fine-tune a head's trunks and classifier on images, starting from the head",
                description="Train a head's trunks and classifier on the train split's images, starting exactly "
                            "from the head.", epilog=EPILOG, parents=[weights_path_parent()])
    p.add_argument("data_root", type=Path, help="folder holding <split>/<class>/<image>, classes as the head's")
    p.add_argument("--head", required=True, type=Path,
                   help="head.h5 written by train-head, or the folder train-head wrote it into")
    p.add_argument("--out", type=Path, help="output folder (default: the head's folder/finetuned)")
    add_settings(p, FinetuneSettings)
    p.set_defaults(run=run_finetune)


def run_finetune(args) -> None:
    from ..finetuning.run import finetune, summary

    say(summary(finetune(args.head, args.data_root, args.out, from_args(FinetuneSettings, args), args.weights_path)))
