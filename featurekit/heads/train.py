"""``featurekit train-head``: fit a head on concatenated backbone features, evaluate, write a report.

Writes into ``--out`` (default ``FEATURES_DIR/heads/<head>-<backbone>+<backbone>``):

- ``head.h5``: the fitted head and its metadata (:func:`featurekit.heads.head_file.save_head`): backbones,
  store names, nodes, weights names and sha256, preprocessing, decode policy, store fingerprints,
  class names in probability-column order, and what the standardisation was fitted on;
- ``report.json`` and ``report.md``: accuracy, balanced accuracy, per-class precision/recall, log
  loss, confusion matrix, the hyper-parameter sweep and the chosen values, seconds per epoch and in total;
- ``confusion_matrix.png``, ``learning_curves.png`` (MLP) and ``embedding.png``, where matplotlib
  imports (:mod:`featurekit.heads.report` writes the reports and plots).

Validation labels are mapped onto the training classes by name; validation rows of classes
without training rows cannot be predicted and are left out of selection and metrics, loudly.

Augmented views (train stores made with ``extract --augment K``; ``augmented=False`` or
``--no-augmented`` ignores them): the MLP trains on one of the K + 1 views of each image per epoch
(the plain row among them, :class:`~featurekit.heads.MLPHead`'s ``views``), the other heads on
all N (K + 1) rows, each image's rows adjacent, labels repeated. Model selection and the reported
validation figures stay on the plain valid features. Test-time augmentation (``tta``: the valid
stores made with ``extract --tta MODE``) adds the valid figures of the class probabilities
averaged over the test-time views (:func:`test_time_metrics`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import sklearn
import torch

from ..errors import FeaturekitWarning, HeadError, SettingsError
from ..files import check_output, check_output_folder, folder_lock
from ..records import to_dict
from ..store.dataset import FeatureSet, check_same_extraction, load_features, store_files
from ..store.format import RANDOM, file_stem, read_header, read_store, warn_random
from ..store.layout import AUGMENTED, TEST_TIME
from ..views.augment import TTA_VIEWS
from .base import Head, ProbabilityModel, proba_scores
from .exclusions import Exclusion, excluded_rows, parse_exclude
from .head_file import HEAD_FILE, save_head
from .records import HeadRecord
from .registry import HEADS, make_heads
from .report import Points, choice_reason, classification_metrics, describe, tied_with, write_reports
from .selection import SELECT, choose
from .settings import TRAIN_HEAD

__all__ = ["ValidationRows", "map_by_name", "refuse_unlabelled", "scored_rows", "summary", "test_time_metrics",
           "test_time_proba", "train_head", "valid_features"]

logger = logging.getLogger(__name__)


@dataclass
class ValidationRows:
    """Validation rows that the head can be scored on. ``labels`` index the training classes."""

    features: np.ndarray  # float32[M, sum D]
    labels: np.ndarray  # int64[M]
    excluded: dict[str, int]  # class name -> rows left out (no training rows for that class)
    kept: np.ndarray | None = None  # bool[len(valid)]: the valid rows these are


def map_by_name(valid: FeatureSet, train: FeatureSet) -> ValidationRows:
    """Relabel validation rows with training class indices, matching class names, not indices."""
    trained = {train.classes[i]: i for i in np.unique(train.labels)}
    names = np.array(valid.classes, dtype=object)[valid.labels]
    keep = np.array([name in trained for name in names], dtype=bool)
    excluded = {str(name): int((names == name).sum()) for name in dict.fromkeys(names[~keep])}
    labels = np.array([trained[name] for name in names[keep]], dtype=np.int64)
    return ValidationRows(valid.features[keep], labels, excluded, keep)


def scored_rows(valid: FeatureSet, train: FeatureSet, left_out_of: str) -> ValidationRows:
    """:func:`map_by_name`, warning of the valid classes without training rows (left out of ``left_out_of``);
    a valid split with no row of a training class is a :class:`SettingsError`."""
    rows = map_by_name(valid, train)
    if rows.excluded:
        warnings.warn(f"split {valid.split!r} has classes without training rows, left out of {left_out_of}: "
                      + ", ".join(f"{name} ({n} rows)" for name, n in rows.excluded.items()), FeaturekitWarning,
                      stacklevel=3)
    if not len(rows.labels):
        raise SettingsError(f"split {valid.split!r}: no row of a class the training split has")
    return rows


def all_rows(features: np.ndarray, views: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Plain rows float32[N, C] and their views float32[N, K, C] as N (K + 1) rows, each image's
    rows adjacent (plain first), and the labels repeated: int64[N (K + 1)]. Adjacent rows keep an
    image's views together in the contiguous folds of an internal cross-validation (svm's calibration)."""
    rows = np.concatenate([features[:, None], views], axis=1)
    return rows.reshape(-1, features.shape[1]), np.repeat(labels, rows.shape[1])


