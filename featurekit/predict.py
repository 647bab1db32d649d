"""Stage 8: classify image files with a trained head, re-extracting their features exactly.

A head records, per backbone, the identity of the features it was trained on
(:meth:`StoreHeader.backbone_record`: backbone, node, weights sha256, preprocessing, decode policy,
precision, dtype, features version) and where the weights came from. Prediction rebuilds each
backbone and runs the :class:`~featurekit.runner.TrunkRunner` under exactly the recorded decode
policy, precision and storage dtype, then compares the identity it would record with the one the
head recorded: any difference (other weights, preprocessing, node, ...) is refused in one line,
since features from another trunk look like features and give confident, wrong answers. Only
``precision`` may be overridden, on request, and the run's precision is written in the output.

Output: a CSV ``path,predicted,prob_<class>...`` (one probability column per class, in the head's
class order), or with ``--format kaggle`` the dogs-vs-cats submission ``id,label`` (id = file stem,
label = probability of the second class); beside it ``<out>.json`` says how the features were made.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from . import __version__
from .backbones import Backbone, load_backbone
from .errors import FeaturekitError, SettingsError, short
from .files import atomic_output, atomic_write
from .finetune_artifact import FinetunedHead, load_classifier
from .heads import Head
from .images import IMAGE_EXTENSIONS, DataError, DecodePolicy, printable_path
from .runner import FileFeatures, RunSettings, TrunkRunner, store_identity
from .store import StoreIdentity


class HeadMismatchError(FeaturekitError, ValueError):
    """The backbones available now would not make the features the head was trained on."""


@dataclass
class Predictions:
    """``proba``: float64[len(paths), len(classes)]; ``errors``: (path, reason) of undecodable files;
    ``settings``: how the features were computed (resolved)."""

    paths: list[str]
    classes: list[str]
    proba: np.ndarray
    errors: list[tuple[str, str]]
    settings: RunSettings

    @property
    def predicted(self) -> list[str]:
        return [self.classes[i] for i in self.proba.argmax(axis=1)]


def expand_paths(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Files as given; folders searched recursively for image files, in sorted order."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                            and not any(part.startswith(".") for part in p.relative_to(path).parts))
        elif path.is_file():
            found.append(path)
        else:
            raise DataError(f"{path}: no such file or folder")
    if not found:
        raise DataError(f"no image files in {', '.join(map(str, paths))}")
    return found


def recorded_settings(head_path: Path, metadata: dict, base: RunSettings, precision: str | None = None) -> RunSettings:
    """``base`` with the decode policy, precision and storage dtype the head's stores were made with
    (``precision`` overrides the recorded one); one run computes every backbone, so they must agree."""
    identities = [StoreIdentity.from_dict(record) for record in metadata["backbones"]]
    for record, identity in zip(metadata["backbones"][1:], identities[1:]):
        change = identity.difference(identities[0], StoreIdentity.RUN_FIELDS)
        if change:
            raise HeadMismatchError(f"{head_path}: {record['store_name']}'s features were made with other {change} "
                                    "than the first backbone's; one prediction run cannot reproduce both")
    first = identities[0]
    return dataclasses.replace(base, decode=DecodePolicy.from_dict(first.decode), dtype=first.dtype,
                               precision=precision or first.precision)


def check_backbone(head_path: Path, recorded: dict, backbone: Backbone, settings: RunSettings,
                   purpose: str = "predict") -> None:
    """Raise :class:`HeadMismatchError` unless ``backbone`` under ``settings`` makes the features
    ``recorded`` describes (its precision aside: :func:`recorded_settings` decided it); the message
    ends "refusing to ``purpose``"."""
    expected = dataclasses.replace(StoreIdentity.from_dict(recorded), precision=settings.precision)
    found = expected.difference(store_identity(backbone, settings))
    if found and found.field == "weights_sha256":
        raise HeadMismatchError(
            f"{head_path}: {recorded['store_name']} was trained on weights {recorded['weights']} (sha256 "
            f"{found.mine[:16]}) but {backbone.weights.name} from {backbone.weights.source} has sha256 "
            f"{found.theirs[:16]}; refusing to {purpose}")
    if found:
        raise HeadMismatchError(f"{head_path}: {recorded['store_name']} was trained with "
                                f"{found.field.replace('_', ' ')} {short(found.mine)} but this run makes "
                                f"{short(found.theirs)}; refusing to {purpose}")


def head_backbones(head_path: Path, metadata: dict, settings: RunSettings,
                   weights_paths: dict[str, str] | None = None, purpose: str = "predict") -> list[Backbone]:
    """Rebuild the head's backbones, each checked against what the head was trained on.

    Weights loaded from a file during extraction are loaded from the recorded path again, or from
    ``weights_paths[store_name]`` when given.
    """
    backbones = []
    for recorded in metadata["backbones"]:
        override = (weights_paths or {}).get(recorded["store_name"])
        from_file = override or (recorded["weights_source"] if recorded["weights"].startswith("file:") else None)
        backbone = load_backbone(recorded["backbone"], "DEFAULT" if from_file else recorded["weights"], from_file,
                                 recorded["node"])
        check_backbone(head_path, recorded, backbone, settings, purpose)
        backbones.append(backbone)
    return backbones


@dataclass
class HeadFeatures:
    """A head, and features of image files made as its stores were: ``extracted.features`` holds
    float32[len(extracted.kept), D] per backbone, in the head's order; ``settings`` what ran."""

    head: Head | FinetunedHead
    metadata: dict
    files: list[Path]
    extracted: FileFeatures
    settings: RunSettings


