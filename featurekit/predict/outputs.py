"""What predict writes: the table of predictions (csv, kaggle), and the run's record beside it.

The output and the files beside it (:data:`RECORD`, and for labelled folders the report's) are
checked before anything is written, the table and its record before any image is read
(:func:`featurekit.files.check_output`): never one of the run's inputs (the head and its files and
stores, the images, the class names), inside a folder of images given, a folder, a device or a FIFO.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence, TextIO

import numpy as np

from .. import __version__
from ..backbones.settings import RunSettings
from ..errors import SettingsError
from ..files import atomic_output, atomic_write
from ..files import check_output as check_path
from ..finetuning.artifact import Classifier, load_classifier
from ..heads.report import PREDICTION_REPORT, labelled_metrics, write_prediction_report
from .classify import Predictions, predict_files
from .settings import FORMS, PredictOptions

RECORD = ".json"  # the run's record, beside the table; a labelled folder's report: PREDICTION_REPORT


def check_output(classes: Sequence[str], form: str = "csv", topk: int | None = None,
                 class_names: dict[str, str] | None = None) -> None:
    """Refuse an output that a head of ``classes`` cannot fill, before any image is read."""
    if form not in FORMS:
        raise SettingsError(f"unknown format {form!r} (csv or kaggle)")
    if form == "kaggle" and len(classes) != 2:
        raise SettingsError(f"--format kaggle needs a two-class head; this one has {len(classes)} classes "
                            f"({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''})")
    if topk is not None and form == "kaggle":
        raise SettingsError("--topk chooses csv columns; --format kaggle has a fixed id,label form")
    if topk is not None and not 1 <= topk <= len(classes):
        raise SettingsError(f"--topk {topk}: the head has {len(classes)} classes (give 1 to {len(classes)})")
    if class_names is not None and form == "kaggle":
        raise SettingsError("--class-names names classes in csv columns; --format kaggle has none")
    if class_names is not None and not any(c in class_names for c in classes):
        raise SettingsError(f"the class names given name none of the head's classes ({', '.join(classes[:5])}"
                            f"{', ...' if len(classes) > 5 else ''})")


def prediction_table(predictions: Predictions, form: str = "csv", topk: int | None = None,
                     class_names: dict[str, str] | None = None) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the output: ``path,predicted,prob_<class>...`` in the head's class order;
    with ``topk`` ``path,predicted,top1,top1_prob,...`` (the K likeliest classes, likeliest first);
    kaggle ``id,label``. ``class_names`` (:func:`read_class_names`) maps class folder names to the
    names written in ``predicted`` and ``topI`` (``prob_<class>`` headers keep the folder names, as
    the head has them). Every cell is :func:`spreadsheet_safe`."""
    check_output(predictions.classes, form, topk, class_names)
    shown = [(class_names or {}).get(c, c) for c in predictions.classes]
    best = predictions.proba.argmax(axis=1)
    if form == "kaggle":
        header, rows = ["id", "label"], [list(row) for row in _kaggle_rows(predictions)]
    elif topk:
        header = ["path", "predicted", *(f"top{i}{part}" for i in range(1, topk + 1) for part in ("", "_prob"))]
        order = np.argsort(-predictions.proba, axis=1, kind="stable")[:, :topk]
        rows = [[path, shown[first], *(cell for c in likeliest for cell in (shown[c], f"{proba[c]:.6g}"))]
                for path, first, likeliest, proba in zip(predictions.paths, best, order, predictions.proba)]
    else:
        header = ["path", "predicted", *(f"prob_{c}" for c in predictions.classes)]
        rows = [[path, shown[first], *(f"{p:.6g}" for p in row)]
                for path, first, row in zip(predictions.paths, best, predictions.proba)]
    return [spreadsheet_safe(c) for c in header], [[spreadsheet_safe(c) for c in row] for row in rows]


def write_predictions(predictions: Predictions, out: Path | TextIO, head_path: Path, form: str = "csv",
                      topk: int | None = None, class_names: dict[str, str] | None = None) -> list[Path]:
    """Write the table of :func:`prediction_table` and ``<out>.json`` (how the features were made),
    atomically; returns the files written. ``out`` a text stream (stdout): the CSV alone, no ``.json``."""
    header, rows = prediction_table(predictions, form, topk, class_names)
    if not isinstance(out, (str, os.PathLike)):
        _write_csv(out, header, rows)
        return []
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(out) as temporary, open(temporary, "w", newline="") as handle:
        _write_csv(handle, header, rows)
    settings = predictions.settings
    about = {"head": str(head_path), "rows": len(predictions.paths), "format": form, "topk": topk,
             "class_names": class_names, "tta": predictions.tta,
             "device": settings.device, "precision": settings.precision, "dtype": settings.dtype,
             "decode": settings.decode.to_dict(), "skipped": [{"path": p, "reason": r} for p, r in predictions.errors],
             "featurekit": __version__}
    meta = atomic_write(out.with_name(out.name + RECORD), json.dumps(about, indent=2) + "\n")
    return [out, meta]


