"""Report files of ``train-head``, ``finetune`` and ``predict`` on a labelled folder: JSON, Markdown, PNG plots.

``train-head`` writes ``report.json`` (``report_version`` 3), ``report.md`` and, where matplotlib
imports (the ``plots`` extra), ``confusion_matrix.png``, ``learning_curves.png`` (MLP) and
``embedding.png``. Plots are written first and the reports last, each report listing every file
of the folder in ``files``: a report on disk means everything it names is there. Without
matplotlib no PNG is written, and the log and report.md say why.

report_version 2 (version 1 had no such field): ``files`` added; ``timing.seconds_total`` is the
whole fit of every head tried (``--head all``: the sweep), ``timing.seconds_chosen`` the kept
head's own fit (version 1 gave that one as ``seconds_total``). report_version 3: ``choice`` added
(``reason``: why the kept head won, :func:`choice_reason`; ``heads``: each kind's kept candidate,
its validation scores and seconds); the linear heads' ``selection`` entries have ``iterations``,
``passes``, ``converged`` and ``seconds`` per C instead of ``epochs``, and stop where the sweep stopped.

``finetune`` writes the same two reports and plots (no embedding: it stores no features) from a
report of the same shape that may also carry a ``title``, ``notes`` (more lines for the summary), a
``note`` on the train accuracy, a ``train_curve_label`` and ``history`` records with train accuracy
(an epochs table) or without a train value (epoch 0: the head before any step, left out of that
curve); its ``selection`` is empty, the kept epoch being chosen in the epochs table.

The embedding picture projects the training rows (dots) and validation rows (crosses) to two
dimensions, coloured by class: t-SNE (scikit-learn, after PCA to 50 dimensions) up to
:data:`TSNE_MAX_ROWS` rows, PCA above, both on standardised features, seeded.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from sklearn import metrics

from ..files import atomic_output, atomic_write
from . import selection

__all__ = ["PREDICTION_REPORT", "Points", "choice_reason", "classification_metrics", "describe", "json_default",
           "labelled_metrics", "plotter", "save_figure", "scores_line", "tied_with", "write_prediction_report",
           "write_reports"]

logger = logging.getLogger(__name__)

REPORT_VERSION = 3
TSNE_MAX_ROWS = 1000  # t-SNE of 1,000 rows takes a few seconds on two cores; PCA above
PLOTS_MISSING = "matplotlib is not installed, so no PNG plots were written (pip install 'featurekit[plots]')"
CLASSES_IN_TABLES = 20  # more classes: the confusion matrix is in report.json and the PNG only
TOP_K = 5  # the protocol's top-5 accuracy (ImageNet-style), reported where there are more classes than that


@dataclass(frozen=True)
class Points:
    """Rows of one split for the embedding picture: ``features`` float32[N, D], ``labels`` int64[N]
    indexing ``classes``."""

    split: str
    features: np.ndarray
    labels: np.ndarray
    classes: Sequence[str]


def describe(entry: dict) -> str:
    """``"k v, k v"`` of a dict's non-None values (floats to 4 significant digits)."""
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in entry.items() if v is not None)


def tied_with(compared: Sequence[dict], chosen: str) -> list[dict]:
    """The other heads of ``compared`` (see :func:`choice_reason`) whose valid accuracy equals ``chosen``'s."""
    accuracy = next(entry["val_accuracy"] for entry in compared if entry["head"] == chosen)
    return [entry for entry in compared if entry["head"] != chosen and entry["val_accuracy"] == accuracy]


def choice_reason(compared: Sequence[dict], chosen: str, rule: str, rows: int, candidates: Sequence[dict] = ()) -> str:
    """Why head ``chosen`` won, in one line. ``compared``: per head kind tried, in the order fitted,
    its kept candidate (``head``, ``val_accuracy``, ``val_balanced_accuracy``, ``val_log_loss``,
    ``candidates`` tried), chosen by ``rule`` (:mod:`featurekit.heads.selection`) on ``rows``
    validation rows; ``candidates``: the kept head's own candidates (``selection_``), for the one-head case."""
    index = next(i for i, entry in enumerate(compared) if entry["head"] == chosen)
    winner = compared[index]
    if winner["val_accuracy"] is None:
        return f"{chosen}: no validation split, nothing compared"
    if len(compared) == 1:
        value = next((k for k in candidates[0] if k not in CANDIDATE_SCORES), None) if candidates else None
        kept = next((i for i, c in enumerate(candidates) if value and c[value] == winner.get(value)), 0)
        why = rule_reason(candidates, kept, rule, rows, lambda c: f"{value}={c[value]:.3g}" if isinstance(
            c[value], float) else f"{value}={c[value]}") if candidates else _scores(winner)
        return f"{chosen}: the only head tried; {why}"
    others = "; ".join(f"{e['head']} {e['val_accuracy']:.4f} / {e['val_log_loss']:.4g}" for e in compared
                       if e is not winner)
    return f"{rule_reason(compared, index, rule, rows, lambda e: e['head'])} (others, accuracy / log loss: {others})"


