"""The fine-tuned model as files: data, never a pickle, that ``predict`` and ``extract`` read.

A model folder holds

- ``trunks/<store_name>.pt``: each fine-tuned trunk's state dict under the architecture's own
  names (the tensors up to its feature node), which ``extract --weights-path`` loads like any
  local weights file; its weights sha256 is new, so stores of the trunk before fine-tuning read
  as stale by construction;
- ``model.pt``: the classifier's state dict (standardisation, classifier);
- ``model.json``, written last: the format, the classes in probability-column order, the
  classifier's shape (:func:`featurekit.finetuning.model.build_head_layers`), the sha256 of every
  file, and one record per backbone as a head has them (the feature identity: backbone, node,
  weights sha256, preprocessing, decode policy, precision, dtype, features version; weights name
  and source, feature dimension, columns), the fine-tuned ones pointing at their trunk file.

``predict --head DIR`` (or ``DIR/model.json``) rebuilds each backbone from its record, exactly as for a head
(so the trunk file must give the recorded sha256), runs the trunks once per image and applies the
classifier (:class:`FinetunedHead`). A model folder is self-contained: a file it names outside the
folder (an absolute path, ``../``) is refused unless the caller trusts its paths (``trust_paths``,
``predict --trust-paths``). ``model.json`` is a typed record whose classifier shape must fit
``model.pt``'s tensors (checked on torch's meta device, nothing allocated), the class list and the
backbones' features; the tensors must be finite. State dicts are read with
``torch.load(weights_only=True)`` (:func:`featurekit.backbones.weights.read_tensors`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import sklearn
import torch
from torch import nn

from ..backbones.rebuild import load_recorded
from ..backbones.trunks import Backbone
from ..backbones.weights import read_tensors
from ..errors import HeadFileError, first_line
from ..files import atomic_output, atomic_write, file_sha256, output_handle
from ..heads.base import Head
from ..heads.head_file import HEAD_FILE, OLD_HEAD_FILE, load_head
from ..heads.records import MODEL_FILE, MODEL_FORMAT, ClassifierRecord, HeadRecord
from ..records import missing, parse
from ..store.format import BackboneRecord, store_path
from .model import FinetuneModel, build_head_layers

__all__ = ["Classifier", "MODEL_FILE", "find_head_file", "load_classifier", "save_model", "save_tensors"]

MODEL_PT = "model.pt"  # the classifier's state dict
MODEL_FORMAT_VERSION = 2  # 2: an svm classifier is a Linear with its temperature folded in (1: Platt sigmoids)


@dataclass(frozen=True)
class ClassifierSpec:
    """The classifier's shape in ``model.json`` (:func:`featurekit.finetuning.model.build_head_layers`)."""

    kind: str
    in_features: int
    n_classes: int
    hidden_sizes: list[int] = field(default_factory=list)
    dropout: float = 0.0


@dataclass(frozen=True)
class ModelRecord:
    """``model.json``: the classifier's record (:meth:`classifier_record`), and the files and settings
    of the fine-tuned model. Its fields without a default are the ones a model file must have."""

    format_version: int
    head: str
    classifier: ClassifierSpec
    classifier_file: str
    classifier_sha256: str
    backbones: list[BackboneRecord]
    classes: list[str]
    format: str = MODEL_FORMAT
    finetune: dict = field(default_factory=dict)
    created: str = ""
    versions: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Classifier:
    """A classifier file as predict and neighbors use it: a head of train-head (``head.h5``) or a
    fine-tuned model (``model.json``): ``head.predict_proba(float32[N, D]) -> float64[N, C]`` on the
    features its ``record.backbones`` make, columns ``record.classes``."""

    path: Path
    head: Head | FinetunedHead
    record: ClassifierRecord

    def inputs(self) -> list[Path]:
        """The files this classifier was read from or names (its file, the model folder's files,
        weights files, the stores of its record): what no output of a run using it may replace."""
        files = [self.path, *({self.path.parent / MODEL_PT} if self.path.suffix == ".json" else set())]
        for backbone in self.record.backbones:
            if backbone.weights.startswith("file:"):
                files.append(Path(backbone.weights_source))
            features_dir = getattr(self.record, "features_dir", None)
            if features_dir:
                files += [store_path(features_dir, split, backbone.store_name) for split in backbone.fingerprints or {}]
        return files