def _write_csv(handle: TextIO, header: list[str], rows: list[list[str]]) -> None:
    writer = csv.writer(handle)
    writer.writerow(header)
    writer.writerows(rows)


def spreadsheet_safe(cell: str) -> str:
    """A CSV cell a spreadsheet will not run as a formula: one starting with ``= + - @`` or a tab or
    carriage return (a file or class named ``=HYPERLINK(...)``) gets a leading ``'`` (OWASP's advice)."""
    return f"'{cell}" if cell[:1] in ("=", "+", "-", "@", "\t", "\r") else cell


def read_class_names(path: str | os.PathLike) -> dict[str, str]:
    """A JSON object mapping class folder names to readable names (seed 002's ``cat_to_name.json``);
    classes it leaves out keep their folder name. One line if it is not such an object."""
    try:
        names = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise SettingsError(f"{path}: not a readable JSON file of class names ({error})") from None
    if not isinstance(names, dict):
        raise SettingsError(f"{path}: not a JSON object of class name -> readable name")
    return {str(key): str(value) for key, value in names.items()}


def _kaggle_rows(predictions: Predictions) -> list[tuple[str, str]]:
    rows = [(Path(path).stem, f"{p:.6g}") for path, p in zip(predictions.paths, predictions.proba[:, 1])]
    numeric = all(stem.isdigit() for stem, _ in rows)
    return sorted(rows, key=lambda row: (int(row[0]) if numeric else 0, row[0]))


def predict_to(head: str | os.PathLike | Classifier, paths: str | os.PathLike | Sequence[str | os.PathLike],
               out: str | os.PathLike | TextIO = "predictions.csv", options: PredictOptions | None = None,
               settings: RunSettings | None = None,
               weights_paths: Mapping[str, str] | Sequence[str] | None = None) -> list[str]:
    """Classify ``paths`` with ``head`` (loaded once) and write the table to ``out`` (a file, with its
    ``.json`` record beside it, or a text stream: the table alone) and, for labelled folders, the
    accuracy report beside it (:func:`~featurekit.heads.report.write_prediction_report`). The output
    is checked before any image is read (:func:`check_output`). Returns the lines that tell what was
    written: accuracy on labelled folders, the report files, the predictions and their rate."""
    started = time.perf_counter()
    options = options or PredictOptions()
    classifier = head if isinstance(head, Classifier) else load_classifier(head, options.trust_paths)
    form, topk = options.form, options.topk
    names = read_class_names(options.class_names) if options.class_names else None
    check_output(classifier.record.classes, form, topk, names)
    to_file = isinstance(out, (str, os.PathLike))
    given = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    inputs = [*classifier.inputs(), *given, *([options.class_names] if options.class_names else [])]
    if to_file:
        check_path(out, inputs, side_suffixes=(RECORD,))
    predictions = predict_files(classifier, paths, settings, weights_paths, options.precision, options.tta)
    if not predictions.paths:
        raise SettingsError(f"none of the {len(predictions.errors)} files could be decoded")
    evaluation = labelled_metrics(predictions.truth, predictions.proba, predictions.classes)
    if to_file and evaluation is not None:
        check_path(out, inputs, side_suffixes=PREDICTION_REPORT)
    written = write_predictions(predictions, out, classifier.path, form, topk, names)
    lines = []
    if evaluation is not None:
        lines.append(f"labelled images: accuracy {evaluation['accuracy']:.4f} over {evaluation['n']} images, "
                     f"balanced accuracy {evaluation['balanced_accuracy']:.4f}")
        if to_file:
            about = {"head": str(classifier.path), "folders": predictions.labelled_folders,
                     "rows": len(predictions.paths)}
            files = write_prediction_report(Path(out), about, evaluation, predictions.classes, options.plots)
            lines.append(f"per-class report: {', '.join(map(str, files))}")
    elapsed, count = time.perf_counter() - started, len(predictions.paths)
    stream = "stdout" if out is sys.stdout else str(getattr(out, "name", "a stream"))
    lines.append(f"{count} predictions written to {', '.join(map(str, written)) if to_file else stream}"
                 + (f" ({len(predictions.errors)} files skipped)" if predictions.errors else "")
                 + f" ({predictions.settings.device}, {predictions.settings.precision}) in {elapsed:.1f} s, "
                 f"{count / elapsed:.1f} images/s")
    return lines
