"""One epoch of fine-tuning, and one evaluation, on an image folder (used by :mod:`featurekit.finetuning`).

Training views: the train split's images under an augmentation policy (:mod:`featurekit.views.augment`:
view ``epoch`` of image ``i``, seeded by (seed, i, epoch)), PIL-decoded, ending in the weights' own
normalisation on the device. Valid views: exactly the store's (plain view, recorded decode
policy, GPU decoding included). AdamW, the trunks at ``lr * trunk_lr_scale``, weight decay on
matrices and kernels only, a linear warm-up then a cosine decay, set per step. An epoch's batch
order, augmentations and dropout masks depend on (seed, epoch) only, so an epoch run after a
resume is the epoch an uninterrupted run would have run (bit for bit on the CPU).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..backbones.runner import device_views
from ..errors import FinetuneError, ImageDecodeError
from ..heads.selection import PROBABILITY_FLOOR
from ..images.listing import SplitListing, list_split
from ..images.names import printable_path
from ..views.augment import AugmentPolicy, augment_policy, view_seed, views_refusal
from ..views.loader import ViewBatch, ViewDataset, collate_views, iterate_views
from .model import FinetuneModel
from .settings import FinetuneSettings

__all__ = ["Evaluation", "Finetuner", "Split", "head_split", "parameter_groups", "train_step", "unfreeze_map"]

# --------------------------------------------------------------------------- data


class AugmentedViews(ViewDataset):
    """View ``epoch`` of image ``i`` under ``policy`` (seeded by seed, i, epoch), per preprocessing."""

    def __init__(self, sources, preprocessings, decode, policy: AugmentPolicy, seed: int, epoch: int):
        super().__init__(sources, preprocessings, decode)
        self.augment, self.seed, self.epoch = policy, seed, epoch  # self.policy is the decode policy
        refusal = next(filter(None, (views_refusal(p, f"{policy.name} views") for p in preprocessings)), None)
        if policy.is_random and refusal:
            raise FinetuneError(f"{refusal}: fine-tune with --augment none")

    def _views(self, image, index: int) -> dict[str, torch.Tensor]:
        return {key: self.augment.view(image, preprocessing, self.seed, index, self.epoch)
                for key, preprocessing in self.preprocessings.items()}


@dataclass
class Split:
    """A listed split; ``labels``: int64[N], indices into the head's classes."""

    listing: SplitListing
    labels: np.ndarray

    @property
    def sources(self) -> list[tuple[str, str]]:
        return self.listing.files()


def head_split(root: str | Path, split: str, classes: Sequence[str], head_path: Path, exact: bool) -> Split:
    """List ``root/split``; its classes with images must be the head's (``exact``) or among them."""
    listing = list_split(root, split)
    if not listing.labelled:
        raise FinetuneError(f"{listing.display}: images without classes (no class folders): nothing to train or "
                            "score a fine-tuned model on")
    names = [printable_path(name) for name in listing.classes]  # as stores, and so heads, record them
    present = [names[label] for label in sorted({r.label for r in listing.records})]
    differences = [f"{kind}: {', '.join(names)}" for kind, names in (
        ("missing here", [c for c in classes if c not in present] if exact else []),
        ("not in the head", [c for c in present if c not in classes])) if names]
    if differences:
        raise FinetuneError(f"{listing.display_dir}: classes differ from those of the head {head_path} "
                            f"({'; '.join(differences)})")
    index = {name: i for i, name in enumerate(classes)}
    return Split(listing, np.array([index[names[r.label]] for r in listing.records], dtype=np.int64))


def unfreeze_map(values: Sequence[str], store_names: Sequence[str]) -> dict[str, str]:
    """``{store_name: none | all | module}`` from ``NODE`` (every trunk) and ``STORE=NODE`` values."""
    chosen = dict.fromkeys(store_names, "none")
    for value in sorted(values, key=lambda v: "=" in v):  # plain values first, per-store ones override
        store, given, node = value.rpartition("=")
        if given and store not in chosen:
            raise FinetuneError(f"--unfreeze {value}: the head has no backbone {store!r} ({', '.join(store_names)})")
        chosen.update({store: node} if given else dict.fromkeys(store_names, node))
    return chosen


# --------------------------------------------------------------------------- training


@dataclass
class Evaluation:
    """The model on the valid split: ``proba`` float64[M, C] for listing rows ``kept``, ``labels`` int64[M]."""

    proba: np.ndarray
    labels: np.ndarray
    kept: list[int]

    @property
    def accuracy(self) -> float:
        return float((self.proba.argmax(axis=1) == self.labels).mean())

    @property
    def log_loss(self) -> float:
        picked = self.proba[np.arange(len(self.labels)), self.labels]
        return float(-np.log(np.clip(picked, PROBABILITY_FLOOR, 1)).mean())


def learning_rate_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up over ``warmup`` steps, then a cosine from 1 to 0 at step ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def parameter_groups(model: FinetuneModel, settings: FinetuneSettings) -> list[dict]:
    """AdamW groups: trunk parameters at ``lr * trunk_lr_scale``, the head's at ``lr``; weight decay on
    matrices and kernels, not on biases and norms. ``base_lr`` is each group's peak learning rate."""
    groups = []
    for params, lr in ((model.trunk_parameters(), settings.lr * settings.trunk_lr_scale),
                       (list(model.head.parameters()), settings.lr)):
        groups += [{"params": [p for p in params if p.ndim > 1], "weight_decay": settings.weight_decay, "base_lr": lr},
                   {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "base_lr": lr}]
    return [group for group in groups if group["params"]]


