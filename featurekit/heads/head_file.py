"""Head files: arrays in HDF5 plus JSON, read without running any code (never a pickle).

``save_head`` writes one HDF5 file (train-head's ``head.h5``; layout in docs/heads.md)::

    attributes  format "featurekit.head", format_version 2, kind (mlp | logreg | svm | knn),
                params (JSON: get_params()), fitted (JSON: best_params_, selection_, history_,
                fit_seconds_, n_iter_, n_features_in_, precision_), metadata (JSON: what the caller gave)
    classes     the labels of the probability columns: int64[K] (or strings)
    scaler/     mean float64[D], scale float64[D], var float64[D]; attribute n_samples_seen
                (absent when the head was fitted with standardize=False)
    model/      the fitted model as the head gives it (``Head._model_arrays``):
                logreg, svm: coef float32[K, D], intercept float32[K]; attributes loss, C,
                  inverse_temperature (svm: fitted; logreg: 1), iterations, passes, converged, objective, tol
                knn: rows float32[N, D] (standardised unless protocol dino, unit norm), targets int64[N],
                  vote_weights float64[K] (class_weight balanced only); attribute k
                mlp: its state dict, one dataset per tensor ("1.weight", ...); attributes
                  in_features, hidden_sizes, n_classes, dropout (the layers of heads.build_mlp)

``load_head`` reads it with h5py and ``json`` only, as data from anyone: every attribute is a typed
record (:func:`featurekit.records.parse`), every array's shape is checked against the class list,
the feature count and the model's recorded sizes, and against the file's own size, before any
array is read or any model built (a few bytes cannot declare gigabytes), and every number must be
finite; any violation is one line naming the file and the field. A file that is not HDF5 is refused in one line;
one that looks like a pickle (the joblib head files of featurekit before head format 2) is refused
without being opened as one, with the way out: :func:`convert_pickle_head` (``featurekit
convert-head --trust OLD NEW``), which unpickles it only because the user says they trust it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted

from ..errors import HeadFileError, SettingsError, first_line
from ..files import hdf5_output
from ..records import parse
from .base import Head
from .knn import Neighbours
from .mlp import build_mlp
from .records import HEAD_FILE, HEAD_FORMAT
from .registry import HEADS
from .report import json_default
from .solver import LinearFit

__all__ = ["HEAD_FILE", "OLD_HEAD_FILE", "load_head", "save_head"]

OLD_HEAD_FILE = "head.joblib"  # what it wrote before head format 2: a pickle, never loaded by default
HEAD_FORMAT_VERSION = 2  # 1: a joblib pickle of the head object
FITTED = ("best_params_", "selection_", "history_", "fit_seconds_", "n_iter_", "n_features_in_", "precision_")


@dataclass(frozen=True)
class HeadAttributes:
    """The attributes of a head file (``params``, ``fitted``, ``metadata``: JSON texts)."""

    format: str
    format_version: int
    kind: str
    params: str
    fitted: str
    metadata: str


@dataclass(frozen=True)
class Fitted:
    """The fitted values a head file records (``fitted``); ``n_features_in_`` sizes every array."""

    n_features_in_: int
    best_params_: dict = field(default_factory=dict)
    selection_: list = field(default_factory=list)
    history_: list = field(default_factory=list)
    fit_seconds_: float = 0.0
    precision_: str = "fp32"  # heads before issue 21 trained in float32


@dataclass(frozen=True)
class LinearValues:
    """``model`` attributes of a logreg or svm head."""

    loss: str
    C: float
    inverse_temperature: float
    iterations: int
    passes: float
    converged: bool
    objective: float
    tol: float = 1e-3  # head files before issue 21: max |gradient| 1e-3, not the relative gap


@dataclass(frozen=True)
class KNNValues:
    k: int


@dataclass(frozen=True)
class MLPValues:
    in_features: int
    hidden_sizes: list[int]
    n_classes: int
    dropout: float


MODEL_VALUES = {"logreg": LinearValues, "svm": LinearValues, "knn": KNNValues, "mlp": MLPValues}



# --------------------------------------------------------------------------- writing


def save_head(path: str | os.PathLike, head: Head, metadata: dict) -> Path:
    """Write a fitted head and its ``metadata`` (JSON values) to one HDF5 file, atomically."""
    check_is_fitted(head, "model_")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays, values = head._model_arrays()
    with hdf5_output(path) as h5:
        h5.attrs.update(format=HEAD_FORMAT, format_version=HEAD_FORMAT_VERSION, kind=head.kind,
                        params=_json(head.get_params()),
                        fitted=_json({name: getattr(head, name) for name in FITTED if hasattr(head, name)}),
                        metadata=_json(metadata))
        _write_classes(h5, head.classes_)
        if head.scaler_ is not None:
            scaler = h5.create_group("scaler")
            for name in ("mean", "scale", "var"):
                scaler.create_dataset(name, data=getattr(head.scaler_, f"{name}_"))
            scaler.attrs["n_samples_seen"] = int(head.scaler_.n_samples_seen_)
        model = h5.create_group("model")
        for name, array in arrays.items():
            model.create_dataset(name, data=np.ascontiguousarray(array))
        model.attrs.update(values)
    return path


def _json(value: Any) -> str:
    return json.dumps(value, default=json_default)


def _write_classes(h5: h5py.File, classes: np.ndarray) -> None:
    if classes.dtype.kind in "US" or classes.dtype == object:
        h5.create_dataset("classes", data=[str(c) for c in classes], dtype=h5py.string_dtype())
    else:
        h5.create_dataset("classes", data=classes)


# --------------------------------------------------------------------------- reading


def load_head(path: str | os.PathLike) -> tuple[Head, dict]:
    """``(head, metadata)`` from a file written by :func:`save_head`. Raises :class:`HeadFileError`
    (one line) for anything else; never unpickles."""
    path = Path(path)
    if not path.is_file():
        raise HeadFileError(f"{path}: no such head file")
    if not h5py.is_hdf5(path):
        raise HeadFileError(_not_hdf5(path))
    try:
        with h5py.File(path, "r") as h5:
            head, metadata = _read(path, h5)
        head.predict_proba(np.zeros((1, head.n_features_in_), np.float32))  # arrays of the shapes the head needs
    except HeadFileError:
        raise
    except Exception as error:  # h5py on damaged blocks, or a check above missed: a damaged or foreign file
        raise HeadFileError(f"{path}: damaged head file ({type(error).__name__}: {first_line(error)})") from None
    return head, metadata


def _not_hdf5(path: Path) -> str:
    with open(path, "rb") as handle:
        start = handle.read(2)
    if len(start) == 2 and start[0] == 0x80 and 2 <= start[1] <= 5:  # PROTO opcode: how joblib.dump begins
        return (f"{path}: a pickle (a featurekit head before head format {HEAD_FORMAT_VERSION}?), not loaded: "
                f"unpickling runs any code the file holds; only if you trust who made it, convert it with "
                f"featurekit convert-head --trust {path} {path.with_name(HEAD_FILE)}")
    return f"{path}: not a featurekit head file (not HDF5; train-head writes {HEAD_FILE})"


def _read(path: Path, h5: h5py.File) -> tuple[Head, dict]:
    file_format = h5.attrs.get("format")
    if file_format != HEAD_FORMAT:
        what = "a feature store" if file_format == "featurekit.store" else "an HDF5 file"
        raise HeadFileError(f"{path}: {what}, not a featurekit head (train-head writes {HEAD_FILE})")
    attributes = parse(HeadAttributes, _plain(h5.attrs), str(path))
    if attributes.format_version > HEAD_FORMAT_VERSION:
        raise HeadFileError(f"{path}: head format {attributes.format_version} is newer than this featurekit reads "
                            f"({HEAD_FORMAT_VERSION}); upgrade featurekit")
    kind = attributes.kind
    if kind not in HEADS:
        raise HeadFileError(f"{path}: unknown head kind {kind!r} (this featurekit has {', '.join(HEADS)})")
    params, fitted, metadata = (_json_field(path, name, getattr(attributes, name))
                                for name in ("params", "fitted", "metadata"))
    taken = HEADS[kind]().get_params()
    unknown = next((name for name in params if name not in taken), None)
    if unknown:
        raise HeadFileError(f"{path}: field 'params.{unknown}' is not a parameter of a {kind} head")
    values = _check_arrays(path, h5, kind, parse(Fitted, fitted, str(path), field="fitted").n_features_in_)
    if kind == "mlp" and list(params.get("hidden_sizes", values.hidden_sizes)) != values.hidden_sizes:
        raise HeadFileError(f"{path}: field 'params.hidden_sizes' is {params['hidden_sizes']}, but the model's "
                            f"layers are {values.hidden_sizes}")
    head = HEADS[kind](**{name: tuple(value) if isinstance(value, list) else value for name, value in params.items()})
    for name in FITTED:
        if name in fitted:
            setattr(head, name, fitted[name])
    chosen = getattr(head, "best_params_", {}).get(head.grid_param, getattr(head, head.grid_param))
    setattr(head, f"{head.grid_param}_", chosen)  # C_, n_neighbors_, weight_decay_
    classes = h5["classes"]
    head.classes_ = classes.asstr()[()].astype(str) if h5py.check_string_dtype(classes.dtype) else classes[()]
    head.scaler_ = _scaler(h5["scaler"]) if "scaler" in h5 else None
    model = h5["model"]
    head.model_ = head._model_from_arrays({name: _finite(path, model[name]) for name in model}, _plain(model.attrs))
    return head, metadata


def _json_field(path: Path, name: str, text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as error:
        raise HeadFileError(f"{path}: field {name!r} is not JSON ({first_line(error)})") from None
    if not isinstance(value, dict):
        raise HeadFileError(f"{path}: field {name!r} is {type(value).__name__}, not a mapping")
    return value


def _check_arrays(path: Path, h5: h5py.File, kind: str, features: int) -> Any:
    """Check every array's shape against the classes, ``features`` and the model's recorded sizes, and
    each one's size against the file's, before any is read; returns the model's values (typed)."""
    file_size = path.stat().st_size
    for name, dataset in _datasets(h5):
        if dataset.size * max(dataset.dtype.itemsize, 1) > file_size:
            raise HeadFileError(f"{path}: field {name!r} declares {list(dataset.shape)} values, more than the "
                                f"file's {file_size} bytes hold")
    classes = len(_shaped(path, h5, "classes", 1))
    if classes < 2:
        raise HeadFileError(f"{path}: field 'classes' holds {classes} class(es); a head has at least 2")
    if "scaler" in h5:
        for name in ("mean", "scale", "var"):
            _shaped(path, h5, f"scaler/{name}", 1, (features,))
        parse(ScalerValues, _plain(h5["scaler"].attrs), str(path), field="scaler")
        if not (h5["scaler/scale"][()] > 0).all():
            raise HeadFileError(f"{path}: field 'scaler/scale' holds a value that is not positive")
    if "model" not in h5:
        raise HeadFileError(f"{path}: no field 'model'")
    values = parse(MODEL_VALUES[kind], _plain(h5["model"].attrs), str(path), field="model")
    expected = _model_shapes(path, kind, values, classes, features, h5["model"])
    for name, shape in expected.items():
        _shaped(path, h5, f"model/{name}", len(shape), shape)
    extra = sorted(set(h5["model"]) - set(expected))
    if extra:
        raise HeadFileError(f"{path}: field 'model/{extra[0]}' is not an array of a {kind} head")
    return values


