"""What a classifier records about the features it was trained on, as typed records (no torch here).

A head file's metadata (train-head's ``head.h5``) and a fine-tuned model's ``model.json`` both hold
a :class:`ClassifierRecord`: the head kind, the class names in probability-column order and one
:class:`~featurekit.store.format.BackboneRecord` per backbone, from which predict, neighbors and
finetune rebuild the trunks (:mod:`featurekit.backbones.rebuild`). They are read through
:func:`featurekit.records.parse`, so a missing field or a value of the wrong type is one line
naming the file and the field, never a ``KeyError`` deep inside.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import HeadFileError
from ..records import to_dict
from ..store.format import BackboneRecord
from .exclusions import Exclusion

__all__ = ["HEAD_FILE", "HEAD_FORMAT", "MODEL_FILE", "MODEL_FORMAT", "ClassifierRecord", "HeadRecord"]

# The files classifiers are written to, named here (no torch) so that looking at a folder needs no model code.
HEAD_FILE = "head.h5"  # what train-head writes into its --out folder (heads.head_file)
HEAD_FORMAT = "featurekit.head"  # its format attribute
MODEL_FILE = "model.json"  # what finetune writes into its --out folder (finetuning.artifact)
MODEL_FORMAT = "featurekit.finetuned"  # its format field


@dataclass(frozen=True)
class ClassifierRecord:
    """``classes``: the probability columns, in order; ``backbones``: the stores joined, in column order."""

    head: str
    classes: list[str]
    backbones: list[BackboneRecord]

    @property
    def store_names(self) -> list[str]:
        return [record.store_name for record in self.backbones]

    def check(self, where: str, features: int, outputs: int) -> None:
        """Raise :class:`HeadFileError` (one line naming ``where`` and the field) unless this record
        fits a classifier of ``features`` inputs and ``outputs`` probability columns: one class name
        per column, each once, and backbones whose features (and columns) add up to the inputs."""
        if not self.backbones:
            raise HeadFileError(f"{where}: field 'backbones' is empty; a classifier has at least one")
        if len(self.classes) != outputs:
            raise HeadFileError(f"{where}: field 'classes' names {len(self.classes)} classes, but the classifier "
                                f"has {outputs} outputs")
        twice = next((name for index, name in enumerate(self.classes) if name in self.classes[:index]), None)
        if twice is not None:
            raise HeadFileError(f"{where}: field 'classes' names {twice!r} twice")
        start = 0
        for index, record in enumerate(self.backbones):
            columns = [start, start + record.feature_dim]
            if record.feature_dim < 1 or record.columns not in (None, columns):
                raise HeadFileError(f"{where}: field 'backbones[{index}]' has feature_dim {record.feature_dim} and "
                                    f"columns {record.columns}, not {columns} of the classifier's inputs")
            start = columns[1]
        if start != features:
            raise HeadFileError(f"{where}: field 'backbones' gives {start} features, but the classifier takes "
                                f"{features}")

    def to_dict(self) -> dict:
        return {**to_dict(self), "backbones": [record.to_dict() for record in self.backbones]}


@dataclass(frozen=True)
class HeadRecord(ClassifierRecord):
    """The metadata train-head writes into a head file: the classifier's record and how it was made."""

    params: dict = field(default_factory=dict)
    best_params: dict = field(default_factory=dict)
    standardization: str = "none"
    features_dir: str | None = None
    train_split: str = "train"
    valid_split: str | None = None
    created: str = ""
    versions: dict = field(default_factory=dict)
    augmented: dict | None = None
    valid_accuracy: float | None = None
    excluded: Exclusion | None = None  # training rows left out as an audit flagged them (train-head --exclude)
