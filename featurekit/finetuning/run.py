"""``featurekit finetune``: train a head's trunks and classifier on images, warm-started from the head.

The model (:class:`~featurekit.finetuning.model.FinetuneModel`) is the head's trunks, rebuilt with the
weights the head records (sha256 checked, as predict does), its standardisation and its classifier;
before the first step it gives the head's probabilities. That is measured on the valid split and
reported as epoch 0, against the head on its stored features where those stores are still there.
Each epoch (:mod:`featurekit.finetuning.loop`) trains on augmented train images and scores the
valid split; the epoch with the best valid accuracy (then log loss) is kept, the warm start
(epoch 0) included, so the kept model is never worse on valid than the head (report.json also
gives the last epoch's scores). On CUDA the trunks run under bf16 autocast in channels_last; on
the CPU the precision is extract's rule (``RunSettings.resolved``).

Writes into ``out_dir`` (default ``<head folder>/finetuned``):

- ``checkpoint.pt`` after every epoch (atomically; read back with ``weights_only=True`` as a typed
  record, :class:`Checkpoint`, its tensors' names and shapes the model's): the same command resumes
  from it, and on the CPU ends with the weights of an uninterrupted run; a checkpoint of another
  run (other head, images or options), or one that does not fit the model, is refused unless ``overwrite``;
- the model folder (:mod:`featurekit.finetuning.artifact`): ``trunks/<store_name>.pt`` for
  ``extract --weights-path``, ``model.pt`` and ``model.json`` for ``predict --head``;
- last, ``learning_curves.png``, ``confusion_matrix.png``, ``report.md`` and ``report.json``
  (:func:`featurekit.heads.report.write_reports`, as train-head's), listing every file above.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from ..backbones.rebuild import recorded_backbones, recorded_settings
from ..backbones.trunks import Backbone
from ..backbones.weights import read_tensors
from ..errors import FeaturekitError, FinetuneError, first_line, short
from ..files import check_output_folder, crash_point, file_sha256, folder_lock
from ..heads.base import Head
from ..heads.head_file import HEAD_FILE, OLD_HEAD_FILE
from ..heads.records import HeadRecord
from ..heads.report import classification_metrics, write_reports
from ..images.names import printable_path
from ..records import parse
from ..store.dataset import load_features
from ..views.augment import augment_policy
from .artifact import MODEL_FILE, find_head_file, load_classifier, save_model, save_tensors
from .loop import Evaluation, Finetuner, Split, head_split, unfreeze_map
from .model import FinetuneModel, head_layers
from .settings import FinetuneSettings

__all__ = ["CHECKPOINT_FILE", "finetune", "prepare", "summary"]

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_FORMAT = "featurekit.finetune-checkpoint"
CHECKPOINTED = "finetune-checkpointed"  # crash point (files.crash_point) once an epoch's checkpoint is in place


# --------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class Best:
    """The kept epoch in a checkpoint: its model ``state``, valid ``proba`` (float64[len(kept), C])."""

    epoch: int
    score: list[float]
    state: dict
    proba: Any
    kept: list[int]


@dataclass(frozen=True)
class Checkpoint:
    """``checkpoint.pt``, as :func:`_resume` reads it (every field checked: it is a file like any other)."""

    format: str
    run: dict
    state: dict
    optimizer: dict
    epoch: int
    history: list[dict]
    warm_start: dict
    skipped: dict
    best: Best


@dataclass
class Prepared:
    """A fine-tuning run before its first epoch: the head, the model built from it, and its identity."""

    head: Head
    record: HeadRecord
    spec: dict  # the classifier's shape (finetune_model.head_layers)
    backbones: list[Backbone]
    trainer: Finetuner
    run: dict  # what a checkpoint must match to be resumed (JSON values)


def prepare(head_path: Path, data_root: str | Path, settings: FinetuneSettings,
            weights_paths: dict[str, str] | None = None) -> Prepared:
    """Read the head, list and check the splits, rebuild the head's backbones and the model on the device."""
    if head_path.suffix == ".json":
        raise FinetuneError(f"{head_path}: a fine-tuned model; finetune starts from a head written by train-head "
                            f"({HEAD_FILE})")
    classifier = load_classifier(head_path)
    head, record = classifier.head, classifier.record
    spec, layers = head_layers(head, head_path)
    train = head_split(data_root, settings.train_split, record.classes, head_path, exact=True)
    valid = head_split(data_root, settings.valid_split, record.classes, head_path, exact=False)
    settings = recorded_settings(head_path, record.backbones, settings, settings.precision).resolved()
    backbones = recorded_backbones(head_path, record.backbones, settings, weights_paths, "fine-tune")
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
    return Prepared(head, record, spec, backbones, trainer, json.loads(json.dumps(run)))