@dataclass(frozen=True)
class ScalerValues:
    n_samples_seen: int


def _model_shapes(path: Path, kind: str, values: Any, classes: int, features: int,
                  model: h5py.Group) -> dict[str, tuple[int, ...]]:
    """The shape each array of a ``kind`` head's model must have."""
    if kind in ("logreg", "svm"):
        if not np.isfinite([values.C, values.inverse_temperature]).all():
            raise HeadFileError(f"{path}: field 'model.C' or 'model.inverse_temperature' is not a finite number")
        return {"coef": (classes, features), "intercept": (classes,)}
    if kind == "knn":
        rows = len(_shaped(path, model.file, "model/targets", 1))
        if not 1 <= values.k <= rows:
            raise HeadFileError(f"{path}: field 'model.k' is {values.k}, not 1 to its {rows} rows")
        targets = model["targets"][()]
        if targets.dtype.kind not in "iu" or (len(targets) and not (0 <= targets.min() <= targets.max() < classes)):
            raise HeadFileError(f"{path}: field 'model/targets' holds values outside the {classes} classes")
        return {"rows": (rows, features), "targets": (rows,), **({"vote_weights": (classes,)}
                                                                 if "vote_weights" in model else {})}
    named = [("in_features", values.in_features, features), ("n_classes", values.n_classes, classes)]
    for name, value, wanted in named:
        if value != wanted:
            raise HeadFileError(f"{path}: field 'model.{name}' is {value}, but the head has {wanted}")
    if any(size < 1 for size in values.hidden_sizes):
        raise HeadFileError(f"{path}: field 'model.hidden_sizes' holds a size below 1")
    with torch.device("meta"):  # the layers' shapes, nothing allocated: the arrays must be there for them
        layers = build_mlp(features, tuple(values.hidden_sizes), classes, 0.0)
    return {name: tuple(tensor.shape) for name, tensor in layers.state_dict().items()}