def fit_heads(kinds: Sequence[str], params: dict, train: FeatureSet, valid: ValidationRows | None,
              views: np.ndarray | None = None) -> tuple[Head, list[dict], list[dict]]:
    """Fit each head kind on the class names; keep the one rule ``params["select"]`` chooses
    (:mod:`featurekit.heads.selection`; the first fitted of equals). Returns ``(head, sweep,
    compared)``: every candidate of every kind, and per kind its kept candidate (hyper-parameters,
    validation scores of the fitted head, seconds of the kind's whole fit, candidates tried).
    ``views``: float32[N, K, D] augmented views of the training rows (the MLP draws one of the K + 1
    views of each row per epoch, the other heads train on all rows)."""
    heads, sweep, compared = [], [], []
    names = np.asarray(train.classes)
    validation = (valid.features, names[valid.labels]) if valid else ()
    for kind, head in zip(kinds, make_heads(list(kinds), params)):
        if views is None:
            head.fit(train.features, names[train.labels], *validation)
        elif draws_one_view(kind):
            head.fit(train.features, names[train.labels], *validation, views=views)
        else:
            head.fit(*all_rows(train.features, views, names[train.labels]), *validation)
        sweep += [{"head": kind, **entry} for entry in head.selection_]
        scores = proba_scores(head.predict_proba(valid.features), np.searchsorted(head.classes_, validation[1])) \
            if valid else {"val_accuracy": None, "val_balanced_accuracy": None, "val_log_loss": None}
        logger.info(f"{kind}: {describe({**head.best_params_, **scores})} ({head.fit_seconds_:.1f} s)")
        compared.append({"head": kind, **head.best_params_, **scores, "seconds": head.fit_seconds_,
                         "candidates": len(head.selection_)})
        heads.append(head)
    rule = params.get("select", SELECT)
    return heads[choose(compared, rule, len(valid.labels) if valid else 0)], sweep, compared


def columns(head: Head, class_names: Sequence[str]) -> np.ndarray:
    """int64[len(head.classes_)]: the index in ``class_names`` of each probability column's class
    (a head fitted on class names; one fitted on indices: those)."""
    if head.classes_.dtype.kind in "US" or head.classes_.dtype == object:
        return np.array([list(class_names).index(str(c)) for c in head.classes_], dtype=np.int64)
    return head.classes_.astype(np.int64)


def evaluate(head: Head, rows: ValidationRows, class_names: Sequence[str]) -> dict:
    """Metrics of ``head`` on ``rows``; per-class entries and the confusion matrix follow ``head.classes_``."""
    return classification_metrics(rows.labels, head.predict_proba(rows.features), columns(head, class_names),
                                  class_names)


def test_time_proba(head: ProbabilityModel, views: np.ndarray) -> np.ndarray:
    """Class probabilities float64[N, classes] averaged over the views float32[N, V, C] of each image
    (the plain view first): test-time augmentation, for train-head and predict alike."""
    proba = head.predict_proba(np.ascontiguousarray(views[:, 0]))
    for view in range(1, views.shape[1]):
        proba += head.predict_proba(np.ascontiguousarray(views[:, view]))
    return proba / views.shape[1]