def default_out_dir(head_path: Path) -> Path:
    """Where finetune writes when no folder is given: ``finetuned`` beside the head file, a folder of its own."""
    return head_path.parent / "finetuned"


def check_out_dir(out_dir: Path, head_path: Path, data_root: str | Path, settings: FinetuneSettings) -> Path:
    """``out_dir`` as the folder this run may write (:func:`featurekit.files.check_output_folder`: not a
    file, not inside the image folders); one that holds another artifact (a head file, or a model
    without the checkpoint of a run) is refused unless ``settings.overwrite``."""
    splits = [Path(data_root) / settings.train_split, Path(data_root) / settings.valid_split]
    check_output_folder(out_dir, splits)
    others = [name for name in (HEAD_FILE, OLD_HEAD_FILE) if (out_dir / name).is_file()]
    if (out_dir / MODEL_FILE).is_file() and not (out_dir / CHECKPOINT_FILE).is_file():
        others.append(f"{MODEL_FILE} without {CHECKPOINT_FILE}")
    if others and not settings.overwrite:
        raise FinetuneError(f"{out_dir}: holds another artifact ({', '.join(others)}), which finetune's files "
                            f"would join or replace; give another --out (default: {default_out_dir(head_path)}), "
                            "or pass --overwrite")
    return out_dir


def summary(report: dict) -> str:
    """One line on a fine-tuning run's outcome (what ``featurekit finetune`` prints)."""
    valid = report["valid"]
    return (f"fine-tuned {report['head']} head: {valid['split']} accuracy {valid['accuracy']:.4f} (epoch "
            f"{report['chosen']['epoch']}; epoch 0, the head: {report['history'][0]['val_accuracy']:.4f}), "
            f"written to {report['out_dir']}/ (model.json, trunks/, report.md)")


def finetune(head_path: str | Path, data_root: str | Path, out_dir: str | Path | None = None,
             settings: FinetuneSettings | None = None, weights_paths: dict[str, str] | None = None) -> dict:
    """Fine-tune the head at ``head_path`` on ``data_root``'s train split; returns the report dict.

    ``head_path``: the head file or its folder (:func:`featurekit.finetuning.artifact.find_head_file`);
    ``weights_paths[store_name]``: where a backbone's weights file lies now (as predict takes it).
    Rerunning the same call resumes from ``out_dir``'s checkpoint.
    """
    head_path, settings = find_head_file(head_path), settings or FinetuneSettings()
    out_dir = check_out_dir(Path(out_dir) if out_dir is not None else default_out_dir(head_path), head_path,
                            data_root, settings)
    with folder_lock(out_dir):
        prepared = prepare(head_path, data_root, settings, weights_paths)
        trainer = prepared.trainer
        out_dir.mkdir(parents=True, exist_ok=True)
        progress = _resume(out_dir / CHECKPOINT_FILE, prepared.run, trainer, trainer.settings.overwrite,
                           len(prepared.record.classes))
        if progress is None:
            progress = _warm_start(trainer, prepared.head, prepared.record)
        for epoch in range(progress["epoch"] + 1, trainer.settings.epochs + 1):
            _epoch(trainer, epoch, progress)
            _save_checkpoint(out_dir / CHECKPOINT_FILE, {"format": CHECKPOINT_FORMAT, "run": prepared.run,
                                                          "state": trainer.model.mutable_state(),
                                                          "optimizer": trainer.optimizer.state_dict(), **progress})
        trainer.model.load_mutable_state(progress["best"]["state"])
        report = _report(trainer, head_path, prepared.record, progress)
        about = {"head_file": str(head_path), "best_epoch": progress["best"]["epoch"],
                 "valid_accuracy": report["valid"]["accuracy"], "settings": report["params"]}
        written = save_model(out_dir, trainer.model, prepared.backbones, prepared.record, prepared.spec,
                             trainer.settings.precision, about)
        report = write_reports(out_dir, {**report, "out_dir": str(out_dir)}, trainer.settings.plots, (),
                               [out_dir / CHECKPOINT_FILE, *written])
    logger.info(f"kept epoch {progress['best']['epoch']}: valid accuracy {report['valid']['accuracy']:.4f}; model "
        f"written to {written[-1]}")
    return report


