"""``featurekit finetune``: train a head's trunks and classifier on the images, warm-started from the head.

The model (:class:`~featurekit.finetune_model.FinetuneModel`) is the head's trunks, rebuilt with the
weights the head records (sha256 checked, as predict does), its standardisation and its classifier.
Before the first step it gives the head's probabilities; that is measured on the valid split and
reported as epoch 0, against the head on its stored features where those stores are still there.

Training: the train split's images under an augmentation policy (:mod:`featurekit.augment`, view
``epoch`` of image ``i``, seeded), ending in the weights' own normalisation; the valid split gets
exactly the store's view and decode policy. AdamW, the trunks at ``lr * trunk_lr_scale``, weight
decay on matrices and kernels only, a linear warm-up then a cosine decay, per step. On CUDA the
trunks run under bf16 autocast in channels_last; on CPU the precision is extract's rule
(``RunSettings.resolved``). The epoch with the best valid accuracy (then log loss) is kept, the
warm start (epoch 0) included, so the kept model is never worse on valid than the head.

Writes into ``out_dir`` (default ``<head folder>/finetuned``):

- ``checkpoint.pt`` after every epoch (atomically): the same command resumes from it; on CPU the
  resumed run ends with the weights of an uninterrupted one (each epoch's random draws depend on
  the seed and the epoch only);
- ``trunks/<store_name>.pt``: each trained trunk's state dict, for ``extract --weights-path``;
- ``model.pt`` (the classifier's state dict) and, last, ``model.json``: the model artifact that
  ``predict --head OUT/model.json`` uses (:func:`featurekit.finetune_model.load_model`);
- ``report.json``, ``report.md``, ``learning_curves.png``, ``confusion_matrix.png``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from .augment import DEFAULT_AUGMENT_POLICY, AugmentPolicy, augment_policy, view_seed
from .backbones import Backbone
from .dataset import load_features
from .errors import FeaturekitError, SettingsError, first_line, short
from .files import FileLock, atomic_output, crash_point, file_sha256
from .finetune_artifact import save_model
from .finetune_model import BATCHNORM_MODES, FinetuneError, FinetuneModel, head_layers
from .heads import Head, load_head
from .images import ImageDecodeError, SplitListing, list_split
from .loader import ViewBatch, ViewDataset, collate_views, iterate_views
from .predict import head_backbones, recorded_settings
from .runner import RunSettings, device_views
from .train import prediction_metrics, write_reports

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT = "featurekit.finetune-checkpoint"
CHECKPOINTED = "finetune-checkpointed"  # crash point (files.crash_point) once an epoch's checkpoint is in place


@dataclass(frozen=True)
class FinetuneSettings(RunSettings):
    """How to fine-tune; the decode policy and storage dtype always come from the head's stores.

    ``unfreeze``: ``NODE`` for every trunk (a module path, ``none`` or ``all``) and/or ``STORE=NODE``
    for one; ``warmup_epochs``: linear warm-up length (at most half the steps); ``batchnorm``:
    ``frozen`` (running statistics of the unfrozen part kept) or ``train``.
    """

    unfreeze: tuple[str, ...] = ("none",)
    epochs: int = 5
    lr: float = 1e-4
    trunk_lr_scale: float = 0.1
    weight_decay: float = 0.01
    warmup_epochs: float = 1.0
    augment: str = DEFAULT_AUGMENT_POLICY
    batchnorm: str = "frozen"
    seed: int = 0
    train_split: str = "train"
    valid_split: str = "valid"
    overwrite: bool = False  # discard a checkpoint of another run instead of refusing it
    plots: bool = True

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


# --------------------------------------------------------------------------- data


class AugmentedViews(ViewDataset):
    """View ``epoch`` of image ``i`` under ``policy`` (seeded by seed, i, epoch), per preprocessing."""

    def __init__(self, sources, preprocessings, decode, policy: AugmentPolicy, seed: int, epoch: int):
        super().__init__(sources, preprocessings, decode)
        self.augment, self.seed, self.epoch = policy, seed, epoch  # self.policy is the decode policy

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
        return [(str(self.listing.absolute(i)),) * 2 for i in range(len(self.listing))]


def head_split(root: str | Path, split: str, classes: Sequence[str], head_path: Path, exact: bool) -> Split:
    """List ``root/split``; its classes with images must be the head's (``exact``) or among them."""
    listing = list_split(root, split)
    present = [listing.classes[label] for label in sorted({r.label for r in listing.records})]
    differences = [f"{kind}: {', '.join(names)}" for kind, names in (
        ("missing here", [c for c in classes if c not in present] if exact else []),
        ("not in the head", [c for c in present if c not in classes])) if names]
    if differences:
        raise FinetuneError(f"{listing.split_dir}: classes differ from those of the head {head_path} "
                            f"({'; '.join(differences)})")
    index = {name: i for i, name in enumerate(classes)}
    return Split(listing, np.array([index[listing.classes[r.label]] for r in listing.records], dtype=np.int64))


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
        return float(-np.log(np.clip(self.proba[np.arange(len(self.labels)), self.labels], 1e-15, 1)).mean())