def _scores(record: dict) -> str:
    return f"valid accuracy {record['val_accuracy']:.4f}, log loss {record['val_log_loss']:.4g}"


def rule_reason(records: Sequence[dict], chosen: int, rule: str, rows: int, name) -> str:
    """Why ``rule`` kept ``records[chosen]`` (validation scores on ``rows`` rows) among ``records``, in
    words; ``name(record)``: how a record is named."""
    record = records[chosen]
    if len(records) == 1:
        return f"{name(record)}, the only candidate: {_scores(record)}"
    if rule == "accuracy-1se":
        best = max(r["val_accuracy"] for r in records)
        among = selection.eligible(records, rule, rows)
        return (f"{name(record)}: {_scores(record)}; the lowest log loss of the {len(among)} of {len(records)} "
                f"candidates whose accuracy is within one standard error ({selection.standard_error(best, rows):.4f} "
                f"on {rows} rows) of the best, {best:.4f} (rule accuracy-1se)")
    if rule == "log-loss":
        return f"{name(record)}: {_scores(record)}; the lowest log loss of {len(records)} candidates (rule log-loss)"
    score = "val_balanced_accuracy" if rule == "balanced-accuracy" else "val_accuracy"
    what = rule.replace("-", " ")
    ties = [name(r) for r in records if r is not record and r.get(score) == record.get(score)]
    tie = f", tied with {', '.join(ties)}; the lowest log loss of those" if ties else ""
    return (f"{name(record)}: {_scores(record)}; the highest valid {what} {record.get(score) or 0.0:.4f} of "
            f"{len(records)} candidates{tie} (rule {rule})")


def classification_metrics(truth: np.ndarray, proba: np.ndarray, columns: np.ndarray,
                           class_names: Sequence[str]) -> dict:
    """Metrics of probabilities ``proba`` float[M, C] against labels ``truth`` int64[M].

    ``columns`` int64[C]: the label each probability column stands for; ``class_names[label]`` its
    name. Per-class entries and the confusion matrix (rows true, columns predicted) follow ``columns``.
    """
    predicted = columns[proba.argmax(axis=1)]
    precision, recall, _, support = metrics.precision_recall_fscore_support(
        truth, predicted, labels=columns, zero_division=0)
    top5 = (float(metrics.top_k_accuracy_score(truth, proba, k=TOP_K, labels=columns)) if len(columns) > TOP_K
            else None)  # with 5 classes or fewer every row is in its top 5: no figure
    return {
        "n": int(len(truth)),
        "accuracy": float(metrics.accuracy_score(truth, predicted)),
        "top5_accuracy": top5,
        "balanced_accuracy": float(metrics.balanced_accuracy_score(truth, predicted)),
        "log_loss": float(metrics.log_loss(truth, proba, labels=columns)),
        "per_class": [{"class": class_names[c], "precision": float(p), "recall": float(r), "support": int(s)}
                      for c, p, r, s in zip(columns, precision, recall, support)],
        "confusion_matrix": metrics.confusion_matrix(truth, predicted, labels=columns).tolist(),
    }


# --------------------------------------------------------------------------- train-head's report


def write_reports(out_dir: Path, report: dict, plots: bool = True, points: Sequence[Points] = (),
                  written: Sequence[Path] = ()) -> dict:
    """Write the plots, then report.md and report.json into ``out_dir``; returns the report as written
    (``report_version`` and ``files``: ``written``, the files already there such as the head, and these,
    as paths relative to ``out_dir``)."""
    files = list(written)
    plt, missing = plotter(plots)
    if plt:
        files += _train_plots(plt, out_dir, report, points)
    names = [Path(path).relative_to(out_dir).as_posix() for path in files] + ["report.md", "report.json"]
    report = {"report_version": REPORT_VERSION, **report, "files": names}
    atomic_write(out_dir / "report.md", markdown_report(report, missing))
    atomic_write(out_dir / "report.json", json.dumps(report, indent=2, default=json_default) + "\n")
    return report


