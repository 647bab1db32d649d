"""``featurekit predict``: classify image files with a trained head, re-extracting their features.

The head file records, per backbone, the node, weights name and sha256, preprocessing and decode
policy its training features were made with. Prediction rebuilds each backbone the same way and
refuses, in one line, when the weights' sha256, the preprocessing or the node differ: features from
other weights look like features and give confident, wrong answers. The recorded decode policy is
reused as is.

Output is a CSV: ``path,predicted,prob_<class>...`` (one probability column per class, in the
head's class order), or with ``--format kaggle`` the dogs-vs-cats submission ``id,label``
(id = file stem, label = probability of the second class).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .backbones import Backbone, load_backbone
from .extract import ExtractSettings, features_for_files
from .heads import load_head
from .images import IMAGE_EXTENSIONS, DecodePolicy


class HeadMismatchError(ValueError):
    """The backbones available now would not make the features the head was trained on."""


@dataclass
class Predictions:
    """``proba``: float64[len(paths), len(classes)]; ``errors``: (path, reason) of undecodable files."""

    paths: list[str]
    classes: list[str]
    proba: np.ndarray
    errors: list[tuple[str, str]]

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
            raise FileNotFoundError(f"{path}: no such file or folder")
    if not found:
        raise ValueError(f"no image files in {', '.join(map(str, paths))}")
    return found


def _comparable(value) -> str:
    return json.dumps(value, sort_keys=True)  # tuples and lists (JSON round trip) compare equal


def check_backbone(head_path: Path, recorded: dict, backbone: Backbone) -> None:
    """Raise :class:`HeadMismatchError` unless ``backbone`` makes the features ``recorded`` describes."""
    name = recorded["store_name"]
    if backbone.weights.sha256 != recorded["weights_sha256"]:
        raise HeadMismatchError(
            f"{head_path}: {name} was trained on weights {recorded['weights']} (sha256 {recorded['weights_sha256'][:16]}) "
            f"but {backbone.weights.name} from {backbone.weights.source} has sha256 {backbone.weights.sha256[:16]}; refusing to predict")
    for key, now in (("preprocessing", backbone.preprocessing.to_dict()), ("node", backbone.node), ("feature_dim", backbone.feature_dim)):
        if _comparable(now) != _comparable(recorded[key]):
            raise HeadMismatchError(f"{head_path}: {name} was trained with {key} {_comparable(recorded[key])} "
                                    f"but this featurekit makes {_comparable(now)}; refusing to predict")


def head_backbones(head_path: Path, metadata: dict, weights_paths: dict[str, str] | None = None) -> list[Backbone]:
    """Rebuild the head's backbones, each checked against what the head was trained on.

    Weights loaded from a file during extraction are loaded from the recorded path again, or from
    ``weights_paths[store_name]`` when given.
    """
    backbones = []
    for recorded in metadata["backbones"]:
        override = (weights_paths or {}).get(recorded["store_name"])
        from_file = override or (recorded["weights_source"] if recorded["weights"].startswith("file:") else None)
        backbone = load_backbone(recorded["backbone"], "DEFAULT" if from_file else recorded["weights"], from_file, recorded["node"])
        check_backbone(head_path, recorded, backbone)
        backbones.append(backbone)
    return backbones


def recorded_decode(head_path: Path, metadata: dict) -> DecodePolicy:
    """The decode policy of the training features; one extraction decodes once for all backbones."""
    policies = {_comparable(b["decode"]) for b in metadata["backbones"]}
    if len(policies) > 1:
        raise HeadMismatchError(f"{head_path}: its backbones' features were decoded under different policies "
                                f"({' vs '.join(sorted(policies))}); predict decodes each image once")
    return DecodePolicy(**metadata["backbones"][0]["decode"])


def predict_files(head_path: str | os.PathLike, paths: Sequence[str | os.PathLike], settings: ExtractSettings | None = None,
                  weights_paths: dict[str, str] | None = None) -> Predictions:
    """Extract features of ``paths`` (files or folders) with the head's backbones and classify them."""
    head_path = Path(head_path)
    head, metadata = load_head(head_path)
    files = expand_paths(paths)
    backbones = head_backbones(head_path, metadata, weights_paths)
    settings = dataclasses.replace(settings or ExtractSettings(progress=False), decode=recorded_decode(head_path, metadata))
    extracted = features_for_files(files, backbones, settings)
    features = np.concatenate([extracted.features[b.store_name] for b in backbones], axis=1)
    proba = head.predict_proba(features) if len(features) else np.zeros((0, len(metadata["classes"])))
    return Predictions([str(files[i]) for i in extracted.kept], list(metadata["classes"]), proba, extracted.errors)


def write_csv(predictions: Predictions, out: Path, form: str = "csv") -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as handle:
        writer = csv.writer(handle)
        if form == "kaggle":
            writer.writerow(["id", "label"])
            writer.writerows(_kaggle_rows(predictions))
        else:
            writer.writerow(["path", "predicted", *(f"prob_{name}" for name in predictions.classes)])
            for path, name, row in zip(predictions.paths, predictions.predicted, predictions.proba):
                writer.writerow([path, name, *(f"{p:.6g}" for p in row)])
    return out


def _kaggle_rows(predictions: Predictions) -> list[tuple[str, str]]:
    if len(predictions.classes) != 2:
        raise ValueError(f"--format kaggle needs a two-class head; this one has {len(predictions.classes)} classes")
    rows = [(Path(path).stem, f"{p:.6g}") for path, p in zip(predictions.paths, predictions.proba[:, 1])]
    numeric = all(stem.isdigit() for stem, _ in rows)
    return sorted(rows, key=lambda row: (int(row[0]) if numeric else 0, row[0]))


# --------------------------------------------------------------------------- command line


def _weights_paths(pairs: Sequence[str]) -> dict[str, str]:
    bad = [pair for pair in pairs if "=" not in pair]
    if bad:
        raise ValueError(f"--weights-path expects STORE=FILE, got {bad[0]!r}")
    return dict(pair.split("=", 1) for pair in pairs)


def run(args: argparse.Namespace) -> int:
    settings = ExtractSettings(device=args.device, batch_size=args.batch_size, num_workers=args.workers, progress=False)
    predictions = predict_files(args.head, args.paths, settings, _weights_paths(args.weights_path))
    for path, reason in predictions.errors:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    if not predictions.paths:
        raise ValueError(f"none of the {len(predictions.errors)} files could be decoded")
    write_csv(predictions, args.out, args.format)
    print(f"{len(predictions.paths)} predictions written to {args.out}"
          + (f" ({len(predictions.errors)} files skipped)" if predictions.errors else ""))
    return 0