def learning_rate_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up over ``warmup`` steps, then a cosine from 1 to 0 at step ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


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
        self.optimizer = torch.optim.AdamW(self._groups(), lr=settings.lr)
        self.steps_per_epoch = math.ceil(len(train.listing) / settings.batch_size)
        self.total_steps = self.steps_per_epoch * settings.epochs
        self.warmup_steps = min(round(settings.warmup_epochs * self.steps_per_epoch), self.total_steps // 2)

    def _groups(self) -> list[dict]:
        groups = []
        for params, lr in ((self.model.trunk_parameters(), self.settings.lr * self.settings.trunk_lr_scale),
                           (list(self.model.head.parameters()), self.settings.lr)):
            groups += [{"params": [p for p in params if p.ndim > 1], "weight_decay": self.settings.weight_decay,
                        "base_lr": lr},
                       {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "base_lr": lr}]
        return [group for group in groups if group["params"]]

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
            raise FinetuneError(f"{self.train.listing.split_dir}: no image could be decoded")
        return {"train_loss": float(loss) / seen, "train_accuracy": float(correct) / seen,
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
            raise FinetuneError(f"{self.valid.listing.split_dir}: no image could be decoded")
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


# --------------------------------------------------------------------------- the run


@dataclass
class Prepared:
    """A fine-tuning run before its first epoch: the head, the model built from it, and its identity."""

    head: Head
    metadata: dict
    spec: dict  # the classifier's shape (finetune_model.head_layers)
    backbones: list[Backbone]
    trainer: Finetuner
    run: dict  # what a checkpoint must match to be resumed (JSON values)


def prepare(head_path: Path, data_root: str | Path, settings: FinetuneSettings,
            weights_paths: dict[str, str] | None = None) -> Prepared:
    """Read the head, list and check the splits, rebuild the head's backbones and the model on the device."""
    head, metadata = load_head(head_path)
    spec, layers = head_layers(head, head_path)
    classes = list(metadata["classes"])
    train = head_split(data_root, settings.train_split, classes, head_path, exact=True)
    valid = head_split(data_root, settings.valid_split, classes, head_path, exact=False)
    settings = recorded_settings(head_path, metadata, settings, settings.precision).resolved()
    backbones = head_backbones(head_path, metadata, settings, weights_paths)
    unfreeze = unfreeze_map(settings.unfreeze, [b.store_name for b in backbones])
    model = FinetuneModel(backbones, layers, unfreeze, settings.precision, settings.dtype, settings.batchnorm,
                          settings.channels_last).to(settings.device)
    trainer = Finetuner(model, train, valid, settings)
    chosen = ("epochs", "lr", "trunk_lr_scale", "weight_decay", "warmup_epochs", "batchnorm", "seed", "batch_size",
              "precision", "channels_last")
    run = {"head_sha256": file_sha256(head_path), "train_listing": train.listing.sha256(),
           "valid_listing": valid.listing.sha256(), "unfreeze": unfreeze,
           "augment": augment_policy(settings.augment).to_dict(), "device": trainer.device.type,
           **{name: getattr(settings, name) for name in chosen}}
    return Prepared(head, metadata, spec, backbones, trainer, json.loads(json.dumps(run)))


def finetune(head_path: str | Path, data_root: str | Path, out_dir: str | Path | None = None,
             settings: FinetuneSettings | None = None, weights_paths: dict[str, str] | None = None,
             log: Callable[[str], None] = print) -> dict:
    """Fine-tune the head at ``head_path`` on ``data_root``'s train split; returns the report dict.

    ``weights_paths[store_name]``: where a backbone's weights file lies now (as predict takes it).
    Rerunning the same call resumes from ``out_dir``'s checkpoint.
    """
    head_path = Path(head_path)
    prepared = prepare(head_path, data_root, settings or FinetuneSettings(), weights_paths)
    trainer = prepared.trainer
    out_dir = Path(out_dir) if out_dir else head_path.parent / "finetuned"
    out_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(out_dir / ".finetune.lock", str(out_dir)):
        progress = _resume(out_dir / CHECKPOINT_FILE, prepared.run, trainer, trainer.settings.overwrite, log)
        if progress is None:
            progress = _warm_start(trainer, prepared.head, prepared.metadata, log)
        for epoch in range(progress["epoch"] + 1, trainer.settings.epochs + 1):
            _epoch(trainer, epoch, progress, log)
            _save_checkpoint(out_dir / CHECKPOINT_FILE, {"format": CHECKPOINT_FORMAT, "run": prepared.run,
                                                          "state": trainer.model.mutable_state(),
                                                          "optimizer": trainer.optimizer.state_dict(), **progress})
        trainer.model.load_mutable_state(progress["best"]["state"])
        report = _report(trainer, head_path, prepared.metadata, progress)
        write_reports(out_dir, report, trainer.settings.plots)
        about = {"head_file": str(head_path), "best_epoch": progress["best"]["epoch"],
                 "valid_accuracy": report["valid"]["accuracy"], "settings": report["params"]}
        written = save_model(out_dir, trainer.model, prepared.backbones, prepared.metadata, prepared.spec,
                             trainer.settings.precision, about)
    log(f"kept epoch {progress['best']['epoch']}: valid accuracy {report['valid']['accuracy']:.4f}; model "
        f"written to {written}")
    return report


def _warm_start(trainer: Finetuner, head: Head, metadata: dict, log: Callable[[str], None]) -> dict:
    """Epoch 0: the model before any step, against the head on its stored features where they exist."""
    start, skipped = time.perf_counter(), {}
    evaluation = trainer.evaluate(skipped)
    compared = compare_with_head(head, metadata, trainer.settings.valid_split, trainer.valid, evaluation)
    record = {"epoch": 0, "val_accuracy": evaluation.accuracy, "val_log_loss": evaluation.log_loss,
              "seconds": time.perf_counter() - start}
    log(f"epoch 0 (the head, before any step): valid accuracy {evaluation.accuracy:.4f}, log loss "
        f"{evaluation.log_loss:.4f}" + (f"; the head on its stored features: {compared['head_accuracy']:.4f} "
                                        f"(max |p - p_head| {compared['max_abs_difference']:.2g} over "
                                        f"{compared['rows']} images)" if compared["compared"] else ""))
    return {"epoch": 0, "history": [record], "warm_start": compared, "skipped": skipped,
            "best": _best(0, evaluation, trainer.model)}


def compare_with_head(head: Head, metadata: dict, split: str, valid: Split, evaluation: Evaluation) -> dict:
    """The model's valid probabilities against the head's on the stores it was trained with, image by image."""
    names = [record["store_name"] for record in metadata["backbones"]]
    try:
        stored = load_features(metadata["features_dir"], split, names)
    except FeaturekitError as error:
        return {"compared": False, "reason": first_line(error)}
    current = [info.header.fingerprint == record["fingerprints"].get(split)
               for info, record in zip(stored.stores, metadata["backbones"])]
    if not all(current) or stored.stores[0].header.listing_sha256 != valid.listing.sha256():
        return {"compared": False, "reason": f"the {split} stores are not those of the head, or of other files"}
    position = {path: row for row, path in enumerate(stored.paths)}
    pairs = [(row, position[valid.listing.records[index].path]) for row, index in enumerate(evaluation.kept)
             if valid.listing.records[index].path in position]
    mine, theirs = (list(side) for side in zip(*pairs))
    head_proba, labels = head.predict_proba(stored.features[theirs]), evaluation.labels[mine]
    return {"compared": True, "rows": len(pairs),
            "max_abs_difference": float(np.abs(evaluation.proba[mine] - head_proba).max()),
            "head_accuracy": float((head_proba.argmax(axis=1) == labels).mean()),
            "model_accuracy": float((evaluation.proba[mine].argmax(axis=1) == labels).mean()),
            "same_predictions": int((head_proba.argmax(axis=1) == evaluation.proba[mine].argmax(axis=1)).sum())}


def _best(epoch: int, evaluation: Evaluation, model: FinetuneModel) -> dict:
    return {"epoch": epoch, "score": [evaluation.accuracy, -evaluation.log_loss], "state": model.mutable_state(),
            "proba": torch.from_numpy(evaluation.proba), "kept": evaluation.kept}


def _epoch(trainer: Finetuner, epoch: int, progress: dict, log: Callable[[str], None]) -> None:
    start = time.perf_counter()
    record = {"epoch": epoch, **trainer.train_epoch(epoch, progress["skipped"])}
    evaluation = trainer.evaluate(progress["skipped"])
    record.update(val_accuracy=evaluation.accuracy, val_log_loss=evaluation.log_loss,
                  seconds=time.perf_counter() - start)
    progress["history"].append(record)
    progress["epoch"] = epoch
    if [evaluation.accuracy, -evaluation.log_loss] > progress["best"]["score"]:
        progress["best"] = _best(epoch, evaluation, trainer.model)
    log(f"epoch {epoch}/{trainer.settings.epochs}: train loss {record['train_loss']:.4f} accuracy "
        f"{record['train_accuracy']:.4f}, valid loss {evaluation.log_loss:.4f} accuracy {evaluation.accuracy:.4f} "
        f"({record['seconds']:.1f} s)")


def _save_checkpoint(path: Path, payload: dict) -> None:
    with atomic_output(path, "cannot write the checkpoint", "; the previous one is kept") as temporary:
        torch.save(payload, temporary)
    crash_point(CHECKPOINTED)


def _resume(path: Path, run: dict, trainer: Finetuner, overwrite: bool, log: Callable[[str], None]) -> dict | None:
    """The progress of ``path``'s checkpoint, model and optimiser restored; None to start afresh."""
    if overwrite or not path.exists():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise FinetuneError(f"{path}: not a readable checkpoint ({first_line(error)}); --overwrite starts over"
                            ) from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT or "run" not in payload:
        raise FinetuneError(f"{path}: not a featurekit fine-tuning checkpoint; --overwrite starts over")
    changed = next((key for key in run if payload["run"].get(key) != run[key]), None)
    if changed:
        raise FinetuneError(f"{path}: a checkpoint of another run ({changed} {short(payload['run'].get(changed))} "
                            f"!= {short(run[changed])}); rerun that command to continue it, "
                            "or --overwrite to start over")
    trainer.model.load_mutable_state(payload["state"])
    trainer.optimizer.load_state_dict(payload["optimizer"])
    log(f"resuming from {path} after epoch {payload['epoch']} of {trainer.settings.epochs}")
    return {key: payload[key] for key in ("epoch", "history", "warm_start", "skipped", "best")}


# --------------------------------------------------------------------------- report


def _report(trainer: Finetuner, head_path: Path, metadata: dict, progress: dict) -> dict:
    settings, history, best, classes = trainer.settings, progress["history"], progress["best"], metadata["classes"]
    labels = trainer.valid.labels[best["kept"]]
    valid = prediction_metrics(best["proba"].numpy(), labels, np.arange(len(classes)), classes)
    epochs = [record for record in history if record["epoch"] > 0]
    warm, names = progress["warm_start"], [record["store_name"] for record in metadata["backbones"]]
    head_accuracy = warm["head_accuracy"] if warm["compared"] else metadata.get("valid_accuracy")
    trainable = {name: sum(p.numel() for p in trunk.parameters() if p.requires_grad)
                 for name, trunk in zip(names, trainer.model.trunks)}
    notes = [f"epoch 0 (the head, before any step): valid accuracy {history[0]['val_accuracy']:.4f}; "
             + (f"the head on its stored features: {warm['head_accuracy']:.4f}, the same prediction for "
                f"{warm['same_predictions']} of {warm['rows']} images, "
                f"max |p - p_head| {warm['max_abs_difference']:.2g}"
                if warm["compared"] else f"stored features not compared ({warm['reason']})"),
             f"kept epoch {best['epoch']} of {settings.epochs} (best valid accuracy, then log loss); last epoch: "
             f"valid accuracy {history[-1]['val_accuracy']:.4f}, log loss {history[-1]['val_log_loss']:.4f}",
             "trainable: " + ", ".join(f"{name} from {part.unfreeze} ({trainable[name]:,} parameters)"
                                       for name, part in zip(names, trainer.model.parts))
             + f"; BatchNorm of the unfrozen part: {settings.batchnorm}",
             f"{settings.device}, {settings.precision}, batch {settings.batch_size}, augment {settings.augment}"]
    notes += [f"skipped {path}: {reason}" for path, reason in progress["skipped"].items()]
    return {
        "title": f"Fine-tuning report: {metadata['head']} head on {' + '.join(names)}",
        "head": metadata["head"], "head_file": str(head_path), "backbones": names, "classes": classes,
        "train": {"split": settings.train_split, "n": len(trainer.train.listing),
                  "accuracy": history[-1]["train_accuracy"], "note": "last epoch, augmented views"},
        "valid": {"split": settings.valid_split, **valid, "excluded_classes": {}},
        "chosen": {"epoch": best["epoch"]}, "params": json.loads(json.dumps(dataclasses.asdict(settings))),
        "selection": [], "notes": notes, "warm_start": warm, "head_valid_accuracy": head_accuracy,
        "trainable_parameters": trainable,
        "skipped": [{"path": p, "reason": r} for p, r in progress["skipped"].items()],
        "timing": {"seconds_total": sum(r["seconds"] for r in history), "epochs": len(epochs),
                   "seconds_per_epoch": float(np.mean([r["seconds"] for r in epochs]))},
        "history": history, "train_curve_label": "train loss (augmented, dropout on)",
    }
