"""Stage 8: classify image files with a trained head, re-extracting their features exactly.

A head records, per backbone, the identity of the features it was trained on
(:meth:`StoreHeader.backbone_record`: backbone, node, weights sha256, preprocessing, decode policy,
precision, dtype, features version) and where the weights came from. Prediction rebuilds each
backbone and runs the :class:`~featurekit.runner.TrunkRunner` under exactly the recorded decode
policy, precision and storage dtype, then compares the identity it would record with the one the
head recorded: any difference (other weights, preprocessing, node, ...) is refused in one line,
since features from another trunk look like features and give confident, wrong answers. Only
``precision`` may be overridden, on request, and the run's precision is written in the output.

Input: image files and folders, under the rule of :mod:`featurekit.inputs` (a labelled folder
``<class>/<image>`` gives each image's true class). Output: a CSV ``path,predicted,prob_<class>...``
(one probability column per class, in the head's class order), with ``topk`` the K likeliest classes
instead, or with ``--format kaggle`` the dogs-vs-cats submission ``id,label`` (id = file stem, label
= probability of the second class); beside it ``<out>.json`` says how the features were made.
With test-time augmentation (``tta``: ``flip``, ``five-crop``; :func:`augment.tta_views`) each
image's class probabilities are averaged over its test-time views, cut from its one decode and
run through the same trunk runner.

The classifier: a head file of ``train-head`` or a fine-tuned model of ``finetune`` (its
``model.json``: the trunks are then the fine-tuned ones), or the folder either wrote
(:func:`find_head_file`); both record their backbones alike, so the same checks apply.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, TextIO

import numpy as np

from . import __version__
from .augment import ViewPlan
from .backbones import Backbone, load_backbone
from .errors import FeaturekitError, SettingsError, short
from .files import atomic_output, atomic_write
from .finetune_artifact import MODEL_FILE, FinetunedHead, load_model
from .head_file import HEAD_FILE, OLD_HEAD_FILE, HeadFileError, load_head
from .heads import Head
from .images import DecodePolicy
from .inputs import Inputs, collect_inputs
from .runner import FileFeatures, RunSettings, TrunkRunner, store_identity
from .store import StoreIdentity
from .train import test_time_proba


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
    truth: list[str | None] = dataclasses.field(default_factory=list)  # per row: class folder of a labelled folder
    notices: list[str] = dataclasses.field(default_factory=list)  # what the given folders held and was left out
    labelled_folders: list[str] = dataclasses.field(default_factory=list)  # printable
    tta: str = "none"  # test-time augmentation the probabilities are averaged over

    @property
    def predicted(self) -> list[str]:
        return [self.classes[i] for i in self.proba.argmax(axis=1)]


HEAD_FILES = (HEAD_FILE, MODEL_FILE)  # what train-head and finetune write into their --out folder


def find_head_file(path: str | os.PathLike) -> Path:
    """The file ``path`` names: the file itself, or the one of :data:`HEAD_FILES` in a folder that
    train-head (``head.h5``) or finetune (``model.json``) wrote; a folder holding both is
    refused, since either could be meant. A folder holding only an old pickle head (``head.joblib``)
    gives that file, which :func:`~featurekit.head_file.load_head` refuses, saying how to convert it."""
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


def load_classifier(path: Path) -> tuple[Head | FinetunedHead, dict]:
    """A head file (train-head's ``head.h5``) or a fine-tuned model (finetune's ``model.json``:
    told by its ``.json`` suffix), as :func:`find_head_file` found it."""
    return load_model(path) if path.suffix == ".json" else load_head(path)


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
    # the plain rows' identity: views stored beside them (augmented, test-time) do not change them
    expected = dataclasses.replace(StoreIdentity.from_dict(recorded).without_views(), precision=settings.precision)
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
    float32[len(extracted.kept), D] per backbone, in the head's order (with test-time views
    ``[len(kept), views, D]``, the plain view first); ``settings`` what ran."""

    head: Head | FinetunedHead
    metadata: dict
    files: list[Path]
    extracted: FileFeatures
    settings: RunSettings
    inputs: Inputs = dataclasses.field(default_factory=Inputs)  # files' true classes, what was left out