def _datasets(group: h5py.Group, prefix: str = "") -> list[tuple[str, h5py.Dataset]]:
    found = []
    for name, item in group.items():
        if isinstance(item, h5py.Group):
            found += _datasets(item, f"{prefix}{name}/")
        else:
            found.append((f"{prefix}{name}", item))
    return found


def _shaped(path: Path, h5: h5py.File, name: str, ndim: int, shape: tuple[int, ...] | None = None) -> h5py.Dataset:
    """The dataset ``name``, refused unless it is an array of ``ndim`` dimensions (of ``shape``)."""
    dataset = h5.get(name)
    if not isinstance(dataset, h5py.Dataset):
        raise HeadFileError(f"{path}: no field {name!r}")
    if len(dataset.shape) != ndim or (shape is not None and tuple(dataset.shape) != tuple(shape)):
        wanted = list(shape) if shape is not None else f"{ndim} dimension(s)"
        raise HeadFileError(f"{path}: field {name!r} has shape {list(dataset.shape)}, not {wanted}")
    return dataset


def _finite(path: Path, dataset: h5py.Dataset) -> np.ndarray:
    """A dataset's values; a float array must hold only finite numbers."""
    values = dataset[()]
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise HeadFileError(f"{path}: field {dataset.name.lstrip('/')!r} holds NaN or infinite values")
    return values


