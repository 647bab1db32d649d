"""Stage 8: classify image files with a trained head, re-extracting their features exactly.

A head records, per backbone, the identity of the features it was trained on
(:meth:`StoreHeader.backbone_record`: backbone, node, weights sha256, preprocessing, decode policy,
precision, dtype, features version) and where the weights came from. Prediction rebuilds each
backbone and runs the :class:`~featurekit.backbones.runner.TrunkRunner` under exactly the recorded decode
policy, precision and storage dtype, then compares the identity it would record with the one the
head recorded: any difference (other weights, preprocessing, node, ...) is refused in one line,
since features from another trunk look like features and give confident, wrong answers. Only
``precision`` may be overridden, on request, and the run's precision is written in the output.

Input: image files and folders, under the rule of :mod:`featurekit.predict.inputs` (a labelled folder
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

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..backbones.rebuild import check_identity, recorded_features
from ..backbones.runner import FileFeatures
from ..backbones.settings import RunSettings
from ..errors import HeadMismatchError, SettingsError
from ..finetuning.artifact import Classifier, load_classifier
from ..heads.train import test_time_proba, valid_features
from ..images.decode import DecodePolicy
from ..store.dataset import store_files
from ..store.format import read_header
from ..store.layout import TEST_TIME
from ..views.augment import ViewPlan
from .inputs import Inputs, collect_inputs

__all__ = ["Predictions", "head_features", "predict_files", "predict_store"]

logger = logging.getLogger(__name__)


@dataclass
class Predictions:
    """``proba``: float64[len(paths), len(classes)], finite; ``paths``: the files' printable names
    (:func:`featurekit.images.printable_path`); ``errors``: (name, reason) of the files left out
    (undecodable, or features or probabilities that are not finite); ``settings``: how the features
    were computed (resolved)."""

    paths: list[str]
    classes: list[str]
    proba: np.ndarray
    errors: list[tuple[str, str]]
    settings: RunSettings
    truth: list[str | None] = dataclasses.field(default_factory=list)  # per row: class folder of a labelled folder
    notices: list[str] = dataclasses.field(default_factory=list)  # what the given folders held and was left out
    labelled_folders: list[str] = dataclasses.field(default_factory=list)  # printable
    tta: str = "none"  # test-time augmentation the probabilities are averaged over
    stores: list[dict] = dataclasses.field(default_factory=list)  # the stores scored (path, fingerprint), if any

    @property
    def predicted(self) -> list[str]:
        return [self.classes[i] for i in self.proba.argmax(axis=1)]


@dataclass
class HeadFeatures:
    """A classifier, and features of image files made as its stores were: ``extracted.features`` holds
    float32[len(extracted.kept), D] per backbone, in the head's order (with test-time views
    ``[len(kept), views, D]``, the plain view first); ``settings`` what ran."""

    classifier: Classifier
    files: list[Path]
    extracted: FileFeatures
    settings: RunSettings
    inputs: Inputs = dataclasses.field(default_factory=Inputs)  # files' true classes, what was left out


def head_features(head: str | os.PathLike | Classifier, paths: str | os.PathLike | Sequence[str | os.PathLike],
                  settings: RunSettings | None = None, weights_paths: Mapping[str, str] | None = None,
                  precision: str | None = None, tta: str = "none") -> HeadFeatures:
    """Features of ``paths`` (files or folders) for ``head``: the rows extract would have stored for
    those files under the head's stores' recorded settings. ``head``: a head file, a fine-tuned model
    (``model.json``: its trunks are then the fine-tuned ones), the folder of either, or a
    :class:`~featurekit.finetuning.artifact.Classifier` already loaded.

    ``settings`` gives the device, batch size and workers; the decode policy, precision and dtype
    are the recorded ones (``precision`` overrides the precision). Undecodable files are reported,
    not raised. ``tta``: also the test-time views of that mode (:class:`HeadFeatures`).
    """
    classifier = head if isinstance(head, Classifier) else load_classifier(head)
    plan = ViewPlan(tta=tta)  # an unknown mode is refused before any image is read
    inputs = collect_inputs([paths] if isinstance(paths, (str, os.PathLike)) else paths, classifier.record.classes)
    extracted, settings = recorded_features(classifier.path, classifier.record.backbones, inputs.files, settings,
                                            weights_paths, precision, plan=plan)
    files = [Path(path) if isinstance(path, str) else Path(name) for path, name in inputs.files]
    return HeadFeatures(classifier, files, extracted, settings, inputs)


def predict_files(head: str | os.PathLike | Classifier, paths: str | os.PathLike | Sequence[str | os.PathLike],
                  settings: RunSettings | None = None, weights_paths: Mapping[str, str] | None = None,
                  precision: str | None = None, tta: str = "none") -> Predictions:
    """Classify image files (or folders of them) with a head; see :func:`head_features`.
    ``tta``: average the class probabilities over that mode's test-time views (flip, five-crop).
    Files whose features (any view) or probabilities are not finite are left out with their reason."""
    made = head_features(head, paths, settings, weights_paths, precision, tta)
    features = np.concatenate(list(made.extracted.features.values()), axis=-1)  # [N, D] or [N, views, D]
    classes, classify = list(made.classifier.record.classes), made.classifier.head
    if not len(features):
        proba = np.zeros((0, len(classes)))
    else:
        proba = test_time_proba(classify, features) if features.ndim == 3 else classify.predict_proba(features)
    finite = np.isfinite(proba).all(axis=1)
    kept, names, errors = made.extracted.kept, [name for _, name in made.inputs.files], list(made.extracted.errors)
    errors += [(names[i], "the classifier gave non-finite probabilities") for i, good in zip(kept, finite) if not good]
    kept, proba = [i for i, good in zip(kept, finite) if good], proba[finite]
    for line in made.inputs.notices:
        logger.info(line)
    for path, reason in errors:
        logger.info(f"skipped {path}: {reason}")
    return Predictions([names[i] for i in kept], classes, proba, errors, made.settings,
                       [made.inputs.truth[i] for i in kept], made.inputs.notices, made.inputs.labelled, tta)


def predict_store(head: str | os.PathLike | Classifier, features_dir: str | os.PathLike, split: str | None,
                  precision: str | None = None, tta: str = "none") -> Predictions:
    """Classify the rows of the stores of ``split`` in ``features_dir`` (extract's ``--out``) with ``head``:
    nothing is re-extracted. Each backbone's store must hold the features the head was trained on, the
    checks of re-extraction (:func:`~featurekit.backbones.rebuild.check_identity`: weights, node,
    preprocessing, decode policy, precision, dtype, features version); ``precision``: the stores' one,
    if not the head's. ``tta``: average over the stores' test-time views of that mode (``extract --tta``).
    Rows of a labelled store give each row's true class, as a labelled folder does."""
    if not split:
        raise SettingsError("--features needs --split: the split of FEATURES to score (e.g. --split test)")
    classifier = head if isinstance(head, Classifier) else load_classifier(head)
    names = classifier.record.store_names
    for record, path in zip(classifier.record.backbones, store_files(features_dir, split, names)):
        header = read_header(path)
        if precision is not None and header.precision != precision:
            raise HeadMismatchError(f"{path}: its features were computed in {header.precision}, not {precision}")
        check_identity(classifier.path, record, header.identity, f"{path} holds", f"{path} (weights {header.weights})",
                       ignore=("precision",) if precision is not None else ())
    rows = valid_features(Path(features_dir), split, names, tta)
    if tta != "none":
        proba = test_time_proba(classifier.head, np.concatenate([rows.features[:, None], rows.views[TEST_TIME]], 1))
    else:
        proba = classifier.head.predict_proba(rows.features)
    truth = [rows.classes[label] for label in rows.labels] if rows.labels is not None else [None] * len(rows)
    known = set(classifier.record.classes)
    notices = [f"{sum(t is not None and t not in known for t in truth)} rows of classes the head does not have are "
               "not scored"] if any(t is not None and t not in known for t in truth) else []
    header = rows.stores[0].header
    settings = RunSettings(device=header.device, precision=header.precision, dtype=header.dtype,
                           decode=DecodePolicy.from_dict(header.decode), progress=False)
    return Predictions(list(rows.paths), list(classifier.record.classes), proba, [], settings,
                       [t if t in known else None for t in truth], notices,
                       [f"{features_dir}/{split}"] if rows.labels is not None else [], tta,
                       [{"path": str(info.path), "fingerprint": info.header.fingerprint} for info in rows.stores])
