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

``load_head`` reads it with h5py and ``json`` only. A file that is not HDF5 is refused in one line;
one that looks like a pickle (the joblib head files of featurekit before head format 2) is refused
without being opened as one, with the way out: :func:`convert_pickle_head` (``featurekit
convert-head --trust OLD NEW``), which unpickles it only because the user says they trust it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted

from ..errors import HeadFileError, SettingsError, first_line
from ..files import atomic_output
from .base import Head
from .knn import Neighbours
from .records import HEAD_FILE, HEAD_FORMAT
from .registry import HEADS
from .report import json_default
from .solver import LinearFit

OLD_HEAD_FILE = "head.joblib"  # what it wrote before head format 2: a pickle, never loaded by default
HEAD_FORMAT_VERSION = 2  # 1: a joblib pickle of the head object
FITTED = ("best_params_", "selection_", "history_", "fit_seconds_", "n_iter_", "n_features_in_", "precision_")



# --------------------------------------------------------------------------- writing


def save_head(path: str | os.PathLike, head: Head, metadata: dict) -> Path:
    """Write a fitted head and its ``metadata`` (JSON values) to one HDF5 file, atomically."""
    check_is_fitted(head, "model_")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays, values = head._model_arrays()
    with atomic_output(path) as temporary:
        with h5py.File(temporary, "w") as h5:
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
    except Exception as error:  # h5py, JSON, shapes: any of them means a damaged or foreign file
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
    file_format, version = h5.attrs.get("format"), int(h5.attrs.get("format_version", -1))
    if file_format != HEAD_FORMAT:
        what = "a feature store" if file_format == "featurekit.store" else "an HDF5 file"
        raise HeadFileError(f"{path}: {what}, not a featurekit head (train-head writes {HEAD_FILE})")
    if version > HEAD_FORMAT_VERSION:
        raise HeadFileError(f"{path}: head format {version} is newer than this featurekit reads "
                            f"({HEAD_FORMAT_VERSION}); upgrade featurekit")
    kind = h5.attrs["kind"]
    if kind not in HEADS:
        raise HeadFileError(f"{path}: unknown head kind {kind!r} (this featurekit has {', '.join(HEADS)})")
    params = {name: tuple(value) if isinstance(value, list) else value
              for name, value in json.loads(h5.attrs["params"]).items()}
    head = HEADS[kind](**params)
    for name, value in json.loads(h5.attrs["fitted"]).items():
        setattr(head, name, value)
    setattr(head, f"{head.grid_param}_", head.best_params_[head.grid_param])  # C_, n_neighbors_, weight_decay_
    classes = h5["classes"]
    head.classes_ = classes.asstr()[()].astype(str) if h5py.check_string_dtype(classes.dtype) else classes[()]
    head.scaler_ = _scaler(h5["scaler"]) if "scaler" in h5 else None
    model = h5["model"]
    head.model_ = head._model_from_arrays({name: model[name][()] for name in model}, _plain(model.attrs))
    return head, json.loads(h5.attrs["metadata"])


def _scaler(group: h5py.Group) -> StandardScaler:
    scaler = StandardScaler()
    scaler.mean_, scaler.scale_, scaler.var_ = (group[name][()] for name in ("mean", "scale", "var"))
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