def _warm_start(trainer: Finetuner, head: Head, record: HeadRecord) -> dict:
    """Epoch 0: the model before any step, against the head on its stored features where they exist."""
    start, skipped = time.perf_counter(), {}
    evaluation = trainer.evaluate(skipped)
    compared = compare_with_head(head, record, trainer.settings.valid_split, trainer.valid, evaluation)
    record = {"epoch": 0, "val_accuracy": evaluation.accuracy, "val_log_loss": evaluation.log_loss,
              "seconds": time.perf_counter() - start}
    logger.info(f"epoch 0 (the head, before any step): valid accuracy {evaluation.accuracy:.4f}, log loss "
        f"{evaluation.log_loss:.4f}" + (f"; the head on its stored features: {compared['head_accuracy']:.4f} "
                                        f"(max |p - p_head| {compared['max_abs_difference']:.2g} over "
                                        f"{compared['rows']} images)" if compared["compared"] else ""))
    return {"epoch": 0, "history": [record], "warm_start": compared, "skipped": skipped,
            "best": _best(0, evaluation, trainer.model)}


def compare_with_head(head: Head, record: HeadRecord, split: str, valid: Split, evaluation: Evaluation) -> dict:
    """The model's valid probabilities against the head's on the stores it was trained with, image by image."""
    try:
        stored = load_features(record.features_dir, split, record.store_names)
    except FeaturekitError as error:
        return {"compared": False, "reason": first_line(error)}
    current = [info.header.fingerprint == (backbone.fingerprints or {}).get(split)
               for info, backbone in zip(stored.stores, record.backbones)]
    if not all(current) or stored.stores[0].header.listing_sha256 != valid.listing.sha256():
        return {"compared": False, "reason": f"the {split} stores are not those of the head, or of other files"}
    position = {path: row for row, path in enumerate(stored.paths)}
    stored_names = [printable_path(valid.listing.records[index].path) for index in evaluation.kept]
    pairs = [(row, position[name]) for row, name in enumerate(stored_names) if name in position]
    if not pairs:
        return {"compared": False, "reason": f"no image of the {split} split decoded in both"}
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


def _epoch(trainer: Finetuner, epoch: int, progress: dict) -> None:
    start = time.perf_counter()
    record = {"epoch": epoch, **trainer.train_epoch(epoch, progress["skipped"])}
    evaluation = trainer.evaluate(progress["skipped"])
    record.update(val_accuracy=evaluation.accuracy, val_log_loss=evaluation.log_loss,
                  seconds=time.perf_counter() - start)
    progress["history"].append(record)
    progress["epoch"] = epoch
    if [evaluation.accuracy, -evaluation.log_loss] > progress["best"]["score"]:
        progress["best"] = _best(epoch, evaluation, trainer.model)
    logger.info(f"epoch {epoch}/{trainer.settings.epochs}: train loss {record['train_loss']:.4f} accuracy "
        f"{record['train_accuracy']:.4f}, valid loss {evaluation.log_loss:.4f} accuracy {evaluation.accuracy:.4f} "
        f"({record['seconds']:.1f} s)")


def _save_checkpoint(path: Path, payload: dict) -> None:
    save_tensors(path, payload, "cannot write the checkpoint", "; the previous one is kept")
    crash_point(CHECKPOINTED)