def json_default(value):
    """``json.dumps``'s ``default``: numpy scalars as numbers, tuples and arrays as lists."""
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, (tuple, np.ndarray)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def markdown_report(report: dict, plots_missing: str | None = None) -> str:
    """report.md: the figures of ``report`` for people, with its PNG files shown."""
    title = report.get("title") or f"Head report: {report['head']} on {' + '.join(report['backbones'])}"
    train = report["train"]
    lines = [f"# {title}", "", f"- chosen: {describe(report['chosen'])}"]
    lines += [f"- why: {report['choice']['reason']}"] if report.get("choice") else []
    lines += [f"- train: split `{train['split']}`, {train['n']} rows, accuracy {train['accuracy']:.4f}"
              + (f" ({train['note']})" if train.get("note") else "")]
    valid, time_ = report["valid"], report["timing"]
    if valid:
        lines += [f"- valid: split `{valid['split']}`, {valid['n']} rows: {scores_line(valid)}"]
        if valid["excluded_classes"]:
            lines += [f"- **left out** (classes without training rows): {describe(valid['excluded_classes'])}"]
    per_epoch = (f", {time_['seconds_per_epoch']:.3f} s per epoch over {time_['epochs']} epochs"
                 if time_["epochs"] else "")
    lines += [f"- time: {time_['seconds_total']:.2f} s in total{per_epoch}"]
    lines += [f"- {note}" for note in report.get("notes", [])]
    if plots_missing:
        lines += [f"- plots: none; {plots_missing}"]
    lines += [""]
    if valid:
        lines += evaluation_markdown(valid, report["classes"])
    lines += _epochs_markdown(report["history"])
    lines += _heads_markdown(report.get("choice"))
    lines += _selection_markdown(report)
    lines += _images_markdown(report["files"])
    return "\n".join(lines) + "\n"


def scores_line(evaluation: dict) -> str:
    """The linear-probe protocol's figures of :func:`classification_metrics`' result, in one line: top-1,
    top-5 (more than 5 classes), mean per-class (balanced) accuracy, log loss."""
    top5 = f", top-5 {evaluation['top5_accuracy']:.4f}" if evaluation.get("top5_accuracy") is not None else ""
    return (f"accuracy **{evaluation['accuracy']:.4f}**{top5}, mean per-class (balanced) accuracy "
            f"{evaluation['balanced_accuracy']:.4f}, log loss {evaluation['log_loss']:.4f}")


def evaluation_markdown(evaluation: dict, classes: list[str]) -> list[str]:
    """The per-class table and the confusion matrix of :func:`classification_metrics`' result."""
    lines = ["## Per class", "", "| class | precision | recall | support |", "|---|---|---|---|"]
    lines += [f"| {c['class']} | {c['precision']:.3f} | {c['recall']:.3f} | {c['support']} |"
              for c in evaluation["per_class"]]
    lines += ["", "## Confusion matrix (rows: true, columns: predicted)", ""]
    if len(classes) > CLASSES_IN_TABLES:
        return lines + [f"{len(classes)} classes: see `confusion_matrix` in the JSON report and the PNG.", ""]
    lines += ["| | " + " | ".join(classes) + " |", "|---" * (len(classes) + 1) + "|"]
    lines += [f"| **{name}** | " + " | ".join(str(v) for v in row) + " |"
              for name, row in zip(classes, evaluation["confusion_matrix"])]
    return lines + [""]


def _epochs_markdown(history: list[dict]) -> list[str]:
    """The table of fine-tuning's epochs (records with a train accuracy; an MLP head's have none)."""
    if not history or "train_accuracy" not in history[-1]:
        return []
    lines = ["## Epochs", "", "| epoch | train loss | train accuracy | val log loss | val accuracy | seconds |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['epoch']} | {_number(r.get('train_loss'))} | {_number(r.get('train_accuracy'))} | "
              f"{r['val_log_loss']:.4f} | {r['val_accuracy']:.4f} | {r['seconds']:.1f} |" for r in history]
    return lines + [""]


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _heads_markdown(choice: dict | None) -> list[str]:
    """The table of head kinds compared (``--head all``): each kind's kept candidate and fit seconds."""
    if not choice or len(choice["heads"]) < 2 or choice["heads"][0]["val_accuracy"] is None:
        return []
    lines = ["## Heads compared", "", "| head | chosen | val accuracy | val log loss | candidates | seconds |",
             "|---|---|---|---|---|---|"]
    for entry in choice["heads"]:
        chosen = describe({k: v for k, v in entry.items() if k not in CANDIDATE_SCORES})
        lines += [f"| {entry['head']} | {chosen} | {entry['val_accuracy']:.4f} | {entry['val_log_loss']:.4f} | "
                  f"{entry['candidates']} | {entry['seconds']:.1f} |"]
    return lines + [""]