def test_time_metrics(head: Head, rows: ValidationRows, views: np.ndarray, class_names: Sequence[str]) -> dict:
    """Metrics of ``head`` on ``rows`` with test-time augmentation; ``views``: float32[len(valid), V - 1, C],
    the test-time views after the plain one of every valid row (``rows.kept`` picks those of ``rows``)."""
    kept = views[rows.kept] if rows.kept is not None else views
    proba = test_time_proba(head, np.concatenate([rows.features[:, None], kept], axis=1))
    return classification_metrics(rows.labels, proba, columns(head, class_names), class_names)


def head_record(head: Head, train: FeatureSet, valid: FeatureSet | None, features_dir: Path, **extra) -> HeadRecord:
    """What predict needs to rebuild the features exactly, and what the head was trained on
    (``extra``: more fields of :class:`~featurekit.heads.records.HeadRecord`)."""
    backbones = [info.header.backbone_record(
        info.store_name, columns=[info.columns.start, info.columns.stop],
        fingerprints={train.split: info.header.fingerprint,
                      **({valid.split: valid.stores[index].header.fingerprint} if valid else {})})
        for index, info in enumerate(train.stores)]
    scaled = f"per-feature mean and std of split {train.split!r} ({len(train)} rows), in head.scaler_"
    return HeadRecord(
        head=head.kind, classes=[train.classes[c] for c in columns(head, train.classes)], backbones=backbones,
        params=head.get_params(), best_params=head.best_params_,
        standardization=scaled if head.scaler_ is not None else "none", features_dir=str(features_dir),
        train_split=train.split, valid_split=valid.split if valid else None,
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        versions={"torch": torch.__version__, "sklearn": sklearn.__version__}, **extra)


def timing(head: Head, seconds_total: float) -> dict:
    """``seconds_total``: fitting every head tried (the sweep of ``--head all``); ``seconds_chosen``: the kept one."""
    epochs = [record["seconds"] for record in head.history_]
    return {"seconds_total": seconds_total, "seconds_chosen": head.fit_seconds_, "epochs": len(epochs) or None,
            "seconds_per_epoch": float(np.mean(epochs)) if epochs else None}


def valid_features(features_dir: Path, split: str, store_names: Sequence[str], tta: str) -> FeatureSet:
    """The valid split, with its test-time views float32[N, V - 1, C] when ``tta`` is a mode: its
    stores must hold that mode's views (``extract --split SPLIT --tta MODE``)."""
    if tta not in TTA_VIEWS:
        raise SettingsError(f"unknown --tta {tta!r} (choose from {', '.join(TTA_VIEWS)})")
    if tta != "none":
        path = store_files(features_dir, split, store_names)[0]
        held = read_header(path).tta
        if held != tta:
            raise SettingsError(f"{path}: holds {'no test-time views' if held == 'none' else f'{held} test-time views'}"
                                f", not {tta}; run extract DATA --split {split} --tta {tta} (same backbones and "
                                "options: the plain rows stay the same)")
    return load_features(features_dir, split, store_names, views=[TEST_TIME] if tta != "none" else [])


def draws_one_view(kind: str) -> bool:
    """Whether a head of ``kind`` trains on one view of each image per epoch (the MLP) rather than on
    every row of every view (the linear heads and kNN)."""
    return kind == "mlp"


def augmentation(train: FeatureSet, head: Head, held: int) -> dict | None:
    """What the train stores' augmented views were and how ``head`` used them (None: the stores have none)."""
    if not held:
        return None
    header = train.stores[0].header
    used = AUGMENTED in train.views
    every_row = f"all {len(train) * (held + 1)} rows ({len(train)} images x {held + 1} views)"
    how = ("not used (--no-augmented)" if not used else f"one of the {held + 1} views of each image per epoch"
           if draws_one_view(head.kind) else every_row)
    return {"views": held, "policy": header.augment_policy["name"], "seed": header.augment_seed, "used": used,
            "how": how}