def _resume(path: Path, run: dict, trainer: Finetuner, overwrite: bool, classes: int) -> dict | None:
    """The progress of ``path``'s checkpoint, model and optimiser restored; None to start afresh.
    ``classes``: how many the model tells apart."""
    if overwrite or not path.exists():
        return None
    payload = read_tensors(path, FinetuneError)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise FinetuneError(f"{path}: not a featurekit fine-tuning checkpoint; --overwrite starts over")
    try:
        checkpoint = parse(Checkpoint, payload, str(path), FinetuneError)
    except FinetuneError as error:
        raise FinetuneError(f"{error}; --overwrite starts over") from None
    changed = next((key for key in run if checkpoint.run.get(key) != run[key]), None)
    if changed:
        raise FinetuneError(f"{path}: a checkpoint of another run ({changed} {short(checkpoint.run.get(changed))} "
                            f"!= {short(run[changed])}); rerun that command to continue it, "
                            "or --overwrite to start over")
    _check_checkpoint(path, checkpoint, trainer, classes)
    trainer.model.load_mutable_state(checkpoint.state)
    try:
        trainer.optimizer.load_state_dict(checkpoint.optimizer)
    except (ValueError, KeyError, TypeError, RuntimeError) as error:
        raise FinetuneError(f"{path}: field 'optimizer' does not fit the model's optimiser ({first_line(error)}); "
                            "--overwrite starts over") from None
    logger.info(f"resuming from {path} after epoch {checkpoint.epoch} of {trainer.settings.epochs}")
    return {"epoch": checkpoint.epoch, "history": checkpoint.history, "warm_start": checkpoint.warm_start,
            "skipped": checkpoint.skipped, "best": dataclasses.asdict(checkpoint.best)}


def _check_checkpoint(path: Path, checkpoint: Checkpoint, trainer: Finetuner, classes: int) -> None:
    """Refuse a checkpoint whose tensors, epochs or kept probabilities do not fit this run's model."""
    expected = trainer.model.mutable_state()
    for field, state in (("state", checkpoint.state), ("best.state", checkpoint.best.state)):
        _same_tensors(path, field, state, expected)
    best, valid = checkpoint.best, len(trainer.valid.listing)
    problems = [(not 0 <= checkpoint.epoch <= trainer.settings.epochs, f"field 'epoch' is {checkpoint.epoch}"),
                (len(checkpoint.history) != checkpoint.epoch + 1, f"field 'history' holds {len(checkpoint.history)} "
                                                                 f"epochs, not {checkpoint.epoch + 1}"),
                (not 0 <= best.epoch <= checkpoint.epoch, f"field 'best.epoch' is {best.epoch}"),
                (not all(0 <= row < valid for row in best.kept), "field 'best.kept' names rows outside valid"),
                (not isinstance(best.proba, torch.Tensor) or best.proba.shape != (len(best.kept), classes),
                 "field 'best.proba' is not a tensor of one row per kept image and one column per class")]
    problem = next((text for bad, text in problems if bad), None)
    if problem:
        raise FinetuneError(f"{path}: {problem}; --overwrite starts over")


def _same_tensors(path: Path, field: str, state: Mapping, expected: Mapping[str, torch.Tensor]) -> None:
    for name, tensor in expected.items():
        found = state.get(name)
        if not isinstance(found, torch.Tensor) or found.shape != tensor.shape:
            shape = f"shape {list(found.shape)}" if isinstance(found, torch.Tensor) else "absent"
            raise FinetuneError(f"{path}: field '{field}' tensor {name} is {shape}, the model's is "
                                f"{list(tensor.shape)}; --overwrite starts over")
    extra = next((name for name in state if name not in expected), None)
    if extra:
        raise FinetuneError(f"{path}: field '{field}' holds tensor {extra}, which the model has not; "
                            "--overwrite starts over")


# --------------------------------------------------------------------------- report


def _report(trainer: Finetuner, head_path: Path, record: HeadRecord, progress: dict) -> dict:
    settings, history, best, classes = trainer.settings, progress["history"], progress["best"], record.classes
    labels = trainer.valid.labels[best["kept"]]
    valid = classification_metrics(labels, best["proba"].numpy(), np.arange(len(classes)), classes)
    epochs = [record for record in history if record["epoch"] > 0]
    warm, names = progress["warm_start"], record.store_names
    head_accuracy = warm["head_accuracy"] if warm["compared"] else record.valid_accuracy
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
        "title": f"Fine-tuning report: {record.head} head on {' + '.join(names)}",
        "head": record.head, "head_file": str(head_path), "backbones": names, "classes": classes,
        "train": {"split": settings.train_split, "n": history[-1]["train_images"],
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
