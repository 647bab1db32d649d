"""``featurekit evaluate``: few-shot accuracy of heads on cached features (nothing is re-extracted).

The protocol of the few-shot tables (CLIP_benchmark's ``--fewshot_k``, DINOv2's ``n_per_class_list``
x ``n_tries``): for each shot count k and each of ``draws`` draws, k training images of every class
are drawn without replacement (a class with fewer takes all it has, and a warning says so), every
head is fitted on that same draw and scored on the whole valid split: accuracy and balanced
accuracy (the mean per-class recall). Each head is fitted at its own defaults (logreg and svm:
``C``; knn: ``n_neighbors``, at most the rows drawn; mlp: ``max_epochs`` at ``weight_decay``): k
images per class leave no validation rows to choose on, and choosing on the split that is scored
would report the score of the choice. The row of a (head, k) holds the mean over the draws and
its 95% t-interval, ``mean +- t(0.975, draws - 1) sd / sqrt(draws)``; the row ``shots="all"`` is
each head fitted once on every training row, at the same defaults. The heads are fitted on the
features as extracted, as the papers' few-shot probes are; with ``standardize`` they standardise
as they do on a training split, here on the rows of the draw, whose k means and stds per class are
noisy (hymenoptera, 1 shot: 16-28 points lower; docs/heads.md has the measurements).

Draw d of k shots is made by ``numpy.random.default_rng(s)``, ``s = draw_seed(seed, k, d)``
(recorded in the row's ``seeds``; :func:`draw_rows` gives its rows). Writes into the output folder,
each file whole or absent, one run at a time, evaluation.json last:

- ``evaluation.json``: the settings, the heads' parameters, and per (head, shots) ``head``,
  ``shots``, ``draws``, ``mean``, ``interval`` [low, high] (null for one draw), ``balanced_mean``,
  ``balanced_interval``, per draw ``accuracies``, ``balanced_accuracies``, ``seeds`` and ``rows``
  (training rows fitted), ``short_classes`` (classes with fewer than k training rows) and ``seconds``;
- ``evaluation.md``: the same as a table; ``accuracy_vs_shots.png``, where matplotlib imports.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import stats
from sklearn.base import clone

from ..errors import FeaturekitWarning, SettingsError
from ..files import atomic_write, check_output, check_output_folder, folder_lock
from ..store.dataset import FeatureSet, check_same_extraction, load_features, store_files
from ..store.format import RANDOM, file_stem, warn_random
from .base import Head, proba_scores
from .registry import HEADS, make_heads
from .report import json_default, plotter, save_figure
from .settings import ALL, EVALUATE, EvaluateSettings
from .train import ValidationRows, refuse_unlabelled, scored_rows

__all__ = ["EVALUATION_FILES", "draw_rows", "draw_seed", "evaluate_and_summarise", "evaluate_few_shot", "score_draw",
           "summary", "t_interval"]

logger = logging.getLogger(__name__)

EVALUATION_VERSION = 1
EVALUATION_JSON, EVALUATION_MD, EVALUATION_PLOT = "evaluation.json", "evaluation.md", "accuracy_vs_shots.png"
EVALUATION_FILES = (EVALUATION_PLOT, EVALUATION_MD, EVALUATION_JSON)
CONFIDENCE = 0.95


def draw_seed(seed: int, shots: int, draw: int) -> int:
    """The seed of draw ``draw`` of ``shots`` images per class: the same for every head, another for
    each (shots, draw), ``numpy.random.default_rng`` of it makes the draw (:func:`draw_rows`)."""
    return int(np.random.SeedSequence([seed, shots, draw]).generate_state(1)[0])


def draw_rows(labels: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """int64[M]: increasing indices of ``shots`` rows of each class of ``labels`` int64[N] (every row of
    a class with fewer), drawn without replacement by ``numpy.random.default_rng(seed)``, class by class."""
    rng = np.random.default_rng(seed)
    picked = [rng.choice(np.flatnonzero(labels == label), min(shots, count), replace=False)
              for label, count in zip(*np.unique(labels, return_counts=True))]
    return np.sort(np.concatenate(picked)).astype(np.int64)


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> list[float] | None:
    """[low, high]: the mean of ``values`` +- t((1 + confidence) / 2, n - 1) sd / sqrt(n), sd with n - 1
    degrees of freedom (Student's t interval of the mean); None for fewer than 2 values."""
    if len(values) < 2:
        return None
    values = np.asarray(values, dtype=np.float64)
    half = stats.t.ppf((1 + confidence) / 2, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return [float(values.mean() - half), float(values.mean() + half)]


def default_out_dir(features_dir: str | Path, store_names: Sequence[str]) -> Path:
    return Path(features_dir) / "evaluations" / "+".join(map(file_stem, store_names))


def evaluate_few_shot(features_dir: str | Path, store_names: Sequence[str], settings: EvaluateSettings = EVALUATE,
                      params: dict | None = None) -> dict:
    """Few-shot accuracy of the heads ``settings.heads`` on the stores of ``store_names`` (see the
    module), written into ``settings.out``; returns the evaluation as evaluation.json holds it.
    ``params``: head parameters (:class:`~featurekit.heads.settings.HeadOptions`), each head taking
    those it has. An existing evaluation is refused unless ``settings.overwrite``."""
    features_dir = Path(features_dir)
    shots = checked_shots(settings)
    params = {**(params or {}), **({} if settings.standardize else {"standardize": False})}
    heads = make_heads(list(HEADS) if ALL in settings.heads else list(dict.fromkeys(settings.heads)), params)
    out_dir = check_output_folder(settings.out or default_out_dir(features_dir, store_names))
    with folder_lock(out_dir):
        check_output(out_dir / EVALUATION_JSON, overwrite=settings.overwrite)
        train, valid = load_splits(features_dir, store_names, settings)
        started = time.perf_counter()
        rows = measure(heads, train, valid, shots, settings)
        evaluation = {"evaluation_version": EVALUATION_VERSION, "backbones": list(store_names),
                      "features_dir": str(features_dir), **splits_record(train, valid, settings.valid_split),
                      "shots": shots, "draws": settings.draws, "seed": settings.seed,
                      "standardize": settings.standardize, "confidence": CONFIDENCE,
                      "heads": {head.kind: head.get_params() for head in heads},
                      "defaults": {head.kind: {head.grid_param: getattr(head, head.grid_param)} for head in heads},
                      "rows": rows, "seconds": time.perf_counter() - started, "out_dir": str(out_dir)}
        return write_evaluation(out_dir, evaluation, settings.plots)


def splits_record(train: FeatureSet, valid: ValidationRows, valid_split: str) -> dict:
    """What evaluation.json says of the training split the draws come from and of the rows scored."""
    counts = np.bincount(train.labels, minlength=len(train.classes))
    return {"train": {"split": train.split, "n": len(train), "classes": int((counts > 0).sum()),
                      "fewest_rows": int(counts[counts > 0].min())},
            "valid": {"split": valid_split, "n": len(valid.labels), "excluded_classes": valid.excluded}}


def checked_shots(settings: EvaluateSettings) -> list[int]:
    """The shot counts, increasing, each once; a value that cannot work is a one-line :class:`SettingsError`."""
    if not settings.shots or not settings.heads:
        raise SettingsError(f"--{'shots' if not settings.shots else 'head'}: no value (at least one is needed)")
    for name, value, low in [("shots", min(settings.shots), 1), ("draws", settings.draws, 1),
                             ("seed", settings.seed, 0)]:
        if value < low:
            raise SettingsError(f"--{name} must be at least {low} (got {value})")
    if settings.valid_split == settings.train_split:
        raise SettingsError(f"--valid-split {settings.valid_split!r} is the split the images are drawn from; "
                            "score on another split")
    return sorted(set(int(k) for k in settings.shots))


def load_splits(features_dir: Path, store_names: Sequence[str], settings: EvaluateSettings
                ) -> tuple[FeatureSet, ValidationRows]:
    """The training split's plain rows and the valid rows labelled with its classes, checked as
    train-head checks them (missing, unlabelled, or unlike stores: a one-line error)."""
    for split, role in ((settings.train_split, "training split"), (settings.valid_split, "validation split")):
        refuse_unlabelled(store_files(features_dir, split, store_names)[0], role)
    train = load_features(features_dir, settings.train_split, store_names)
    valid = load_features(features_dir, settings.valid_split, store_names)
    check_same_extraction(train, valid)
    rows = scored_rows(valid, train, "the scores")
    warn_random([info.store_name for info in train.stores if info.header.weights == RANDOM])
    logger.info(f"{train.split}: {len(train)} rows x {train.features.shape[1]} features ({', '.join(store_names)}), "
                f"{len(np.unique(train.labels))} classes; {valid.split}: {len(rows.labels)} rows scored")
    return train, rows


def measure(heads: Sequence[Head], train: FeatureSet, valid: ValidationRows, shots: Sequence[int],
            settings: EvaluateSettings) -> list[dict]:
    """One row per head and shot count (the heads' order, shots increasing, then ``"all"``)."""
    counts = np.bincount(train.labels, minlength=len(train.classes))
    warn_short_classes(train.classes, counts, shots)
    draws: dict[tuple[str, int | str], list[dict]] = {(head.kind, k): [] for head in heads for k in [*shots, ALL]}
    for k in shots:
        for draw in range(settings.draws):
            seed = draw_seed(settings.seed, k, draw)
            picked = draw_rows(train.labels, k, seed)
            for head in heads:
                draws[head.kind, k].append(score_draw(head, train.features[picked], train.labels[picked], valid, seed))
        for head in heads:
            logger.info(describe_row(table_row(head.kind, k, draws[head.kind, k], train.classes, counts)))
    for head in heads:
        draws[head.kind, ALL].append(score_draw(head, train.features, train.labels, valid, None))
    return [table_row(kind, k, scored, train.classes, counts) for (kind, k), scored in draws.items()]


def score_draw(head: Head, X: np.ndarray, y: np.ndarray, valid: ValidationRows, seed: int | None) -> dict:
    """A fresh copy of ``head`` fitted on float32[M, D] / int64[M] and scored on the valid rows."""
    started = time.perf_counter()
    with warnings.catch_warnings():  # 1 shot is 1 row per class by design, not a regression target mistaken
        warnings.filterwarnings("ignore", "The number of unique classes is greater than 50%", UserWarning)
        fitted = clone(head).fit(X, y)
    scores = proba_scores(fitted.predict_proba(valid.features), np.searchsorted(fitted.classes_, valid.labels))
    return {"accuracy": scores["val_accuracy"], "balanced_accuracy": scores["val_balanced_accuracy"], "seed": seed,
            "rows": len(y), "seconds": time.perf_counter() - started}


def table_row(kind: str, shots: int | str, draws: list[dict], classes: Sequence[str], counts: np.ndarray) -> dict:
    accuracies = [d["accuracy"] for d in draws]
    balanced = [d["balanced_accuracy"] for d in draws]
    short = {} if shots == ALL else {classes[c]: int(n) for c, n in enumerate(counts) if 0 < n < shots}
    return {"head": kind, "shots": shots, "draws": len(draws), "mean": float(np.mean(accuracies)),
            "interval": t_interval(accuracies), "balanced_mean": float(np.mean(balanced)),
            "balanced_interval": t_interval(balanced), "accuracies": accuracies, "balanced_accuracies": balanced,
            "seeds": None if shots == ALL else [d["seed"] for d in draws], "rows": [d["rows"] for d in draws],
            "short_classes": short, "seconds": sum(d["seconds"] for d in draws)}


def warn_short_classes(classes: Sequence[str], counts: np.ndarray, shots: Sequence[int]) -> None:
    """One :class:`FeaturekitWarning` naming the classes with fewer training rows than the most shots."""
    short = [(classes[c], int(n)) for c, n in enumerate(counts) if 0 < n < max(shots)]
    if short:
        named = ", ".join(f"{name} ({n} rows)" for name, n in short[:10]) + (", ..." if len(short) > 10 else "")
        warnings.warn(f"classes with fewer training rows than {max(shots)} shots take all they have at the shot "
                      f"counts above their rows: {named} (evaluation.json: each row's short_classes)",
                      FeaturekitWarning, stacklevel=4)


def describe_row(row: dict) -> str:
    interval = "" if row["interval"] is None else " [{:.4f}, {:.4f}]".format(*row["interval"])
    shots = "all rows" if row["shots"] == ALL else f"{row['shots']} shot{'s' if row['shots'] > 1 else ''}"
    return (f"{row['head']}, {shots}: accuracy {row['mean']:.4f}{interval}, balanced {row['balanced_mean']:.4f} "
            f"({row['draws']} draw{'s' if row['draws'] > 1 else ''}, {row['seconds']:.1f} s)")


def summary(evaluation: dict) -> list[str]:
    """What ``featurekit evaluate`` prints: one line per row, then where the files are."""
    return [*map(describe_row, evaluation["rows"]),
            f"written to {evaluation['out_dir']}/ ({', '.join(evaluation['files'])})"]


def evaluate_and_summarise(features_dir: str | Path, store_names: Sequence[str], settings: EvaluateSettings = EVALUATE,
                           params: dict | None = None) -> list[str]:
    """``featurekit evaluate``: :func:`evaluate_few_shot`, then its :func:`summary`. ``params``: the head
    options given on the command line, less ``seed`` (there, ``--seed`` seeds the draws)."""
    params = {name: value for name, value in (params or {}).items() if name != "seed"}
    return summary(evaluate_few_shot(features_dir, store_names, settings, params))


def write_evaluation(out_dir: Path, evaluation: dict, plots: bool) -> dict:
    """The plot, evaluation.md, then evaluation.json; returns the evaluation with its ``files``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plt, missing = plotter(plots)
    if plt:
        accuracy_plot(plt, evaluation, out_dir / EVALUATION_PLOT)
    else:  # not a plot of an earlier run beside these figures
        (out_dir / EVALUATION_PLOT).unlink(missing_ok=True)
    evaluation = {**evaluation, "files": [name for name in EVALUATION_FILES if plt or name != EVALUATION_PLOT]}
    atomic_write(out_dir / EVALUATION_MD, evaluation_markdown(evaluation, missing))
    atomic_write(out_dir / EVALUATION_JSON, json.dumps(evaluation, indent=2, default=json_default) + "\n")
    return evaluation


def evaluation_markdown(evaluation: dict, plots_missing: str | None = None) -> str:
    train, valid = evaluation["train"], evaluation["valid"]
    defaults = "; ".join(f"{kind} {name} {value}" for kind, chosen in evaluation["defaults"].items()
                         for name, value in chosen.items())
    lines = [f"# Few-shot evaluation: {', '.join(evaluation['heads'])} on {' + '.join(evaluation['backbones'])}", "",
             f"- drawn: k images of each class of split `{train['split']}` ({train['n']} images, {train['classes']} "
             f"classes, the fewest {train['fewest_rows']}), {evaluation['draws']} draws per k, seed "
             f"{evaluation['seed']}; every head fitted on the same draws",
             f"- scored: the whole split `{valid['split']}`, {valid['n']} images",
             f"- heads at their defaults (no validation rows to choose on): {defaults}; features "
             + ("standardised as each head does, on the rows of each draw (--standardize)"
                if evaluation["standardize"] else "as extracted"),
             f"- interval: {evaluation['confidence']:.0%} t-interval of the mean over the draws, "
             "mean +- t(0.975, draws - 1) sd / sqrt(draws); shots `all`: one fit on every training image"]
    if valid["excluded_classes"]:
        lines += ["- **left out** (valid classes without training rows): "
                  + ", ".join(f"{name} ({n} rows)" for name, n in valid["excluded_classes"].items())]
    if plots_missing:
        lines += [f"- plots: none; {plots_missing}"]
    lines += ["", "| head | shots | draws | accuracy | 95% interval | balanced accuracy | seconds |",
              "|---|---|---|---|---|---|---|"]
    for row in evaluation["rows"]:
        interval = "" if row["interval"] is None else "{:.4f} - {:.4f}".format(*row["interval"])
        lines += [f"| {row['head']} | {row['shots']} | {row['draws']} | {row['mean']:.4f} | {interval} | "
                  f"{row['balanced_mean']:.4f} | {row['seconds']:.2f} |"]
    short = [row for row in evaluation["rows"] if row["short_classes"] and row["head"] == evaluation["rows"][0]["head"]]
    lines += [""] * bool(short) + [f"- at {row['shots']} shots, all the training rows of: "
                                   + ", ".join(f"{name} ({n})" for name, n in row["short_classes"].items())
                                   for row in short]
    if EVALUATION_PLOT in evaluation["files"]:
        lines += ["", f"![accuracy against shots]({EVALUATION_PLOT})"]
    return "\n".join(lines) + "\n"


def accuracy_plot(plt, evaluation: dict, path: Path) -> Path:
    """Mean accuracy against shots (log scale) with the intervals as error bars; all rows dashed."""
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for index, kind in enumerate(evaluation["heads"]):
        rows = [row for row in evaluation["rows"] if row["head"] == kind]
        drawn, everything = [row for row in rows if row["shots"] != ALL], rows[-1]
        means = np.array([row["mean"] for row in drawn])
        bounds = np.array([row["interval"] or [row["mean"]] * 2 for row in drawn])
        axis.errorbar([row["shots"] for row in drawn], means, yerr=[means - bounds[:, 0], bounds[:, 1] - means],
                      marker="o", capsize=3, color=f"C{index}", label=kind)
        axis.axhline(everything["mean"], color=f"C{index}", linestyle="--", linewidth=1,
                     label=f"{kind}, all {evaluation['train']['n']} training images")
    axis.set_xscale("log", base=2)
    axis.set_xticks(evaluation["shots"], [str(k) for k in evaluation["shots"]])
    axis.set_xlabel("training images per class")
    axis.set_ylabel(f"{evaluation['valid']['split']} accuracy")
    axis.set_title(f"few-shot: {' + '.join(evaluation['backbones'])}, {evaluation['draws']} draws, "
                   f"{evaluation['confidence']:.0%} intervals")
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small")
    return save_figure(plt, figure, path)
