"""``featurekit train-head``: fit a head on concatenated backbone features, evaluate, write a report.

Writes into ``--out`` (default ``FEATURES_DIR/heads/<head>-<backbone>+<backbone>``):

- ``head.h5``: the fitted head and its metadata (:func:`featurekit.head_file.save_head`): backbones,
  store names, nodes, weights names and sha256, preprocessing, decode policy, store fingerprints,
  class names in probability-column order, and what the standardisation was fitted on;
- ``report.json`` and ``report.md``: accuracy, balanced accuracy, per-class precision/recall, log
  loss, confusion matrix, the hyper-parameter sweep and the chosen values, seconds per epoch and in total;
- ``confusion_matrix.png``, ``learning_curves.png`` (MLP) and ``embedding.png``, where matplotlib
  imports (:mod:`featurekit.report` writes the reports and plots).

Validation labels are mapped onto the training classes by name; validation rows of classes
without training rows cannot be predicted and are left out of selection and metrics, loudly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import sklearn
import torch

from .dataset import FeatureSet, check_same_extraction, load_features
from .errors import SettingsError
from .head_file import HEAD_FILE, save_head
from .heads import HEADS, Head, make_heads
from .registry import RANDOM, random_weights_warning
from .report import Points, choice_reason, classification_metrics, describe, write_reports


@dataclass
class ValidationRows:
    """Validation rows that the head can be scored on. ``labels`` index the training classes."""

    features: np.ndarray  # float32[M, sum D]
    labels: np.ndarray  # int64[M]
    excluded: dict[str, int]  # class name -> rows left out (no training rows for that class)


def map_by_name(valid: FeatureSet, train: FeatureSet) -> ValidationRows:
    """Relabel validation rows with training class indices, matching class names, not indices."""
    trained = {train.classes[i]: i for i in np.unique(train.labels)}
    names = np.array(valid.classes, dtype=object)[valid.labels]
    keep = np.array([name in trained for name in names], dtype=bool)
    excluded = {str(name): int((names == name).sum()) for name in dict.fromkeys(names[~keep])}
    labels = np.array([trained[name] for name in names[keep]], dtype=np.int64)
    return ValidationRows(valid.features[keep], labels, excluded)


def fit_heads(kinds: Sequence[str], params: dict, train: FeatureSet, valid: ValidationRows | None,
              log: Callable[[str], None]) -> tuple[Head, list[dict], list[dict]]:
    """Fit each head kind; keep the best by validation accuracy, then log loss (the first fitted of
    equals). Returns ``(head, sweep, compared)``: every candidate of every kind, and per kind its
    kept candidate (hyper-parameters, validation scores, seconds of the kind's whole fit, candidates tried)."""
    best, best_score, sweep, compared = None, None, [], []
    for kind, head in zip(kinds, make_heads(list(kinds), params)):
        head.fit(train.features, train.labels, *((valid.features, valid.labels) if valid else ()))
        chosen = next(e for e in head.selection_ if e[head.grid_param] == head.best_params_[head.grid_param])
        sweep += [{"head": kind, **entry} for entry in head.selection_]
        log(f"{kind}: {describe(chosen)} ({head.fit_seconds_:.1f} s)")
        compared.append({"head": kind, **head.best_params_, "val_accuracy": chosen.get("val_accuracy"),
                         "val_log_loss": chosen.get("val_log_loss"), "seconds": head.fit_seconds_,
                         "candidates": len(head.selection_)})
        score = (chosen.get("val_accuracy", 0.0), -chosen.get("val_log_loss", 0.0))
        if best_score is None or score > best_score:
            best, best_score = head, score
    return best, sweep, compared


def evaluate(head: Head, rows: ValidationRows, class_names: Sequence[str]) -> dict:
    """Metrics of ``head`` on ``rows``; per-class entries and the confusion matrix follow ``head.classes_``."""
    return classification_metrics(rows.labels, head.predict_proba(rows.features), head.classes_, class_names)


def head_metadata(head: Head, train: FeatureSet, valid: FeatureSet | None, features_dir: Path) -> dict:
    """What predict needs to rebuild the features exactly, and what the head was trained on."""
    backbones = []
    for index, info in enumerate(train.stores):
        backbones.append({
            "store_name": info.store_name,
            **info.header.backbone_record(),
            "columns": [info.columns.start, info.columns.stop],
            "fingerprints": {train.split: info.header.fingerprint,
                             **({valid.split: valid.stores[index].header.fingerprint} if valid else {})},
        })
    return {
        "head": head.kind,
        "params": head.get_params(),
        "best_params": head.best_params_,
        "classes": [train.classes[c] for c in head.classes_],  # probability columns, in order
        "backbones": backbones,
        "standardization": (f"per-feature mean and std of split {train.split!r} ({len(train)} rows), in head.scaler_"
                            if head.scaler_ is not None else "none"),
        "features_dir": str(features_dir),
        "train_split": train.split,
        "valid_split": valid.split if valid else None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": {"torch": torch.__version__, "sklearn": sklearn.__version__},
    }


def timing(head: Head, seconds_total: float) -> dict:
    """``seconds_total``: fitting every head tried (the sweep of ``--head all``); ``seconds_chosen``: the kept one."""
    epochs = [record["seconds"] for record in head.history_]
    return {"seconds_total": seconds_total, "seconds_chosen": head.fit_seconds_, "epochs": len(epochs) or None,
            "seconds_per_epoch": float(np.mean(epochs)) if epochs else None}


def default_out_dir(features_dir: str | Path, head_kind: str, store_names: Sequence[str]) -> Path:
    return Path(features_dir) / "heads" / f"{head_kind}-{'+'.join(store_names)}"


def train_head(features_dir: str | Path, store_names: Sequence[str], head_kind: str, out_dir: str | Path | None = None,
               train_split: str = "train", valid_split: str | None = "valid", params: dict | None = None,
               plots: bool = True, log: Callable[[str], None] = print) -> dict:
    """Fit, select, evaluate and write the head artifact and reports. Returns the report dict."""
    features_dir = Path(features_dir)
    out_dir = Path(out_dir) if out_dir else default_out_dir(features_dir, head_kind, store_names)
    train = load_features(features_dir, train_split, store_names)
    valid = load_features(features_dir, valid_split, store_names) if valid_split else None
    rows = None
    if valid is not None:
        check_same_extraction(train, valid)
        rows = map_by_name(valid, train)
        if rows.excluded:
            log(f"warning: split {valid_split!r} has classes without training rows, left out of selection and metrics: "
                + ", ".join(f"{name} ({n} rows)" for name, n in rows.excluded.items()))
        if not len(rows.labels):
            raise SettingsError(f"split {valid_split!r}: no row of a class the training split has")
    elif head_kind == "all":
        raise SettingsError("--head all chooses on the validation split; give one (--valid-split)")
    log(f"train: {len(train)} rows x {train.features.shape[1]} features ({', '.join(store_names)}), "
        f"{len(np.unique(train.labels))} classes" + (f"; {valid_split}: {len(rows.labels)} rows" if rows else ""))
    random = [info.store_name for info in train.stores if info.header.weights == RANDOM]
    if random:
        log(random_weights_warning(random))
    started = time.perf_counter()
    head, sweep, compared = fit_heads(list(HEADS) if head_kind == "all" else [head_kind], params or {}, train, rows,
                                      log)
    seconds = time.perf_counter() - started
    reason = choice_reason(compared, head.kind)
    log(f"chosen: {reason}")
    metadata = head_metadata(head, train, valid, features_dir)
    report = {
        "head": head.kind, "backbones": list(store_names), "classes": metadata["classes"],
        "train": {"split": train_split, "n": len(train),
                  "accuracy": float((head.predict(train.features) == train.labels).mean())},
        "valid": ({"split": valid_split, **evaluate(head, rows, train.classes), "excluded_classes": rows.excluded}
                  if rows else None),
        "chosen": {"head": head.kind, **head.best_params_}, "choice": {"reason": reason, "heads": compared},
        "params": head.get_params(), "selection": sweep,
        "timing": timing(head, seconds), "history": head.history_,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    saved = save_head(out_dir / HEAD_FILE, head, {**metadata, "valid_accuracy": report["valid"]["accuracy"] if rows
                                                  else None})
    points = [Points(train.split, train.features, train.labels, train.classes)]
    points += [Points(valid.split, rows.features, rows.labels, train.classes)] if rows else []
    return write_reports(out_dir, report, plots, points, [saved], log)