def view_notes(report: dict) -> list[str]:
    """Lines for report.md on the augmented and test-time views."""
    notes = []
    if report["augmented"]:
        record = report["augmented"]
        notes.append(f"augmented views: {record['views']} per image ({record['policy']}, seed {record['seed']}) "
                     f"beside the plain row; {report['head']}: {record['how']}")
    if report["valid_tta"]:
        tta = report["valid_tta"]
        notes.append(f"valid with {tta['mode']} test-time augmentation (probabilities averaged over {tta['views']} "
                     f"views): accuracy **{tta['accuracy']:.4f}**, balanced accuracy {tta['balanced_accuracy']:.4f}, "
                     f"log loss {tta['log_loss']:.4f} (selection used the plain valid rows)")
    return notes


def refuse_unlabelled(path: Path, role: str) -> None:
    """A one-line :class:`HeadError` if the store at ``path`` is unlabelled (images without classes)."""
    if read_store(path, features=False).labels is None:
        raise HeadError(f"{path}: an unlabelled store (images without classes) cannot be the {role}; score it with "
                        "predict --features instead")


def default_out_dir(features_dir: str | Path, head_kind: str, store_names: Sequence[str]) -> Path:
    return Path(features_dir) / "heads" / f"{head_kind}-{'+'.join(map(file_stem, store_names))}"


def summary(report: dict) -> str:
    """One line on a train-head run's outcome (what ``featurekit train-head`` prints)."""
    valid, tta = report["valid"], report["valid_tta"]
    return (f"{report['head']} head: " + (f"{valid['split']} accuracy {valid['accuracy']:.4f}, " if valid else "")
            + (f"with {tta['mode']} test-time augmentation {tta['accuracy']:.4f}, " if tta else "")
            + f"written to {report['out_dir']}/ ({', '.join(report['files'])})")


def without_flagged(train: FeatureSet, spec: str) -> tuple[FeatureSet, Exclusion, list[str]]:
    """``train`` without the rows an audit flagged (``spec``: ``audit.json[:kinds]``,
    :mod:`featurekit.heads.exclusions`), what the head records of it, and the stored paths left out."""
    path, kinds = parse_exclude(spec)
    stores = [(info.store_name, info.header.fingerprint, info.header.listing_sha256) for info in train.stores]
    flagged, exclusion = excluded_rows(path, kinds, train.split, stores, train.paths)
    if flagged.all():
        raise HeadError(f"{path}: flags every row of split {train.split!r} under {', '.join(kinds)}; "
                        "nothing to train on")
    keep = ~flagged
    kept = dataclasses.replace(train, features=train.features[keep], labels=train.labels[keep],
                               paths=[p for p, k in zip(train.paths, keep) if k],
                               views={name: values[keep] for name, values in train.views.items()})
    counts = ", ".join(f"{kind} {n}" for kind, n in exclusion.by_kind.items())
    logger.info(f"{path}: {exclusion.rows} of {len(train)} {train.split} rows left out ({counts})")
    return kept, exclusion, [p for p, f in zip(train.paths, flagged) if f]


def train_head(features_dir: str | Path, store_names: Sequence[str], head_kind: str, out_dir: str | Path | None = None,
               train_split: str = TRAIN_HEAD.train_split, valid_split: str | None = TRAIN_HEAD.valid_split,
               params: dict | None = None, plots: bool = TRAIN_HEAD.plots, augmented: bool = TRAIN_HEAD.augmented,
               tta: str = TRAIN_HEAD.tta, exclude: str | None = TRAIN_HEAD.exclude) -> dict:
    """Fit, select, evaluate and write the head artifact and reports. Returns the report dict.
    ``augmented``: use the train stores' augmented views, if they have any; ``tta``: also score the
    valid split with test-time augmentation (its stores made with ``extract --tta`` of that mode);
    ``exclude``: ``audit.json[:kinds]``, leave out the training rows that audit flagged (:func:`without_flagged`).
    One run at a time writes ``out_dir`` (:func:`featurekit.files.folder_lock`); a second one is refused."""
    features_dir = Path(features_dir)
    out_dir = check_output_folder(out_dir if out_dir is not None else
                                  default_out_dir(features_dir, head_kind, store_names))
    with folder_lock(out_dir):
        return _train_head(features_dir, store_names, head_kind, out_dir, train_split, valid_split, params, plots,
                           augmented, tta, exclude)


