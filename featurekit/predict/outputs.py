"""What predict writes: the table of predictions (csv, json, parquet, kaggle), and the run's record beside it.

The output and the files beside it (:data:`RECORD`, and for labelled rows the report's) are
checked before anything is written, the table and its record before any image is read
(:func:`featurekit.files.check_output`): never one of the run's inputs (the head and its files and
stores, the images and lists, the class names), inside a folder of images given, a folder, a device
or a FIFO; an existing table is replaced only with ``overwrite``.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Mapping, Sequence, TextIO

import numpy as np

from .. import __version__
from ..backbones.settings import RunSettings
from ..errors import FeaturekitWarning, SettingsError
from ..files import atomic_output, atomic_write
from ..files import check_output as check_path
from ..finetuning.artifact import Classifier, load_classifier
from ..heads.report import PREDICTION_REPORT, labelled_metrics, write_prediction_report
from ..store.export import parquet_module
from ..store.format import store_path
from .classify import Predictions, predict_files, predict_store
from .settings import FORMS, PredictOptions

__all__ = ["predict_to", "write_predictions"]

KAGGLE = ("kaggle", "kaggle-proba")  # Kaggle's id,label submissions: class names, or a binary head's probability
RECORD = ".json"  # the run's record, beside the table; a labelled folder's report: PREDICTION_REPORT


def check_output(classes: Sequence[str], form: str = "csv", topk: int | None = None,
                 class_names: dict[str, str] | None = None) -> int | None:
    """Refuse an output that a head of ``classes`` cannot fill, before any image is read; returns the
    ``topk`` to write (one larger than the head's classes is clamped to them, with a warning)."""
    if form not in FORMS:
        raise SettingsError(f"unknown format {form!r} (choose from {', '.join(FORMS)})")
    if form == "kaggle-proba" and len(classes) != 2:
        raise SettingsError(f"--format kaggle-proba writes the probability of a two-class head's second class; this "
                            f"one has {len(classes)} classes ({', '.join(classes[:5])}"
                            f"{', ...' if len(classes) > 5 else ''}): use --format kaggle (class names)")
    if topk is not None and form in KAGGLE:
        raise SettingsError(f"--topk chooses table columns; --format {form} has a fixed id,label form")
    if topk is not None and topk < 1:
        raise SettingsError(f"--topk {topk}: give 1 or more")
    if topk is not None and topk > len(classes):
        warnings.warn(f"--topk {topk}: the head has {len(classes)} classes; writing all {len(classes)}",
                      FeaturekitWarning, stacklevel=2)
        topk = len(classes)
    if class_names is not None and form == "kaggle-proba":
        raise SettingsError("--class-names names classes; --format kaggle-proba writes probabilities")
    if class_names is not None and not any(c in class_names for c in classes):
        raise SettingsError(f"the class names given name none of the head's classes ({', '.join(classes[:5])}"
                            f"{', ...' if len(classes) > 5 else ''})")
    return topk


def prediction_table(predictions: Predictions, form: str = "csv", topk: int | None = None,
                     class_names: dict[str, str] | None = None) -> tuple[list[str], list[list]]:
    """(header, rows) of the output, values typed (str, float): ``path,predicted,prob_<class>...`` in the
    head's class order; with ``topk`` ``path,predicted,top1,top1_prob,...`` (the K likeliest classes,
    likeliest first); kaggle ``id,label`` (id: file stem; label: the predicted class, or for
    kaggle-proba the probability of the second class). ``class_names`` (:func:`read_class_names`) maps
    class folder names to the names written in ``predicted``, ``topI`` and kaggle's ``label``
    (``prob_<class>`` headers keep the folder names, as the head has them)."""
    topk = check_output(predictions.classes, form, topk, class_names)
    shown = [(class_names or {}).get(c, c) for c in predictions.classes]
    best = predictions.proba.argmax(axis=1)
    if form in KAGGLE:
        labels = predictions.proba[:, 1] if form == "kaggle-proba" else [shown[b] for b in best]
        header, rows = ["id", "label"], _kaggle_rows(predictions.paths, labels)
    elif topk:
        header = ["path", "predicted", *(f"top{i}{part}" for i in range(1, topk + 1) for part in ("", "_prob"))]
        order = np.argsort(-predictions.proba, axis=1, kind="stable")[:, :topk]
        rows = [[path, shown[first], *(cell for c in likeliest for cell in (shown[c], float(proba[c])))]
                for path, first, likeliest, proba in zip(predictions.paths, best, order, predictions.proba)]
    else:
        header = ["path", "predicted", *(f"prob_{c}" for c in predictions.classes)]
        rows = [[path, shown[first], *map(float, row)] for path, first, row in zip(predictions.paths, best,
                                                                                   predictions.proba)]
    return header, rows


def write_predictions(predictions: Predictions, out: Path | TextIO, head_path: Path, form: str = "csv",
                      topk: int | None = None, class_names: dict[str, str] | None = None,
                      overwrite: bool = True) -> list[Path]:
    """Write the table of :func:`prediction_table` in ``form`` and ``<out>.json`` (how the features were
    made), atomically; returns the files written. ``out`` a text stream (stdout): the table alone (csv,
    kaggle or json), no ``.json``. An existing ``out`` is refused unless ``overwrite``."""
    header, rows = prediction_table(predictions, form, topk, class_names)
    if not isinstance(out, (str, os.PathLike)):
        if form == "parquet":
            raise SettingsError("--format parquet writes a file: give --out FILE")
        _write_table(out, form, header, rows)
        return []
    out = check_path(out, side_suffixes=(RECORD,), overwrite=overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(out) as temporary:
        if form == "parquet":
            parquet_module().write_table(_arrow_table(header, rows), temporary)
        else:
            with open(temporary, "w", newline="") as handle:
                _write_table(handle, form, header, rows)
    settings = predictions.settings
    about = {"head": str(head_path), "rows": len(predictions.paths), "format": form, "topk": topk,
             "class_names": class_names, "tta": predictions.tta, "stores": predictions.stores,
             "device": settings.device, "precision": settings.precision, "dtype": settings.dtype,
             "decode": settings.decode.to_dict(), "skipped": [{"path": p, "reason": r} for p, r in predictions.errors],
             "featurekit": __version__}
    meta = atomic_write(out.with_name(out.name + RECORD), json.dumps(about, indent=2) + "\n")
    return [out, meta]


def _write_table(handle: TextIO, form: str, header: list[str], rows: list[list]) -> None:
    """csv and kaggle: every cell :func:`spreadsheet_safe`, numbers to 6 significant digits; json: a list of
    objects keyed by the header, numbers as numbers."""
    if form == "json":
        json.dump([dict(zip(header, row)) for row in rows], handle)
        handle.write("\n")
        return
    writer = csv.writer(handle)
    writer.writerow([spreadsheet_safe(cell) for cell in header])
    writer.writerows([spreadsheet_safe(f"{cell:.6g}" if isinstance(cell, float) else cell) for cell in row]
                     for row in rows)


def _arrow_table(header: list[str], rows: list[list]):
    """The table as an Arrow table: text columns as strings, probabilities as float64."""
    import pyarrow as pa

    return pa.table({name: pa.array(list(values)) for name, values in zip(header, zip(*rows))})


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


def _kaggle_rows(paths: Sequence[str], labels: Sequence) -> list[list]:
    """``[stem, label]`` by file stem, in numeric order when every stem is a number (Kaggle's ids)."""
    rows = [[Path(path).stem, label if isinstance(label, str) else float(label)] for path, label in zip(paths, labels)]
    numeric = all(stem.isdigit() for stem, _ in rows)
    return sorted(rows, key=lambda row: (int(row[0]) if numeric else 0, row[0]))


def predict_to(head: str | os.PathLike | Classifier, paths: str | os.PathLike | Sequence[str | os.PathLike],
               out: str | os.PathLike | TextIO = "predictions.csv", options: PredictOptions | None = None,
               settings: RunSettings | None = None,
               weights_paths: Mapping[str, str] | Sequence[str] | None = None) -> list[str]:
    """Classify ``paths`` (files, folders, ``@LIST`` files: :mod:`featurekit.predict.inputs`) with ``head``
    (loaded once), or with ``options.features`` the stores of ``options.split`` (nothing re-extracted),
    and write the table to ``out`` (a file, with its ``.json`` record beside it, or a text stream: the
    table alone) and, for labelled rows, the accuracy report beside it
    (:func:`~featurekit.heads.report.write_prediction_report`). The output is checked before any image
    is read (:func:`check_output`, :func:`~featurekit.files.check_output`). Returns the lines that
    tell what was written: accuracy on labelled rows, the report files, the predictions and their rate."""
    started = time.perf_counter()
    options = options or PredictOptions()
    classifier = head if isinstance(head, Classifier) else load_classifier(head, options.trust_paths)
    names = read_class_names(options.class_names) if options.class_names else None
    topk = check_output(classifier.record.classes, options.form, options.topk, names)
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    to_file = isinstance(out, (str, os.PathLike))
    inputs = [*classifier.inputs(), *paths, *(str(p)[1:] for p in paths if str(p).startswith("@")),
              *([options.class_names] if options.class_names else []),
              *(store_path(options.features, options.split, name) for name in classifier.record.store_names
                if options.features is not None and options.split)]
    if to_file:
        check_path(out, inputs, side_suffixes=(RECORD,), overwrite=options.overwrite)
    if options.features is not None:
        if paths:
            raise SettingsError("give image files or --features FEATURES --split SPLIT (stores), not both")
        predictions = predict_store(classifier, options.features, options.split, options.precision, options.tta)
    elif not paths:
        raise SettingsError("nothing to classify: give image files or folders, @LIST or --list FILE, or the stores "
                            "of a split: --features FEATURES --split SPLIT")
    else:
        predictions = predict_files(classifier, paths, settings, weights_paths, options.precision, options.tta)
    if not predictions.paths:
        raise SettingsError(f"none of the {len(predictions.errors)} files could be decoded")
    evaluation = labelled_metrics(predictions.truth, predictions.proba, predictions.classes)
    if to_file and evaluation is not None:
        check_path(out, inputs, side_suffixes=PREDICTION_REPORT)
    written = write_predictions(predictions, out, classifier.path, options.form, topk, names, options.overwrite)
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
