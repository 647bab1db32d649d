"""The head kinds and the head parameters train-head sets from its options (no torch imported here).

:data:`HEAD_KINDS` names the heads in the order ``--head all`` fits them (:mod:`.registry` maps each
to its estimator). :class:`HeadOptions` holds the parameters the command line sets; each head takes
those its ``__init__`` has (:func:`~featurekit.heads.registry.make_heads`), and an option not given
leaves each head its own default, which is the one written here (:data:`MLP`).
:class:`TrainHeadSettings` and :class:`EvaluateSettings` are what train-head and evaluate run.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..devices import AUTO
from ..options import setting
from ..views.augment import TTA_VIEWS

__all__ = ["ALL", "CLASS_WEIGHTS", "EVALUATE", "EvaluateSettings", "HEAD_KINDS", "MLP", "SELECT", "SELECT_RULES",
           "TRAIN_HEAD", "HeadOptions", "KNN_PROTOCOLS", "TrainHeadSettings"]

HEAD_KINDS = ("mlp", "logreg", "svm", "knn")  # --head all fits them in this order; ties keep the first fitted
ALL = "all"
SELECT_RULES = ("accuracy-1se", "accuracy", "balanced-accuracy", "log-loss")  # heads.selection: what each means
SELECT = "accuracy-1se"  # the default rule (docs/heads.md: the measurements that chose it)
CLASS_WEIGHTS = ("none", "balanced")
KNN_PROTOCOLS = ("featurekit", "dino")  # heads.knn.KNNHead's protocol


def _batch_size(text: str) -> int | str:
    return text if text == AUTO else int(text)


@dataclass(frozen=True)
class HeadOptions:
    """Head parameters with their defaults; the MLP's are :class:`~featurekit.heads.mlp.MLPHead`'s."""

    device: str = setting(AUTO, "training device of the mlp, logreg and svm heads: auto (cuda if available), cpu, "
                          "cuda or cuda:N", given_only=True)
    max_epochs: int = setting(50, "MLP: most epochs per candidate", flag="--epochs", given_only=True)
    batch_size: int | str = setting(AUTO, "MLP batch size", parse=_batch_size, given_only=True,
                                    help_default="256, 128 or 64: the largest with 16 steps per epoch")
    hidden_sizes: tuple[int, ...] = setting((1000,), "MLP hidden layer sizes", flag="--hidden", given_only=True)
    lr: float = setting(1e-3, "MLP Adam learning rate", given_only=True)
    patience: int = setting(3, "MLP early stopping patience in epochs", given_only=True)
    seed: int = setting(0, "MLP initialisation and batch order seed", given_only=True)
    select: str = setting(SELECT, "how every head keeps a candidate on validation, and --head all a head: "
                          "accuracy-1se: the lowest log loss among those within one standard error of the best "
                          "accuracy (usable probabilities); accuracy, balanced-accuracy (ties: lower log loss); "
                          "log-loss", choices=SELECT_RULES, given_only=True, help_default=SELECT)
    class_weight: str = setting("none", "balanced: weigh each row's loss (kNN: its vote) by N / (classes x its "
                                "class's rows), for imbalanced sets", choices=CLASS_WEIGHTS, given_only=True,
                                help_default="none")
    protocol: str = setting("featurekit", "kNN: featurekit (standardised features, k 1..50) or dino (DINO/DINOv2's "
                            "kNN: cosine of the features as extracted, k 10, 20, 100, 200, T 0.07)", flag="--knn",
                            choices=KNN_PROTOCOLS, given_only=True, help_default="featurekit")


MLP = HeadOptions()


def _split_or_none(text: str) -> str | None:
    return None if text.lower() == "none" else text


@dataclass(frozen=True)
class TrainHeadSettings:
    """What train-head fits and on which splits (its Python form: :func:`~featurekit.heads.train.train_head`)."""

    head: str = setting("mlp", "head kind; all: every kind, the best on validation kept", choices=(*HEAD_KINDS, ALL))
    train_split: str = setting("train", "split to fit on")
    valid_split: str | None = setting("valid", "split to choose hyper-parameters on and evaluate; none: no "
                                      "validation, no selection", parse=_split_or_none)
    augmented: bool = setting(True, "ignore the train stores' augmented views (extract --augment), to compare",
                              flag="--no-augmented", negate=True)
    tta: str = setting("none", "also report valid accuracy with test-time augmentation; the valid stores must hold "
                       "those views (extract --split VALID --tta MODE)", choices=tuple(TTA_VIEWS))
    plots: bool = setting(True, "write no PNG plots", flag="--no-plots", negate=True)
    exclude: str | None = setting(None, "leave out the training rows an audit flagged: featurekit audit's audit.json, "
                                  "optionally :KINDS (exact,near,leakage,labels,outliers; default all)",
                                  metavar="AUDIT.json[:KINDS]", help_default="none")


TRAIN_HEAD = TrainHeadSettings()


@dataclass(frozen=True)
class EvaluateSettings:
    """What ``evaluate`` measures: each head fitted at its defaults on ``shots`` training images per
    class, ``draws`` seeded draws each, scored on the whole valid split, plus once on all training
    rows (its Python form: :func:`~featurekit.heads.fewshot.evaluate_few_shot`)."""

    heads: tuple[str, ...] = setting(("logreg", "knn"), "head kinds, each fitted at its defaults (a few rows leave "
                                     "nothing to choose on); all: every kind", flag="--head",
                                     choices=(*HEAD_KINDS, ALL))
    shots: tuple[int, ...] = setting((1, 2, 4, 8, 16), "training images per class in a draw (a row on all the "
                                     "training images is added)")
    draws: int = setting(5, "draws per shot count: the mean and its 95% t-interval are over them")
    seed: int = setting(0, "seed of the draws; every head sees the same draws")
    train_split: str = setting("train", "split to draw the training images from")
    valid_split: str = setting("valid", "split to score on, whole")
    standardize: bool = setting(False, "standardise every feature with the mean and std of the rows drawn, as the "
                                "heads do on a training split (k per class: noisy statistics, 16-28 points lower "
                                "at 1 shot on hymenoptera); default: the features as extracted",
                                flag="--standardize")
    out: str | None = setting(None, "output folder (default: FEATURES_DIR/evaluations/<backbones>)")
    overwrite: bool = setting(False, "replace an evaluation already in the output folder")
    plots: bool = setting(True, "write no PNG plot", flag="--no-plots", negate=True)


EVALUATE = EvaluateSettings()