def train_step(model: FinetuneModel, optimizer: torch.optim.Optimizer, views: dict[str, torch.Tensor],
               targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step on a batch; ``(summed loss, correct predictions)`` stay on the device."""
    log_p = model(views)
    loss = F.nll_loss(log_p, targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach() * len(targets), (log_p.detach().argmax(dim=1) == targets).sum()


class Finetuner:
    """The model, its optimiser and the two splits; one call per epoch."""

    def __init__(self, model: FinetuneModel, train: Split, valid: Split, settings: FinetuneSettings):
        self.model, self.train, self.valid, self.settings = model, train, valid, settings
        self.device = torch.device(settings.device)
        self.train_decode = dataclasses.replace(settings.decode, backend="pil")  # augmentation works on PIL images
        self.policy = augment_policy(settings.augment)
        self.optimizer = torch.optim.AdamW(parameter_groups(model, settings), lr=settings.lr)
        self.steps_per_epoch = math.ceil(len(train.listing) / settings.batch_size)
        self.total_steps = self.steps_per_epoch * settings.epochs
        self.warmup_steps = min(round(settings.warmup_epochs * self.steps_per_epoch), self.total_steps // 2)

    def train_epoch(self, epoch: int, skipped: dict[str, str]) -> dict:
        """Epoch ``epoch`` (1-based): its batch order, augmentations and dropout depend on (seed, epoch) only."""
        start, settings = time.perf_counter(), self.settings
        self.model.train()
        dataset = AugmentedViews(self.train.sources, list(self.model.preprocessings.values()), self.train_decode,
                                 self.policy, settings.seed, epoch)
        shuffle = torch.Generator().manual_seed(view_seed(settings.seed, -1, epoch))
        order = torch.randperm(len(dataset), generator=shuffle)
        batches = [order[i:i + settings.batch_size].tolist() for i in range(0, len(dataset), settings.batch_size)]
        loader = DataLoader(dataset, batch_sampler=batches, num_workers=settings.num_workers, collate_fn=collate_views,
                            pin_memory=self.device.type == "cuda", prefetch_factor=4 if settings.num_workers else None)
        loss, correct, seen = torch.zeros((), device=self.device), torch.zeros((), device=self.device), 0
        cuda = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda), self._bar(len(dataset), f"epoch {epoch}") as bar:
            torch.manual_seed(view_seed(settings.seed, -2, epoch))
            for step, batch in enumerate(loader, start=(epoch - 1) * self.steps_per_epoch):
                factor = learning_rate_factor(step, self.warmup_steps, self.total_steps)
                for group in self.optimizer.param_groups:
                    group["lr"] = group["base_lr"] * factor
                views = self._views(batch, skipped)
                if batch.indices:
                    targets = torch.as_tensor(self.train.labels[batch.indices], device=self.device)
                    batch_loss, batch_correct = train_step(self.model, self.optimizer, views, targets)
                    loss, correct, seen = loss + batch_loss, correct + batch_correct, seen + len(batch.indices)
                bar.update(len(batch.indices) + len(batch.errors))
        if not seen:
            raise FinetuneError(f"{self.train.listing.display_dir}: no image could be decoded")
        return {"train_loss": float(loss) / seen, "train_accuracy": float(correct) / seen, "train_images": seen,
                "train_images_per_second": seen / (time.perf_counter() - start)}

    @torch.inference_mode()
    def evaluate(self, skipped: dict[str, str]) -> Evaluation:
        """The model on the valid split's plain views (the store's views), in eval mode."""
        self.model.eval()
        dataset = ViewDataset(self.valid.sources, list(self.model.preprocessings.values()), self.settings.decode)
        rows, kept = [], []
        for batch in iterate_views(dataset, [(0, len(dataset))], self.settings.batch_size, self.settings.num_workers,
                                   pin_memory=self.device.type == "cuda"):
            views = self._views(batch, skipped, self.settings.decode)
            if batch.indices:
                rows.append(torch.exp(self.model(views).double()).cpu())
                kept += batch.indices
        if not kept:
            raise FinetuneError(f"{self.valid.listing.display_dir}: no image could be decoded")
        proba = torch.cat(rows).numpy()
        return Evaluation(proba / proba.sum(axis=1, keepdims=True), self.valid.labels[kept], kept)

    def _views(self, batch: ViewBatch, skipped: dict[str, str], decode=None) -> dict[str, torch.Tensor]:
        views = device_views(batch, self.device, self.model.preprocessings, decode or self.train_decode)
        if batch.errors and self.settings.on_error == "fail":
            raise ImageDecodeError(*batch.errors[0][1:])
        skipped.update({path: reason for _, path, reason in batch.errors})
        return views

    def _bar(self, total: int, label: str) -> tqdm:
        return tqdm(total=total, desc=label, unit="img", disable=not self.settings.progress, file=sys.stderr,
                    dynamic_ncols=True, leave=False)