class FinetunedHead:
    """A fine-tuned model's classifier as ``predict`` uses a head: ``predict_proba(float32[N, D])`` ->
    float64[N, C] on features made by its (fine-tuned) trunks."""

    def __init__(self, layers: nn.Sequential):
        self.layers = layers.eval()

    @torch.no_grad()
    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        log_p = [self.layers(torch.from_numpy(features[i:i + 4096]).float()) for i in range(0, len(features), 4096)]
        proba = torch.exp(torch.cat(log_p).double())
        return (proba / proba.sum(dim=1, keepdim=True)).numpy()


def save_model(out_dir: Path, model: FinetuneModel, backbones: Sequence[Backbone], head: HeadRecord, spec: dict,
               precision: str, about: dict) -> list[Path]:
    """Write ``model``'s current state as a model folder in ``out_dir``; returns the files written,
    ``model.json`` last.

    ``head``: the head's record (its backbones and classes); ``precision``: the one the model was
    trained and validated at, which predict reproduces; ``about``: how it was fine-tuned."""
    records, written = [], []
    for index, (backbone, recorded) in enumerate(zip(backbones, head.backbones)):
        record = {**recorded.to_dict(), "precision": precision}
        record.pop("fingerprints", None)  # those are the head's stores'
        if model.parts[index].parameters:
            path = save_tensors(out_dir / "trunks" / f"{backbone.store_name}.pt", model.trunk_state(index))
            written.append(path)
            weights = load_recorded(backbone.name, backbone.node, backbone.source, "DEFAULT",
                                    str(path)).weights  # as extract will
            record.update(weights=weights.name, weights_sha256=weights.sha256, weights_source=str(path.resolve()),
                          trunk_file=f"trunks/{path.name}", trunk_file_sha256=file_sha256(path))
        records.append(record)
    classifier = save_tensors(out_dir / MODEL_PT, model.head.state_dict())
    artifact = {"format": MODEL_FORMAT, "format_version": MODEL_FORMAT_VERSION, "classes": head.classes,
                "head": spec["kind"], "classifier": spec, "classifier_file": classifier.name,
                "classifier_sha256": file_sha256(classifier), "backbones": records, "finetune": about,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "versions": {"torch": torch.__version__, "sklearn": sklearn.__version__}}
    return [*written, classifier, atomic_write(out_dir / MODEL_FILE, json.dumps(artifact, indent=2) + "\n")]