def head_features(head_path: str | os.PathLike, paths: Sequence[str | os.PathLike], settings: RunSettings | None = None,
                  weights_paths: dict[str, str] | None = None, precision: str | None = None,
                  tta: str = "none", loaded: tuple[Head | FinetunedHead, dict] | None = None) -> HeadFeatures:
    """Features of ``paths`` (files or folders) for the head at ``head_path``: the rows extract
    would have stored for those files under the head's stores' recorded settings. ``head_path``
    may also be a fine-tuned model (``model.json`` or its folder): its trunks are the fine-tuned ones.

    ``settings`` gives the device, batch size and workers; the decode policy, precision and dtype
    are the recorded ones (``precision`` overrides the precision). Undecodable files are reported,
    not raised. ``tta``: also the test-time views of that mode (:class:`HeadFeatures`). ``loaded``:
    what :func:`load_classifier` already returned for ``head_path``, so it is not read (and a
    fine-tuned model's files hashed) a second time.
    """
    head_path = find_head_file(head_path)
    head, metadata = loaded or load_classifier(head_path)
    plan = ViewPlan(tta=tta)  # an unknown mode is refused before any image is read
    inputs = collect_inputs(paths, metadata["classes"])
    extracted, settings = recorded_features(head_path, metadata, inputs.files, settings, weights_paths, precision,
                                            plan=plan)
    return HeadFeatures(head, metadata, [Path(path) for path, _ in inputs.files], extracted, settings, inputs)


def recorded_features(source: Path, metadata: dict, files: Sequence[tuple[str, str]],
                      settings: RunSettings | None = None, weights_paths: dict[str, str] | None = None,
                      precision: str | None = None, label: str = "predict", plan: ViewPlan | None = None,
                      ) -> tuple[FileFeatures, RunSettings]:
    """Features of ``files`` ((OS path, name) pairs) as the stores ``metadata["backbones"]`` records
    describe would hold them (``source``: the head or store those records come from, for messages),
    and the resolved settings that made them; with a ``plan`` of several views, ``[N, views, D]``.
    Undecodable files are reported, not raised."""
    base = dataclasses.replace(settings or RunSettings(progress=False), on_error="skip")
    settings = recorded_settings(source, metadata, base, precision).resolved()
    if plan is not None and plan.count > 1 and settings.decode.backend != "pil":
        raise HeadMismatchError(f"{source}: its stores were decoded with {settings.decode.backend} (nvJPEG) and "
                                f"{plan.describe()} are cut from PIL-decoded images; extract with --decoder pil")
    backbones = head_backbones(source, metadata, settings, weights_paths)
    extracted = TrunkRunner(backbones, settings).embed(files, label, plan)
    extracted.features = {b.store_name: extracted.features[b.store_name] for b in backbones}
    return extracted, settings


def predict_files(head_path: str | os.PathLike, paths: Sequence[str | os.PathLike], settings: RunSettings | None = None,
                  weights_paths: dict[str, str] | None = None, precision: str | None = None,
                  tta: str = "none", loaded: tuple[Head | FinetunedHead, dict] | None = None) -> Predictions:
    """Classify image files (or folders of them) with a head file; see :func:`head_features`.
    ``tta``: average the class probabilities over that mode's test-time views (flip, five-crop)."""
    made = head_features(head_path, paths, settings, weights_paths, precision, tta, loaded)
    features = np.concatenate(list(made.extracted.features.values()), axis=-1)  # [N, D] or [N, views, D]
    classes = list(made.metadata["classes"])
    if not len(features):
        proba = np.zeros((0, len(classes)))
    else:
        proba = test_time_proba(made.head, features) if features.ndim == 3 else made.head.predict_proba(features)
    kept = made.extracted.kept
    return Predictions([str(made.files[i]) for i in kept], classes, proba, made.extracted.errors, made.settings,
                       [made.inputs.truth[i] for i in kept], made.inputs.notices, made.inputs.labelled, tta)


FORMS = ("csv", "kaggle")