CANDIDATE_SCORES = ("head", "val_accuracy", "val_balanced_accuracy", "val_log_loss", "epochs", "iterations", "passes",
                    "converged", "seconds", "candidates")


def _selection_markdown(report: dict) -> list[str]:
    if report["valid"] and not report["selection"]:  # fine-tuning: chosen among the epochs above
        return []
    if not report["valid"]:
        return ["## Selection", "", f"No validation split: nothing was selected; {describe(report['chosen'])} as "
                "given (see `params` in report.json).", ""]
    lines = ["## Selection on validation", "", "| head | value | val accuracy | val log loss | epochs or iterations |",
             "|---|---|---|---|---|"]
    for entry in report["selection"]:
        value = next(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items()
                     if k not in CANDIDATE_SCORES)
        lines += [f"| {entry['head']} | {value} | {entry['val_accuracy']:.4f} | {entry['val_log_loss']:.4f} | "
                  f"{entry.get('epochs') or entry.get('iterations') or ''} |"]
    return lines + [""]


def _images_markdown(files: Sequence[str]) -> list[str]:
    images = [name for name in files if name.endswith(".png")]
    return (["## Plots", ""] + [f"![{Path(name).stem.replace('_', ' ')}]({name})" for name in images]) if images else []


# --------------------------------------------------------------------------- predict's report on labelled folders


def labelled_metrics(truth: Sequence[str | None], proba: np.ndarray, classes: Sequence[str]) -> dict | None:
    """:func:`classification_metrics` over the rows of known class (``truth[i]`` a name of ``classes``,
    the columns of ``proba`` float[N, C]), or None if no row has one."""
    rows = [i for i, name in enumerate(truth) if name is not None]
    if not rows:
        return None
    column = {name: i for i, name in enumerate(classes)}
    labels = np.array([column[truth[i]] for i in rows], dtype=np.int64)
    return classification_metrics(labels, proba[rows], np.arange(len(classes)), classes)


PREDICTION_REPORT = (".confusion_matrix.png", ".report.md", ".report.json")  # the files beside predict's --out


def write_prediction_report(out: Path, about: dict, evaluation: dict, classes: list[str],
                            plots: bool = True) -> list[Path]:
    """``<out>.confusion_matrix.png`` (where matplotlib imports), ``<out>.report.md`` and
    ``<out>.report.json`` (``about``: head, folders; the metrics under ``evaluation``). Returns them."""
    files = []
    title = f"{about['head']}\n{', '.join(about['folders'])}: accuracy {evaluation['accuracy']:.4f} " \
            f"({evaluation['n']} images)"
    plt, missing = plotter(plots)
    if plt:
        files.append(confusion_plot(plt, evaluation["confusion_matrix"], classes,
                                    out.with_name(out.name + PREDICTION_REPORT[0]), title))
    md, js = (out.with_name(out.name + suffix) for suffix in PREDICTION_REPORT[1:])
    report = {"report_version": REPORT_VERSION, "kind": "predict", **about, "classes": classes,
              "evaluation": evaluation, "files": [p.name for p in [*files, md, js]]}
    lines = [f"# Predictions of {about['head']} on {', '.join(about['folders'])}", "",
             f"- {evaluation['n']} images of known class: {scores_line(evaluation)}"]
    lines += [f"- plots: none; {missing}"] if missing else []
    lines += ["", *evaluation_markdown(evaluation, classes), *_images_markdown(report["files"])]
    atomic_write(md, "\n".join(lines) + "\n")
    atomic_write(js, json.dumps(report, indent=2, default=json_default) + "\n")
    return [*files, md, js]


# --------------------------------------------------------------------------- plots


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None where matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plotter(plots: bool):
    """(pyplot, None) when plots are asked for and matplotlib imports; else (None, why: None if not asked)."""
    if not plots:
        return None, None
    plt = pyplot()
    if plt is None:
        logger.info(f"note: {PLOTS_MISSING}")
    return plt, None if plt else PLOTS_MISSING


