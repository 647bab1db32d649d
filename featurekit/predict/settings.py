"""What predict writes and how: :class:`PredictOptions` (no torch imported here)."""

from __future__ import annotations

from dataclasses import dataclass

from ..devices import PRECISIONS
from ..options import setting
from ..views.augment import TTA_VIEWS

__all__ = ["FORMS", "NeighborsSettings", "PredictOptions"]

FORMS = ("csv", "json", "parquet", "kaggle", "kaggle-proba")


@dataclass(frozen=True)
class PredictOptions:
    """The table predict writes (``form``, ``topk``, ``class_names``, ``overwrite``), the labelled folders'
    report (``plots``), how the features are made beyond the head's record (``precision``, ``tta``), or
    the stores to score instead of images (``features``, ``split``)."""

    form: str = setting("csv", "csv: path, predicted, one probability per class; json and parquet: the same table; "
                        "kaggle: id,label with the predicted class names; kaggle-proba (two classes): id,label with "
                        "the probability of the second class (dogs-vs-cats)", flag="--format", choices=FORMS)
    topk: int | None = setting(None, "columns top1, top1_prob, ... topK, topK_prob instead of one per class (K above "
                               "the head's classes: all of them, with a note)", metavar="K",
                               help_default="one column per class")
    class_names: str | None = setting(None, "JSON object of class folder name -> readable name (e.g. "
                                      "cat_to_name.json), written in the predicted, topI and kaggle label columns",
                                      metavar="JSON", help_default="the folder names")
    precision: str | None = setting(None, "compute precision; another one than the stores' is written in the "
                                    "output's .json", choices=PRECISIONS, help_default="the head's stores' one")
    tta: str = setting("none", "average each image's class probabilities over test-time views: flip (and mirror), "
                       "five-crop (centre and corners)", choices=tuple(TTA_VIEWS))
    plots: bool = setting(True, "labelled folders: no confusion-matrix PNG", flag="--no-plots", negate=True)
    features: str | None = setting(None, "score the stores of --split in this features folder (extract's --out) "
                                   "instead of image files: nothing is re-extracted; the stores must be the features "
                                   "the head was trained on", metavar="FEATURES", help_default="images are given")
    split: str | None = setting(None, "the split of --features to score (e.g. test)", help_default="none")
    overwrite: bool = setting(False, "replace an existing --out file (it stays whole until the new one replaces it)")
    trust_paths: bool = setting(False, "load a fine-tuned model whose model.json names files outside its folder")


@dataclass(frozen=True)
class NeighborsSettings:
    """What ``neighbors`` searches beyond the head (``split``, ``valid_split``), how many neighbours
    (``k``) and what it writes: a contact sheet of the ``worst`` queries, text or one line of JSON."""

    split: str | None = setting(None, "split searched for neighbours",
                                help_default="the head's training split, or train")
    valid_split: str | None = setting(None, "split of the misclassified images",
                                      help_default="the head's validation split")
    k: int = setting(5, "neighbours per query", flag="--neighbors", short="-k")
    sheet: str | None = setting(None, "write a contact sheet of the queries and their neighbours", metavar="PNG",
                                help_default="none")
    worst: int = setting(16, "queries on the contact sheet, worst first")
    json: bool = setting(False, "print one line of JSON instead of text")