def _scaler(group: h5py.Group) -> StandardScaler:
    scaler = StandardScaler()
    path = Path(group.file.filename)
    scaler.mean_, scaler.scale_, scaler.var_ = (_finite(path, group[name]) for name in ("mean", "scale", "var"))
    scaler.n_features_in_ = len(scaler.mean_)
    scaler.n_samples_seen_ = int(group.attrs["n_samples_seen"])
    return scaler


def _plain(attrs: h5py.AttributeManager) -> dict:
    """HDF5 attributes as Python values (numpy scalars and arrays to numbers and lists)."""
    return {name: value.tolist() if isinstance(value, (np.ndarray, np.generic)) else value
            for name, value in attrs.items()}


# --------------------------------------------------------------------------- old pickle heads


def convert_pickle_head(old: str | os.PathLike, new: str | os.PathLike, trust: bool) -> Path:
    """Rewrite an old joblib head (head format 1) as a head file of this format; returns ``new``.

    Unpickling runs any code the file holds, so this refuses unless ``trust`` (the user trusts who
    made the file). mlp, knn and logreg heads convert exactly (a two-class logistic regression's
    single row ``w`` becomes the rows ``0, w``: the same softmax); an svm head's probabilities came
    from sigmoid calibration, which the svm head no longer has, so it must be retrained."""
    old, new = Path(old), Path(new)
    if not trust:
        raise SettingsError(f"{old}: convert-head unpickles the file, which runs any code it holds; give --trust only "
                            "if you trust who made it")
    if new.exists():
        raise SettingsError(f"{new}: exists; give a new file name")
    import joblib  # scikit-learn's dependency; only ever used here, on request

    try:
        content = joblib.load(old)
    except Exception as error:
        raise HeadFileError(f"{old}: not a readable pickle ({type(error).__name__}: {first_line(error)})") from None
    if not isinstance(content, dict) or content.get("format") != HEAD_FORMAT or content.get("format_version") != 1:
        raise HeadFileError(f"{old}: not a featurekit head of format 1")
    head = _converted(old, content["head"])
    return save_head(new, head, content["metadata"])


def _converted(old: Path, head: Any) -> Head:
    """A head of this version equal to the unpickled ``head`` (an instance of the current class with
    the old attributes: parameters this version does not take are dropped, new ones get defaults)."""
    kind = head.kind
    if kind == "svm":
        raise HeadFileError(f"{old}: an svm head of format 1 gave sigmoid-calibrated probabilities, which this svm "
                            "head does not have; retrain it: featurekit train-head FEATURES_DIR --head svm")
    state = vars(head)
    taken = HEADS[kind]().get_params()
    converted = HEADS[kind](**{name: value for name, value in state.items() if name in taken})
    for name in ("classes_", "scaler_", *FITTED):
        if name in state:
            setattr(converted, name, state[name])
    model = state["model_"]
    if kind == "logreg":
        coef, intercept = (torch.from_numpy(np.asarray(a, np.float32)) for a in (model.coef_, model.intercept_))
        if len(coef) == 1:  # sklearn's binary form: p1 = sigmoid(w x + b) = softmax([0, w x + b])[1]
            coef, intercept = torch.cat([torch.zeros_like(coef), coef]), torch.cat([torch.zeros_like(intercept),
                                                                                    intercept])
        model = LinearFit(float(model.C), "logistic", coef, intercept, int(np.max(model.n_iter_)), 0.0, True,
                          float("nan"))
    elif kind == "knn":
        model = Neighbours(model.rows, model.targets, model.k)
    converted.model_ = model
    return converted