def save_tensors(path: Path, payload: object, what: str = "cannot write", hint: str = "") -> Path:
    """``torch.save(payload)`` to ``path`` atomically; a full disk is one line (files.output_handle)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, what, hint) as temporary, output_handle(temporary) as handle:
        torch.save(payload, handle)
    return path


def load_model(path: str | os.PathLike, trust_paths: bool = False) -> tuple[FinetunedHead, ClassifierRecord]:
    """``(classifier, record)`` of a model folder's ``model.json``, as predict uses a head
    (:func:`find_head_file` finds the file in a folder).

    Every file must have the sha256 ``model.json`` records and lie in the model's folder (unless
    ``trust_paths``); each fine-tuned trunk's record is pointed at its file beside the JSON, wherever
    the folder was moved. Raises :class:`HeadFileError`.
    """
    path = Path(path)
    try:
        values = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise HeadFileError(f"{path}: not a readable fine-tuned model ({first_line(error)})") from None
    if not isinstance(values, dict) or values.get("format") != MODEL_FORMAT:
        raise HeadFileError(f"{path}: not a featurekit head or fine-tuned model")
    absent = missing(ModelRecord, values)
    if absent:
        raise HeadFileError(f"{path}: a fine-tuned model without {', '.join(absent)} (damaged or edited)")
    record = parse(ModelRecord, values, str(path))
    if record.format_version > MODEL_FORMAT_VERSION:
        raise HeadFileError(f"{path}: fine-tuned model format {record.format_version} is newer than this "
                            f"featurekit reads ({MODEL_FORMAT_VERSION})")
    if record.format_version == 1 and record.head == "svm":
        raise HeadFileError(f"{path}: fine-tuned from a sigmoid-calibrated svm head (model format 1), which this "
                            "featurekit does not build; fine-tune again from an svm head trained by this version")
    spec = record.classifier
    if spec.kind != record.head or spec.in_features < 1 or any(size < 1 for size in spec.hidden_sizes):
        raise HeadFileError(f"{path}: field 'classifier' ({spec.kind}, {spec.in_features} features, hidden sizes "
                            f"{spec.hidden_sizes}) is not a {record.head} classifier")
    record_of = ClassifierRecord(record.head, record.classes, record.backbones)
    record_of.check(str(path), spec.in_features, spec.n_classes)
    layers = _classifier(path, spec, _checked(path, record.classifier_file, record.classifier_sha256, trust_paths))
    backbones = [dataclasses.replace(backbone, weights_source=str(_checked(path, backbone.trunk_file,
                                                                          backbone.trunk_file_sha256, trust_paths)))
                 if backbone.trunk_file else backbone for backbone in record.backbones]
    return FinetunedHead(layers), ClassifierRecord(record.head, record.classes, backbones)


def _classifier(path: Path, spec: ClassifierSpec, state_file: Path) -> torch.nn.Sequential:
    """The layers of ``spec`` with ``state_file``'s tensors, whose names and shapes must be the layers'
    (compared on the meta device before anything is allocated) and whose values must be finite."""
    state = read_tensors(state_file, HeadFileError)
    with torch.device("meta"):
        expected = build_head_layers(dataclasses.asdict(spec)).state_dict()
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise HeadFileError(f"{state_file}: not a state dict of tensors")
    for name, tensor in expected.items():
        found = state.get(name)
        if found is None or found.shape != tensor.shape:
            shape = "absent" if found is None else f"of shape {list(found.shape)}"
            raise HeadFileError(f"{path}: field 'classifier' needs tensor {name} of shape {list(tensor.shape)} in "
                                f"{state_file.name}, which holds it {shape}")
        if found.is_floating_point() and not torch.isfinite(found).all():
            raise HeadFileError(f"{state_file}: tensor {name} holds NaN or infinite values")
    layers = build_head_layers(dataclasses.asdict(spec))
    layers.load_state_dict({name: state[name] for name in expected})
    return layers


def _checked(model_file: Path, relative: str, sha256: str | None, trust_paths: bool = False) -> Path:
    path = (model_file.parent / relative).resolve()
    folder = model_file.parent.resolve()
    if not trust_paths and folder not in path.parents:
        raise HeadFileError(f"{model_file}: its file {relative} lies outside the model's folder (the model is not "
                            "self-contained); pass --trust-paths if you trust where it points")
    if not path.is_file():
        raise HeadFileError(f"{model_file}: its file {relative} is missing")
    if file_sha256(path) != sha256:
        raise HeadFileError(f"{model_file}: its file {relative} was changed since it was written (sha256 differs)")
    return path


# --------------------------------------------------------------------------- any classifier file


HEAD_FILES = (HEAD_FILE, MODEL_FILE)  # what train-head and finetune write into their --out folder


def find_head_file(path: str | os.PathLike) -> Path:
    """The file ``path`` names: the file itself, or the one of :data:`HEAD_FILES` in a folder that
    train-head (``head.h5``) or finetune (``model.json``) wrote; a folder holding both is
    refused, since either could be meant. A folder holding only an old pickle head (``head.joblib``)
    gives that file, which :func:`~featurekit.heads.head_file.load_head` refuses, saying how to convert it."""
    path = Path(path)
    if not path.is_dir():
        return path
    found = [path / name for name in HEAD_FILES if (path / name).is_file()]
    if len(found) > 1:
        raise HeadFileError(f"{path}: holds both {HEAD_FILE} (train-head) and {MODEL_FILE} (finetune); "
                            "give the file meant")
    if found:
        return found[0]
    if (path / OLD_HEAD_FILE).is_file():
        return path / OLD_HEAD_FILE
    heads = sorted({p.parent.name for name in HEAD_FILES for p in path.glob(f"*/{name}")})
    inside = f"; its subfolders with one: {', '.join(heads)}" if heads else ""
    raise HeadFileError(f"{path}: a folder without {HEAD_FILE} (train-head writes it into its --out folder) or "
                        f"{MODEL_FILE} (finetune's){inside}")


def load_classifier(path: str | os.PathLike, trust_paths: bool = False) -> Classifier:
    """The classifier at ``path`` (a file, or a folder :func:`find_head_file` looks in): a head file
    (train-head's ``head.h5``) or a fine-tuned model (finetune's ``model.json``: told by its ``.json``
    suffix), its record checked (:func:`featurekit.records.parse`) against the classifier's inputs and
    outputs. ``trust_paths``: a model may name files outside its folder. Raises :class:`HeadFileError`."""
    path = find_head_file(path)
    if path.suffix == ".json":
        return Classifier(path, *load_model(path, trust_paths))
    head, metadata = load_head(path)
    record = parse(HeadRecord, metadata, str(path))
    record.check(str(path), head.n_features_in_, len(head.classes_))
    return Classifier(path, head, record)
