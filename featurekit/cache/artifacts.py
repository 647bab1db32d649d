"""What a features folder holds: stores, heads, fine-tuned models, and what runs leave beside them.

``extract`` writes ``<out>/<split>/<store>.h5``; while a store is made, ``.<store>.partial/`` holds
its committed chunks, ``.<store>.lock`` is held by the writing process, and ``.<store>.h5.tmp-HOST-PID``
is the store being joined (:mod:`featurekit.store.chunks`). ``train-head`` writes ``head.h5`` into
its folder, ``finetune`` ``model.json`` and the files it names. Any output written through
``files.atomic_output`` is ``.<name>.tmp-HOST-PID`` until its rename.

:func:`find_artifacts` finds them under the paths given (a file is taken as it is, a folder is
walked, without following directory links); :func:`verify_paths` and :func:`info_paths` are
``featurekit verify`` and ``info`` of any of them. Looking at a folder imports no torch: heads and
models are told by their format names (:mod:`featurekit.heads.records`); only verifying one loads it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import h5py

from ..errors import DataError, FeaturekitError, StoreError
from ..heads.records import HEAD_FORMAT, MODEL_FILE, MODEL_FORMAT, ClassifierRecord, HeadRecord
from ..records import parse
from ..store.format import FORMAT, read_header, store_path
from ..store.info import describe_store
from ..store.verify import verify_stores

__all__ = ["CLASSIFIERS", "LEFTOVERS", "Artifact", "Checked", "find_artifacts", "info_paths", "verify_paths"]

CLASSIFIERS = ("head", "model")
LEFTOVERS = ("partial", "lock", "temporary")  # what runs leave beside their outputs


@dataclass(frozen=True)
class Artifact:
    """A file (or, for ``partial``, a folder) of kind ``store``, ``head``, ``model``, ``partial``, ``lock``
    or ``temporary``; ``named``: given by the user as such, not found in a folder."""

    kind: str
    path: Path
    named: bool = False

    @property
    def store(self) -> Path | None:
        """The store a partial folder, lock or store temporary belongs to (None for other temporaries)."""
        name = self.path.name
        if self.kind == "partial":
            return self.path.with_name(name[1:-len(".partial")] + ".h5")
        if self.kind == "lock":
            return self.path.with_name(name[1:-len(".lock")] + ".h5")
        if self.kind == "temporary" and name.split(".tmp-")[0].endswith(".h5"):
            return self.path.with_name(name[1:].split(".tmp-")[0])
        return self.path if self.kind == "store" else None


def kind_of(path: Path) -> str | None:
    """What ``path`` is to featurekit (an :class:`Artifact` kind), or None. Opens HDF5 files to read
    their ``format`` attribute."""
    name = path.name
    if name.startswith("."):
        if path.is_dir():
            return "partial" if name.endswith(".partial") else None
        return "lock" if name.endswith(".lock") else "temporary" if ".tmp-" in name else None
    if name == MODEL_FILE:
        return "model" if _json_format(path) == MODEL_FORMAT else None
    if path.suffix.lower() in (".h5", ".hdf5") and path.is_file():
        try:
            with h5py.File(path, "r") as h5:
                return {FORMAT: "store", HEAD_FORMAT: "head"}.get(h5.attrs.get("format"))
        except (OSError, ValueError):  # not HDF5: named, it is described as what it is not
            return None
    return None


def find_artifacts(paths: Sequence[str | os.PathLike], kinds: Sequence[str] = ("store", *CLASSIFIERS),
                   empty_ok: bool = False) -> list[Artifact]:
    """The artifacts of ``kinds`` the paths name: a file as it is (a store, a head file, a model's
    ``model.json``, or a model folder), a folder walked in name order. A path that does not exist, a
    named file featurekit did not write, or (unless ``empty_ok``) a folder holding none of ``kinds``
    is a :class:`DataError`."""
    found: list[Artifact] = []
    for given in map(Path, paths):
        if given.suffix.lower() in (".h5", ".hdf5") and kind_of(given) is None and "store" in kinds:
            found.append(Artifact("store", given, named=True))  # missing or unreadable: the store's reason is told
            continue
        if not given.exists():
            raise DataError(f"{given}: no such file or folder")
        if given.is_dir() and (given / MODEL_FILE).is_file() and "model" in kinds:
            given = given / MODEL_FILE
        if not given.is_dir() or kind_of(given) == "partial":
            kind = kind_of(given)
            if kind is None or kind not in kinds:
                raise DataError(f"{given}: not a featurekit {' or '.join(kinds)}")
            found.append(Artifact(kind, given, named=True))
            continue
        inside = [artifact for artifact in _walk(given) if artifact.kind in kinds]
        if not inside and not empty_ok:
            raise DataError(f"{given}: holds no featurekit {', '.join(kinds)}")
        found += inside
    return found


def _walk(top: Path) -> list[Artifact]:
    found = []
    for folder, folders, files in os.walk(top):
        folders.sort()
        for name in [name for name in folders if name.startswith(".") and name.endswith(".partial")]:
            found.append(Artifact("partial", Path(folder, name)))
            folders.remove(name)  # its chunks belong to it
        for name in sorted(files):
            kind = kind_of(Path(folder, name))
            if kind is not None:
                found.append(Artifact(kind, Path(folder, name)))
    return found


# --------------------------------------------------------------------------- verify and info


@dataclass
class Checked:
    """What :func:`verify_paths` found: a line per artifact (or per problem), and how many have problems."""

    lines: list[str] = field(default_factory=list)
    failed: int = 0
    total: int = 0

    what: str = "stores"

    @property
    def summary(self) -> str:
        return f"featurekit: verify: {self.failed} of {self.total} {self.what} have problems"


def verify_paths(paths: Sequence[str | os.PathLike], data_root: str | os.PathLike | None = None) -> Checked:
    """``featurekit verify``: every store (:func:`~featurekit.store.verify.verify_stores`: complete, sound,
    unedited, current with its images, aligned with its split's other stores), head and fine-tuned model
    (:func:`verify_classifier`) the paths name or hold."""
    artifacts = find_artifacts(paths)
    reports = iter(verify_stores([a.path for a in artifacts if a.kind == "store"], data_root))
    only_stores = all(a.kind == "store" for a in artifacts)
    checked = Checked(total=len(artifacts), what="stores" if only_stores else "stores, heads and models")
    for artifact in artifacts:
        if artifact.kind == "store":
            report = next(reports)
            lines, ok = report.lines(), report.ok
        else:
            problems, state = verify_classifier(artifact.path)
            lines = [f"{artifact.path}: {p}" for p in problems] or [f"{artifact.path}: OK ({state})"]
            ok = not problems
        checked.lines += lines
        checked.failed += not ok
    return checked


def verify_classifier(path: Path) -> tuple[list[str], str]:
    """(problems, what was checked) of a head file or fine-tuned model: it loads (every array, and a
    model's files with the sha256 it records), and the stores a head was trained on, where they still
    are, hold the features it recorded (their fingerprints)."""
    from ..finetuning.artifact import load_classifier  # torch, only to verify

    try:
        classifier = load_classifier(path)
    except FeaturekitError as error:
        return [str(error).removeprefix(f"{path}: ")], ""
    record, problems, found = classifier.record, [], 0
    if isinstance(record, HeadRecord) and record.features_dir:
        for backbone in record.backbones:
            for split, recorded in (backbone.fingerprints or {}).items():
                store = store_path(record.features_dir, split, backbone.store_name)
                if not store.is_file():
                    continue
                found += 1
                try:
                    now = read_header(store).fingerprint
                except StoreError as error:
                    problems.append(f"its {split} store: {error}")
                    continue
                if now != recorded:
                    problems.append(f"its {split} store {store} was made again since it was trained (fingerprint "
                                    f"{recorded[:12]} then, {now[:12]} now): train the head again")
    stores = f"; {found} of its stores checked" if isinstance(record, HeadRecord) else ""
    return problems, f"{record.head} {'head' if isinstance(record, HeadRecord) else 'fine-tuned model'}, " \
                     f"{len(record.classes)} classes, {'+'.join(record.store_names)}{stores}"


def info_paths(paths: Sequence[str | os.PathLike], as_json: bool = False) -> list[str]:
    """``featurekit info``: the lines describing every store, head and fine-tuned model the paths name or hold."""
    return [line for artifact in find_artifacts(paths)
            for line in (describe_store(artifact.path, as_json) if artifact.kind == "store"
                         else describe_classifier(artifact.path, as_json))]


def describe_classifier(path: Path, as_json: bool = False) -> list[str]:
    """Lines on a head file or a fine-tuned model, read from its record alone (no model is loaded)."""
    if path.name == MODEL_FILE:
        values = json.loads(path.read_text())
        kind, extra = "fine-tuned model", values.get("finetune", {})
    else:
        with h5py.File(path, "r") as h5:
            values = json.loads(h5.attrs["metadata"])
        kind, extra = "head", {}
    record = parse(ClassifierRecord, values, str(path))
    if as_json:
        return [json.dumps({"path": str(path), "kind": kind, **values})]
    lines = [f"{path}", f"  {kind} {record.head}: {len(record.classes)} classes: {', '.join(record.classes[:10])}"
             + (" ..." if len(record.classes) > 10 else "")]
    lines += [f"  backbone {b.store_name}: {b.backbone} node {b.node}, weights {b.weights} (sha256 "
              f"{b.weights_sha256[:12]}), {b.feature_dim} features, {b.precision}, {b.dtype}" for b in record.backbones]
    if kind == "head":
        head = parse(HeadRecord, values, str(path))
        accuracy = f", valid accuracy {head.valid_accuracy:.4f}" if head.valid_accuracy is not None else ""
        lines.append(f"  trained on split {head.train_split} of {head.features_dir} (valid: {head.valid_split}"
                     f"{accuracy}), chosen {json.dumps(head.best_params)}, created {head.created}")
    elif extra:
        lines.append(f"  fine-tuned: {json.dumps(extra, sort_keys=True)[:300]}")
    return lines


def _json_format(path: Path) -> str | None:
    try:
        values = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return values.get("format") if isinstance(values, dict) else None
