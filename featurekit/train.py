"""``featurekit train-head``: fit a head on concatenated backbone features, evaluate, write a report.

Writes into ``--out`` (default ``FEATURES_DIR/heads/<head>-<backbone>+<backbone>``):

- ``head.joblib``: the fitted head and its metadata (:func:`featurekit.heads.save_head`): backbones,
  store names, nodes, weights names and sha256, preprocessing, decode policy, store fingerprints,
  class names in probability-column order, and what the standardisation was fitted on;
- ``report.json`` and ``report.md``: accuracy, balanced accuracy, per-class precision/recall, log
  loss, confusion matrix, the hyper-parameter sweep and the chosen values, seconds per epoch and in total;
- ``learning_curves.png`` (MLP) and ``confusion_matrix.png``, only where matplotlib imports.

Validation labels are mapped onto the training classes by name; validation rows of classes
without training rows cannot be predicted and are left out of selection and metrics, loudly.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import sklearn
import torch
from sklearn import metrics

from .dataset import FeatureSet, check_same_extraction, load_features
from .errors import SettingsError
from .files import atomic_output, atomic_write
from .heads import HEADS, Head, make_heads, save_head

HEAD_FILE = "head.joblib"


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
              log: Callable[[str], None]) -> tuple[Head, list[dict]]:
    """Fit each head kind; keep the best by validation accuracy, then log loss. Returns (head, sweep)."""
    best, best_score, sweep = None, None, []
    for kind, head in zip(kinds, make_heads(list(kinds), params)):
        head.fit(train.features, train.labels, *((valid.features, valid.labels) if valid else ()))
        chosen = next(e for e in head.selection_ if e[head.grid_param] == head.best_params_[head.grid_param])
        sweep += [{"head": kind, **entry} for entry in head.selection_]
        log(f"{kind}: {_describe(chosen)} ({head.fit_seconds_:.1f} s)")
        score = (chosen.get("val_accuracy", 0.0), -chosen.get("val_log_loss", 0.0))
        if best_score is None or score > best_score:
            best, best_score = head, score
    return best, sweep


def _describe(entry: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in entry.items() if v is not None)


def evaluate(head: Head, rows: ValidationRows, class_names: Sequence[str]) -> dict:
    """Metrics of ``head`` on ``rows``; per-class entries and the confusion matrix follow ``head.classes_``."""
    return prediction_metrics(head.predict_proba(rows.features), rows.labels, head.classes_, class_names)


def prediction_metrics(proba: np.ndarray, labels: np.ndarray, classes: np.ndarray, class_names: Sequence[str]) -> dict:
    """Metrics of probabilities float64[N, len(classes)] whose column ``j`` is class ``classes[j]``
    (an index into ``class_names``), against ``labels`` int64[N] (indices into ``class_names`` too)."""
    predicted = classes[proba.argmax(axis=1)]
    precision, recall, _, support = metrics.precision_recall_fscore_support(
        labels, predicted, labels=classes, zero_division=0)
    return {
        "n": int(len(labels)),
        "accuracy": float(metrics.accuracy_score(labels, predicted)),
        "balanced_accuracy": float(metrics.balanced_accuracy_score(labels, predicted)),
        "log_loss": float(metrics.log_loss(labels, proba, labels=classes)),
        "per_class": [{"class": class_names[c], "precision": float(p), "recall": float(r), "support": int(s)}
                      for c, p, r, s in zip(classes, precision, recall, support)],
        "confusion_matrix": metrics.confusion_matrix(labels, predicted, labels=classes).tolist(),
    }


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


def timing(head: Head) -> dict:
    epochs = [record["seconds"] for record in head.history_]
    return {"seconds_total": head.fit_seconds_, "epochs": len(epochs) or None,
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
    head, sweep = fit_heads(list(HEADS) if head_kind == "all" else [head_kind], params or {}, train, rows, log)
    metadata = head_metadata(head, train, valid, features_dir)
    report = {
        "head": head.kind, "backbones": list(store_names), "classes": metadata["classes"],
        "train": {"split": train_split, "n": len(train),
                  "accuracy": float((head.predict(train.features) == train.labels).mean())},
        "valid": ({"split": valid_split, **evaluate(head, rows, train.classes), "excluded_classes": rows.excluded}
                  if rows else None),
        "chosen": {"head": head.kind, **head.best_params_}, "params": head.get_params(), "selection": sweep,
        "timing": timing(head), "history": head.history_,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    save_head(out_dir / HEAD_FILE, head, {**metadata, "valid_accuracy": report["valid"]["accuracy"] if rows else None})
    write_reports(out_dir, report, plots)
    return report


# --------------------------------------------------------------------------- report files


def write_reports(out_dir: Path, report: dict, plots: bool) -> list[Path]:
    """``report.json``, ``report.md`` and, with ``plots``, the PNGs, each written atomically.

    Used by train-head and finetune: ``report`` may carry a ``title``, ``notes`` (lines for the
    summary), a ``note`` on the train accuracy and the ``train_curve_label`` of the curves."""
    written = [atomic_write(out_dir / "report.json", json.dumps(report, indent=2, default=_json_default) + "\n"),
               atomic_write(out_dir / "report.md", markdown_report(report))]
    if plots:
        written += _plots(out_dir, report)
    return written


def _json_default(value):
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, (tuple, np.ndarray)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def markdown_report(report: dict) -> str:
    title = report.get("title") or f"Head report: {report['head']} on {' + '.join(report['backbones'])}"
    train = report["train"]
    lines = [f"# {title}", "", f"- chosen: {_describe(report['chosen'])}",
             f"- train: split `{train['split']}`, {train['n']} rows, accuracy {train['accuracy']:.4f}"
             + (f" ({train['note']})" if train.get("note") else "")]
    valid, time_ = report["valid"], report["timing"]
    if valid:
        lines += [f"- valid: split `{valid['split']}`, {valid['n']} rows: accuracy **{valid['accuracy']:.4f}**, "
                  f"balanced accuracy {valid['balanced_accuracy']:.4f}, log loss {valid['log_loss']:.4f}"]
        if valid["excluded_classes"]:
            lines += [f"- **left out** (classes without training rows): {_describe(valid['excluded_classes'])}"]
    per_epoch = (f", {time_['seconds_per_epoch']:.3f} s per epoch over {time_['epochs']} epochs"
                 if time_["epochs"] else "")
    lines += [f"- time: {time_['seconds_total']:.2f} s in total{per_epoch}"]
    lines += [f"- {note}" for note in report.get("notes", [])] + [""]
    if valid:
        lines += ["## Per class", "", "| class | precision | recall | support |", "|---|---|---|---|"]
        lines += [f"| {c['class']} | {c['precision']:.3f} | {c['recall']:.3f} | {c['support']} |"
                  for c in valid["per_class"]]
        lines += ["", "## Confusion matrix (rows: true, columns: predicted)", ""]
        lines += _matrix_table(valid["confusion_matrix"], report["classes"])
    if report["history"] and "train_accuracy" in report["history"][-1]:
        lines += ["", "## Epochs", "",
                  "| epoch | train loss | train accuracy | val log loss | val accuracy | seconds |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['epoch']} | {_number(r.get('train_loss'))} | {_number(r.get('train_accuracy'))} | "
                  f"{r['val_log_loss']:.4f} | {r['val_accuracy']:.4f} | {r['seconds']:.1f} |"
                  for r in report["history"]]
    if not report["selection"]:
        return "\n".join(lines) + "\n"
    lines += ["", "## Selection on validation", "", "| head | value | val accuracy | val log loss | epochs |",
              "|---|---|---|---|---|"]
    for entry in report["selection"]:
        value = next(f"{k}={v}" for k, v in entry.items()
                     if k not in ("head", "val_accuracy", "val_log_loss", "epochs"))
        lines += [f"| {entry['head']} | {value} | {entry.get('val_accuracy', float('nan')):.4f} | "
                  f"{entry.get('val_log_loss', float('nan')):.4f} | {entry['epochs'] or ''} |"]
    return "\n".join(lines) + "\n"


def _save_figure(plt, figure, path: Path) -> None:
    with atomic_output(path) as temporary:
        figure.savefig(temporary, dpi=100, format="png")
    plt.close(figure)


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _matrix_table(matrix: list[list[int]], classes: list[str]) -> list[str]:
    if len(classes) > 20:
        return [f"{len(classes)} classes: see `confusion_matrix` in report.json and confusion_matrix.png."]
    return ["| | " + " | ".join(classes) + " |", "|---" * (len(classes) + 1) + "|"] + \
           [f"| **{name}** | " + " | ".join(str(v) for v in row) + " |" for name, row in zip(classes, matrix)]


def _plots(out_dir: Path, report: dict) -> list[Path]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    if report["history"]:
        written.append(_learning_curves(plt, report["history"], out_dir / "learning_curves.png",
                                        report.get("train_curve_label", "train loss (dropout on)")))
    if report["valid"]:
        written.append(_confusion_plot(plt, report["valid"]["confusion_matrix"], report["classes"],
                                       out_dir / "confusion_matrix.png"))
    return written


def _learning_curves(plt, history: list[dict], path: Path, train_label: str) -> Path:
    """Loss and accuracy per epoch; records without a value (epoch 0 of fine-tuning: no training yet)
    are left out of that curve."""
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 4))
    curves = [(loss_axis, "train_loss", train_label), (loss_axis, "val_log_loss", "validation log loss"),
              (accuracy_axis, "train_accuracy", "train"), (accuracy_axis, "val_accuracy", "validation")]
    for axis, key, label in curves:
        points = [(r["epoch"], r[key]) for r in history if r.get(key) is not None]
        if points:
            axis.plot(*zip(*points), marker="o" if len(points) < 30 else None, label=label)
    loss_axis.set(xlabel="epoch", ylabel="loss")
    loss_axis.legend()
    accuracy_axis.set(xlabel="epoch", ylabel="accuracy")
    accuracy_axis.legend()
    figure.tight_layout()
    _save_figure(plt, figure, path)
    return path


def _confusion_plot(plt, matrix: list[list[int]], classes: list[str], path: Path) -> Path:
    size = min(4 + 0.25 * len(classes), 30)
    figure, axis = plt.subplots(figsize=(size, size))
    axis.imshow(np.array(matrix), cmap="Blues")
    if len(classes) <= 40:
        axis.set_xticks(range(len(classes)), classes, rotation=90)
        axis.set_yticks(range(len(classes)), classes)
    axis.set(xlabel="predicted", ylabel="true")
    figure.tight_layout()
    _save_figure(plt, figure, path)
    return path