def check_output(classes: Sequence[str], form: str = "csv", topk: int | None = None,
                 class_names: dict[str, str] | None = None) -> None:
    """Refuse an output that a head of ``classes`` cannot fill, before any image is read."""
    if form not in FORMS:
        raise SettingsError(f"unknown format {form!r} (csv or kaggle)")
    if form == "kaggle" and len(classes) != 2:
        raise SettingsError(f"--format kaggle needs a two-class head; this one has {len(classes)} classes "
                            f"({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''})")
    if topk is not None and form == "kaggle":
        raise SettingsError("--topk chooses csv columns; --format kaggle has a fixed id,label form")
    if topk is not None and not 1 <= topk <= len(classes):
        raise SettingsError(f"--topk {topk}: the head has {len(classes)} classes (give 1 to {len(classes)})")
    if class_names is not None and form == "kaggle":
        raise SettingsError("--class-names names classes in csv columns; --format kaggle has none")
    if class_names is not None and not any(c in class_names for c in classes):
        raise SettingsError(f"the class names given name none of the head's classes ({', '.join(classes[:5])}"
                            f"{', ...' if len(classes) > 5 else ''})")


def prediction_table(predictions: Predictions, form: str = "csv", topk: int | None = None,
                     class_names: dict[str, str] | None = None) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the output: ``path,predicted,prob_<class>...`` in the head's class order;
    with ``topk`` ``path,predicted,top1,top1_prob,...`` (the K likeliest classes, likeliest first);
    kaggle ``id,label``. ``class_names`` (:func:`read_class_names`) maps class folder names to the
    names written in ``predicted`` and ``topI`` (``prob_<class>`` headers keep the folder names, as
    the head has them). Every cell is :func:`spreadsheet_safe`."""
    check_output(predictions.classes, form, topk, class_names)
    shown = [(class_names or {}).get(c, c) for c in predictions.classes]
    best = predictions.proba.argmax(axis=1)
    if form == "kaggle":
        header, rows = ["id", "label"], [list(row) for row in _kaggle_rows(predictions)]
    elif topk:
        header = ["path", "predicted", *(f"top{i}{part}" for i in range(1, topk + 1) for part in ("", "_prob"))]
        order = np.argsort(-predictions.proba, axis=1, kind="stable")[:, :topk]
        rows = [[path, shown[first], *(cell for c in likeliest for cell in (shown[c], f"{proba[c]:.6g}"))]
                for path, first, likeliest, proba in zip(predictions.paths, best, order, predictions.proba)]
    else:
        header = ["path", "predicted", *(f"prob_{c}" for c in predictions.classes)]
        rows = [[path, shown[first], *(f"{p:.6g}" for p in row)]
                for path, first, row in zip(predictions.paths, best, predictions.proba)]
    return [spreadsheet_safe(c) for c in header], [[spreadsheet_safe(c) for c in row] for row in rows]


def write_predictions(predictions: Predictions, out: Path | TextIO, head_path: Path, form: str = "csv",
                      topk: int | None = None, class_names: dict[str, str] | None = None) -> list[Path]:
    """Write the table of :func:`prediction_table` and ``<out>.json`` (how the features were made),
    atomically; returns the files written. ``out`` a text stream (stdout): the CSV alone, no ``.json``."""
    header, rows = prediction_table(predictions, form, topk, class_names)
    if not isinstance(out, (str, os.PathLike)):
        _write_csv(out, header, rows)
        return []
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(out) as temporary, open(temporary, "w", newline="") as handle:
        _write_csv(handle, header, rows)
    settings = predictions.settings
    about = {"head": str(head_path), "rows": len(predictions.paths), "format": form, "topk": topk,
             "class_names": class_names, "tta": predictions.tta,
             "device": settings.device, "precision": settings.precision, "dtype": settings.dtype,
             "decode": settings.decode.to_dict(), "skipped": [{"path": p, "reason": r} for p, r in predictions.errors],
             "featurekit": __version__}
    meta = atomic_write(out.with_name(out.name + ".json"), json.dumps(about, indent=2) + "\n")
    return [out, meta]


def _write_csv(handle: TextIO, header: list[str], rows: list[list[str]]) -> None:
    writer = csv.writer(handle)
    writer.writerow(header)
    writer.writerows(rows)


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
    rows = [(Path(path).stem, f"{p:.6g}") for path, p in zip(predictions.paths, predictions.proba[:, 1])]
    numeric = all(stem.isdigit() for stem, _ in rows)
    return sorted(rows, key=lambda row: (int(row[0]) if numeric else 0, row[0]))
