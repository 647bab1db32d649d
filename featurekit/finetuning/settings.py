"""How to fine-tune: :class:`FinetuneSettings` (no torch imported here)."""

from __future__ import annotations

from dataclasses import dataclass

from ..backbones.settings import RunSettings
from ..devices import AUTO
from ..errors import SettingsError
from ..options import setting
from ..views.augment import AUGMENT_POLICIES, DEFAULT_AUGMENT_POLICY, augment_policy

__all__ = ["BATCHNORM_MODES", "FINETUNABLE_HEADS", "FinetuneSettings"]

FINETUNABLE_HEADS = ("mlp", "logreg", "svm")
BATCHNORM_MODES = ("frozen", "train")


@dataclass(frozen=True)
class FinetuneSettings(RunSettings):
    """How to fine-tune; the decode policy and storage dtype always come from the head's stores.

    ``unfreeze``: ``NODE`` for every trunk (a module path, ``none`` or ``all``) and/or ``STORE=NODE``
    for one; ``warmup_epochs``: linear warm-up length (at most half the steps); ``batchnorm``:
    ``frozen`` (running statistics of the unfrozen part kept) or ``train``.
    """

    precision: str = setting(AUTO, "trunk compute precision (auto: bf16 on CUDA and on CPUs with AVX512-BF16/AMX, "
                             "else fp32)", choices=(AUTO, "fp32", "bf16"))
    unfreeze: tuple[str, ...] = setting(("none",), "first trainable module of each trunk (layer4, _blocks.15, "
                                        "blocks.10), none, all, or STORE=NODE for one backbone", metavar="NODE")
    epochs: int = setting(5, "epochs to train; the best on --valid-split is kept")
    lr: float = setting(1e-4, "AdamW learning rate of the classifier")
    trunk_lr_scale: float = setting(0.1, "trunk learning rate = lr x this")
    weight_decay: float = setting(0.01, "AdamW weight decay of weights")
    warmup_epochs: float = setting(1.0, "linear warm-up, then cosine decay (at most half the steps)")
    augment: str = setting(DEFAULT_AUGMENT_POLICY, f"train-split augmentation: {', '.join(AUGMENT_POLICIES)}",
                           metavar="POLICY")
    batchnorm: str = setting("frozen", "BatchNorm of the unfrozen part: frozen statistics or updated by training",
                             choices=BATCHNORM_MODES)
    seed: int = setting(0, "batch order, augmentation and dropout seed")
    train_split: str = setting("train", "split trained on")
    valid_split: str = setting("valid", "scored every epoch; the best epoch is kept")
    overwrite: bool = setting(False, "start over, discarding a checkpoint of another run")
    plots: bool = setting(True, "skip the PNG plots", flag="--no-plots", negate=True)

    def resolved(self, local_rank: int | None = None, processes_per_node: int = 1) -> "FinetuneSettings":
        resolved = super().resolved(local_rank, processes_per_node)
        augment_policy(self.augment)
        problems = [
            (self.epochs < 1, f"--epochs must be at least 1 (got {self.epochs})"),
            (not self.lr > 0, f"--lr must be positive (got {self.lr})"),
            (not self.trunk_lr_scale >= 0, f"--trunk-lr-scale must be 0 or more (got {self.trunk_lr_scale})"),
            (not self.warmup_epochs >= 0, f"--warmup-epochs must be 0 or more (got {self.warmup_epochs})"),
            (self.batchnorm not in BATCHNORM_MODES, f"unknown --batchnorm {self.batchnorm!r} (frozen or train)"),
            (resolved.precision == "fp16", "--precision fp16 would need loss scaling; fine-tune in bf16 or fp32"),
            (self.compile, "finetune does not torch.compile its model"),
        ]
        for bad, message in problems:
            if bad:
                raise SettingsError(message)
        return resolved