def _train_head(features_dir: Path, store_names: Sequence[str], head_kind: str, out_dir: Path, train_split: str,
                valid_split: str | None, params: dict | None, plots: bool, augmented: bool, tta: str,
                exclude: str | None) -> dict:
    if tta != "none" and not valid_split:
        raise SettingsError("--tta scores the validation split with test-time views; give --valid-split")
    first_train = store_files(features_dir, train_split, store_names)[0]
    refuse_unlabelled(first_train, "training split")
    held = read_header(first_train).augment_views
    if valid_split:
        refuse_unlabelled(store_files(features_dir, valid_split, store_names)[0], "validation split")
    train = load_features(features_dir, train_split, store_names, views=[AUGMENTED] if augmented and held else [])
    exclusion, left_out = None, []
    if exclude:
        train, exclusion, left_out = without_flagged(train, exclude)
    valid = valid_features(features_dir, valid_split, store_names, tta) if valid_split else None
    rows = None
    if valid is not None:
        check_same_extraction(train, valid)
        rows = scored_rows(valid, train, "selection and metrics")
    elif head_kind == "all":
        raise SettingsError("--head all chooses on the validation split; give one (--valid-split)")
    augmenting = f" and {held} augmented views of each{'' if train.views else ' (not used)'}" if held else ""
    logger.info(f"train: {len(train)} rows{augmenting} x {train.features.shape[1]} features "
                f"({', '.join(store_names)}), {len(np.unique(train.labels))} classes"
                + (f"; {valid_split}: {len(rows.labels)} rows" if rows else ""))
    warn_random([info.store_name for info in train.stores if info.header.weights == RANDOM])
    views = train.views.get(AUGMENTED)
    started = time.perf_counter()
    head, sweep, compared = fit_heads(list(HEADS) if head_kind == "all" else [head_kind], params or {}, train, rows,
                                      views)
    seconds = time.perf_counter() - started
    rule = (params or {}).get("select", SELECT)
    reason = choice_reason(compared, head.kind, rule, len(rows.labels) if rows else 0, head.selection_)
    logger.info(f"chosen: {reason}")
    if rows is not None and rule in ("accuracy", "balanced-accuracy") and tied_with(compared, head.kind):
        warnings.warn(f"the heads tied on valid accuracy; {reason}", FeaturekitWarning, stacklevel=2)
    valid_metrics = ({"split": valid_split, **evaluate(head, rows, train.classes), "excluded_classes": rows.excluded}
                     if rows else None)
    record = head_record(head, train, valid, features_dir, augmented=augmentation(train, head, held),
                         valid_accuracy=valid_metrics["accuracy"] if valid_metrics else None, excluded=exclusion)
    report = {
        "head": head.kind, "backbones": list(store_names), "classes": record.classes,
        "train": {"split": train_split, "n": len(train),
                  "rows_fitted": len(train) * (1 + held) if views is not None and not draws_one_view(head.kind)
                  else len(train),
                  "accuracy": float((head.predict(train.features) == np.asarray(train.classes)[train.labels]).mean())},
        "valid": valid_metrics,
        "valid_tta": ({"split": valid_split, "mode": tta, "views": TTA_VIEWS[tta],
                       **test_time_metrics(head, rows, valid.views[TEST_TIME], train.classes)} if tta != "none"
                      else None),
        "augmented": record.augmented,
        "excluded": {**to_dict(exclusion), "paths": left_out} if exclusion else None,
        "chosen": {"head": head.kind, **head.best_params_},
        "choice": {"rule": rule, "reason": reason, "heads": compared},
        "params": head.get_params(), "selection": sweep,
        "timing": timing(head, seconds), "history": head.history_,
    }
    report["notes"] = view_notes(report)
    report["out_dir"] = str(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stores = [info.path for info in train.stores + (valid.stores if valid else [])]
    saved = save_head(check_output(out_dir / HEAD_FILE, stores, hdf5=True), head, record.to_dict())
    points = [Points(train.split, train.features, train.labels, train.classes)]
    points += [Points(valid.split, rows.features, rows.labels, train.classes)] if rows else []
    return write_reports(out_dir, report, plots, points, [saved])
