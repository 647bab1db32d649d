"""What predict writes and how: :class:`PredictOptions` (no torch imported here)."""

from __future__ import annotations

from dataclasses import dataclass

from ..devices import PRECISIONS
from ..options import setting
from ..views.augment import TTA_VIEWS

__all__ = ["FORMS", "PredictOptions"]

FORMS = ("csv", "kaggle")


@dataclass(frozen=True)
class PredictOptions:
    """The table predict writes (``form``, ``topk``, ``class_names``), the labelled folders' report
    (``plots``) and how the features are made beyond the head's record (``precision``, ``tta``)."""

    form: str = setting("csv", "csv: path, predicted, one probability per class; kaggle: id,label with the "
                        "probability of the second class (dogs-vs-cats)", flag="--format", choices=FORMS)
    topk: int | None = setting(None, "csv columns top1, top1_prob, ... topK, topK_prob instead of one per class",
                               metavar="K", help_default="one column per class")
    class_names: str | None = setting(None, "JSON object of class folder name -> readable name (e.g. "
                                      "cat_to_name.json), written in the predicted and topI columns", metavar="JSON",
                                      help_default="the folder names")
    precision: str | None = setting(None, "compute precision; another one than the stores' is written in the "
                                    "output's .json", choices=PRECISIONS, help_default="the head's stores' one")
    tta: str = setting("none", "average each image's class probabilities over test-time views: flip (and mirror), "
                       "five-crop (centre and corners)", choices=tuple(TTA_VIEWS))
    plots: bool = setting(True, "labelled folders: no confusion-matrix PNG", flag="--no-plots", negate=True)
    trust_paths: bool = setting(False, "load a fine-tuned model whose model.json names files outside its folder")