def head_features(head_path: str | os.PathLike, paths: Sequence[str | os.PathLike], settings: RunSettings | None = None,
                  weights_paths: dict[str, str] | None = None, precision: str | None = None) -> HeadFeatures:
    """Features of ``paths`` (files or folders) for the head at ``head_path``: the rows extract
    would have stored for those files under the head's stores' recorded settings. ``head_path``
    may also be a fine-tuned model (``model.json`` or its folder): its trunks are the fine-tuned ones.

    ``settings`` gives the device, batch size and workers; the decode policy, precision and dtype
    are the recorded ones (``precision`` overrides the precision). Undecodable files are reported,
    not raised.
    """
    head_path = Path(head_path)
    head, metadata = load_classifier(head_path)
    files = expand_paths(paths)
    base = dataclasses.replace(settings or RunSettings(progress=False), on_error="skip")
    settings = recorded_settings(head_path, metadata, base, precision).resolved()
    backbones = head_backbones(head_path, metadata, settings, weights_paths)
    extracted = TrunkRunner(backbones, settings).embed([(str(f), printable_path(str(f))) for f in files], "predict")
    extracted.features = {b.store_name: extracted.features[b.store_name] for b in backbones}
    return HeadFeatures(head, metadata, files, extracted, settings)


def predict_files(head_path: str | os.PathLike, paths: Sequence[str | os.PathLike], settings: RunSettings | None = None,
                  weights_paths: dict[str, str] | None = None, precision: str | None = None) -> Predictions:
    """Classify image files (or folders of them) with a head file; see :func:`head_features`."""
    made = head_features(head_path, paths, settings, weights_paths, precision)
    features = np.concatenate(list(made.extracted.features.values()), axis=1)
    classes = list(made.metadata["classes"])
    proba = made.head.predict_proba(features) if len(features) else np.zeros((0, len(classes)))
    return Predictions([str(made.files[i]) for i in made.extracted.kept], classes, proba, made.extracted.errors,
                       made.settings)


def write_predictions(predictions: Predictions, out: Path, head_path: Path, form: str = "csv",
                      topk: int | None = None, class_names: dict[str, str] | None = None) -> list[Path]:
    """Write the CSV (``form`` csv or kaggle) and ``<out>.json`` (how the features were made), atomically.

    csv: ``path,predicted,prob_<class>...``; with ``topk`` K: ``path,predicted,class_1,prob_1,...,
    class_K,prob_K``, the K likeliest classes. ``class_names`` maps class folder names to the names
    written in ``predicted`` and ``class_i`` (``prob_<class>`` columns keep the folder names)."""
    if form not in ("csv", "kaggle"):
        raise SettingsError(f"unknown format {form!r} (csv or kaggle)")
    if topk is not None and (form != "csv" or topk < 1):
        raise SettingsError("--topk takes a number of classes of at least 1, with --format csv")
    if class_names is not None and not any(c in class_names for c in predictions.classes):
        raise SettingsError(f"the class names given name none of the classes {', '.join(predictions.classes[:5])}, ...")
    shown = [(class_names or {}).get(c, c) for c in predictions.classes]
    if form == "kaggle":
        header, rows = ["id", "label"], _kaggle_rows(predictions)
    elif topk:
        k = min(topk, len(shown))
        header = ["path", "predicted", *(f"{kind}_{i}" for i in range(1, k + 1) for kind in ("class", "prob"))]
        rows = [[path, shown[order[0]], *(value for j in order for value in (shown[j], f"{row[j]:.6g}"))]
                for path, row in zip(predictions.paths, predictions.proba) for order in [np.argsort(-row)[:k]]]
    else:
        header = ["path", "predicted", *(f"prob_{c}" for c in predictions.classes)]
        rows = [[path, shown[row.argmax()], *(f"{p:.6g}" for p in row)]
                for path, row in zip(predictions.paths, predictions.proba)]
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(out) as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([spreadsheet_safe(cell) for cell in header])
        writer.writerows([spreadsheet_safe(cell) for cell in row] for row in rows)
    settings = predictions.settings
    about = {"head": str(head_path), "rows": len(predictions.paths), "format": form, "device": settings.device,
             "precision": settings.precision, "dtype": settings.dtype, "decode": settings.decode.to_dict(),
             "skipped": [{"path": p, "reason": r} for p, r in predictions.errors], "featurekit": __version__}
    meta = atomic_write(out.with_name(out.name + ".json"), json.dumps(about, indent=2) + "\n")
    return [out, meta]


def spreadsheet_safe(cell: str) -> str:
    """A CSV cell a spreadsheet will not run as a formula: one starting with ``= + - @`` or a tab or
    carriage return (a file or class named ``=HYPERLINK(...)``) gets a leading ``'`` (OWASP's advice)."""
    return f"'{cell}" if cell[:1] in ("=", "+", "-", "@", "\t", "\r") else cell


def read_class_names(path: str | os.PathLike) -> dict[str, str]:
    """A JSON object mapping class folder names to readable names (seed 002's ``cat_to_name.json``);
    classes it leaves out keep their folder name. One line if it is not such an object."""
    try:
        names = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise SettingsError(f"{path}: not a readable JSON file of class names ({error})") from None
    if not isinstance(names, dict):
        raise SettingsError(f"{path}: not a JSON object of class name -> readable name")
    return {str(key): str(value) for key, value in names.items()}


def _kaggle_rows(predictions: Predictions) -> list[tuple[str, str]]:
    if len(predictions.classes) != 2:
        raise SettingsError(f"--format kaggle needs a two-class head; this one has {len(predictions.classes)} classes")
    rows = [(Path(path).stem, f"{p:.6g}") for path, p in zip(predictions.paths, predictions.proba[:, 1])]
    numeric = all(stem.isdigit() for stem, _ in rows)
    return sorted(rows, key=lambda row: (int(row[0]) if numeric else 0, row[0]))