def _train_plots(plt, out_dir: Path, report: dict, points: Sequence[Points]) -> list[Path]:
    written = []
    title = f"{report['head']} on {' + '.join(report['backbones'])}"
    if report["valid"]:
        valid = report["valid"]
        caption = f"{title}\n{valid['split']}: accuracy {valid['accuracy']:.4f} ({valid['n']} images)"
        written.append(confusion_plot(plt, valid["confusion_matrix"], report["classes"],
                                      out_dir / "confusion_matrix.png", caption))
    if report["history"]:
        written.append(_learning_curves(plt, report["history"], out_dir / "learning_curves.png",
                                        report.get("train_curve_label", "train loss (dropout on)")))
    if points:
        written.append(embedding_plot(plt, points, out_dir / "embedding.png", title))
    return written


def save_figure(plt, figure, path: Path) -> Path:
    with atomic_output(path) as temporary:
        figure.savefig(temporary, dpi=100, format="png")
    plt.close(figure)
    return path


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
    accuracy_axis.set(xlabel="epoch", ylabel="accuracy")
    for axis in (loss_axis, accuracy_axis):
        if axis.lines:  # an MLP fitted without validation has no accuracy curve
            axis.legend()
    figure.tight_layout()
    return save_figure(plt, figure, path)


def confusion_plot(plt, matrix: list[list[int]], classes: list[str], path: Path, title: str) -> Path:
    """scikit-learn's ConfusionMatrixDisplay: counts in the cells (up to 30 classes), colour bar, title."""
    size = min(5 + 0.35 * len(classes), 30)
    figure, axis = plt.subplots(figsize=(size + 1, size))
    display = metrics.ConfusionMatrixDisplay(np.array(matrix), display_labels=classes)
    display.plot(ax=axis, cmap="Blues", colorbar=True, include_values=len(classes) <= 30, values_format="d",
                 xticks_rotation="vertical")
    if len(classes) > 60:  # names would overlap
        axis.set(xticks=[], yticks=[])
    axis.set_title(title)
    figure.tight_layout()
    return save_figure(plt, figure, path)


def project(features: np.ndarray, reference_rows: int) -> tuple[np.ndarray, str]:
    """float32[N, D] -> (float[N, 2], method): standardised with the first ``reference_rows`` rows'
    mean and std, then t-SNE (up to TSNE_MAX_ROWS rows) or PCA, seeded."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    reference = features[:reference_rows]
    scaled = (features - reference.mean(axis=0)) / np.maximum(reference.std(axis=0), 1e-6)
    n = len(scaled)
    if n < 8 or n > TSNE_MAX_ROWS:
        k = min(2, n, scaled.shape[1])
        xy = PCA(k, random_state=0).fit(scaled[:reference_rows] if reference_rows >= k else scaled).transform(scaled)
        return np.pad(xy, ((0, 0), (0, 2 - k))), "PCA"
    reduced = PCA(min(50, n, scaled.shape[1]), random_state=0).fit_transform(scaled)
    tsne = TSNE(2, perplexity=min(30.0, (n - 1) / 3), init="pca", random_state=0)
    return tsne.fit_transform(reduced), "t-SNE"


def embedding_plot(plt, points: Sequence[Points], path: Path, title: str) -> Path:
    """The rows of ``points`` (the first: the reference split) in two dimensions, coloured by class."""
    xy, method = project(np.concatenate([p.features for p in points]), len(points[0].features))
    classes = list(dict.fromkeys(name for p in points for name in p.classes))
    colours = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    legend = len(classes) <= 20
    figure, axis = plt.subplots(figsize=(9.5 if legend else 8, 7))
    start, named = 0, set()
    for p, marker in zip(points, "ox+^"):
        rows = xy[start:start + len(p.features)]
        start += len(p.features)
        if not legend:  # one collection per split: a hundred classes drew 200 (a third of a second)
            colour = np.array([classes.index(name) % 20 for name in p.classes])[p.labels]
            axis.scatter(*rows.T, s=14, marker=marker, c=colours(colour))
            continue
        for label in np.unique(p.labels):
            name = p.classes[label]
            axis.scatter(*rows[p.labels == label].T, s=14, marker=marker, color=colours(classes.index(name) % 20),
                         label=name if name not in named else None)
            named.add(name)
    if legend:
        axis.legend(title="class", fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    splits = ", ".join(f"{p.split} {'ox+^'[i]}" for i, p in enumerate(points))
    axis.set_title(f"{title}\n{method} of {len(xy)} feature rows ({splits}), coloured by class")
    axis.set(xticks=[], yticks=[])
    figure.tight_layout()
    return save_figure(plt, figure, path)
