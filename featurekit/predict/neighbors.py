"""``featurekit neighbors``: the training images nearest to query images, and a contact sheet of them.

Queries are image files (their features made exactly as the stores' rows were, as predict makes
them) or, given a head, the validation images it misclassifies, worst first (lowest probability of
the true class). Nearness is the cosine similarity of features standardised with the training
split's mean and std, as the kNN head compares them. The contact sheet shows one query per row,
then its nearest training images, each framed green when its class is the query's (true, else
predicted) class and red otherwise; thumbnails are decoded by :func:`featurekit.images.decode_image`
under the stores' recorded decode policy.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from sklearn.preprocessing import StandardScaler

from ..backbones.rebuild import check_identity, recorded_features
from ..backbones.settings import RunSettings
from ..errors import SettingsError
from ..files import check_output
from ..finetuning.artifact import Classifier, load_classifier
from ..heads.knn import similarity_rows
from ..heads.nearest import top_k
from ..images import sheets
from ..images.decode import DecodePolicy
from ..images.names import fs_path
from ..images.sheets import Cell, SheetRow
from ..store.dataset import FeatureSet, check_same_extraction, load_features
from ..store.format import RANDOM, BackboneRecord, read_header, store_path, warn_random
from .inputs import collect_inputs
from .settings import NeighborsSettings

__all__ = ["CAPTION", "Gallery", "neighbors_report", "search"]

NEIGHBORS = NeighborsSettings()

logger = logging.getLogger(__name__)

CAPTION = 2 * sheets.LINE  # two caption lines under each thumbnail (of THUMB pixels)


@dataclass(frozen=True)
class Neighbour:
    """A training image: ``name`` ``<split>/<path as stored>``, ``file`` its OS path."""

    name: str
    file: str
    label: str
    similarity: float


@dataclass
class Query:
    """A query image (``name`` printable, ``file`` its OS path) and its nearest training images,
    nearest first; ``truth`` from a labelled folder or a validation store, ``predicted`` and
    ``probability`` from a head, ``truth_probability`` the head's probability of ``truth``."""

    name: str
    file: str
    neighbours: list[Neighbour] = field(default_factory=list)
    truth: str | None = None
    predicted: str | None = None
    probability: float | None = None
    truth_probability: float | None = None


class Gallery:
    """The training rows searched, as the kNN head compares them: ``train.features`` float32[N, D]
    standardised with ``scaler`` (the head's, or one fitted on these rows; None: as extracted), unit rows."""

    def __init__(self, train: FeatureSet, scaler: StandardScaler | None | str = "fit"):
        self.train = train
        self.scaler = StandardScaler().fit(train.features) if isinstance(scaler, str) else scaler
        header = train.stores[0].header
        self.split_dir = Path(fs_path(header.data_root)) / fs_path(train.split)
        self.decode = DecodePolicy.from_dict(header.decode)

    def _unit(self, features: np.ndarray) -> np.ndarray:
        return similarity_rows(features, self.scaler)

    def nearest(self, features: np.ndarray, k: int) -> list[list[Neighbour]]:
        """The ``k`` training images nearest to each row of ``features`` float32[Q, D], nearest first
        (the one search of the kNN head and the audit, :func:`~featurekit.heads.nearest.top_k`)."""
        if not len(features):  # StandardScaler refuses 0 rows
            return []
        found = top_k(features, self.train.features, k, self._unit, precision="fp64")  # as the kNN head
        train = self.train
        return [[Neighbour(f"{train.split}/{train.paths[i]}", str(self.split_dir / fs_path(train.paths[i])),
                           train.classes[train.labels[i]], float(s)) for i, s in zip(row, sims) if i >= 0]
                for row, sims in zip(found.idx, found.sim)]


def check_stores(classifier: Classifier, features: FeatureSet) -> None:
    """Refuse stores whose features are not those ``classifier`` records (:func:`check_identity`, as
    predict checks them): neighbours in another feature space mean nothing."""
    for record, info in zip(classifier.record.backbones, features.stores):
        check_identity(classifier.path, record, info.header.identity, f"{info.path} holds",
                       f"{info.path} (weights {info.header.weights})", "search it")


def store_records(train: FeatureSet) -> list[BackboneRecord]:
    """What a head would record about ``train``'s stores: enough to make their rows for new images."""
    return [info.header.backbone_record(info.store_name) for info in train.stores]


@dataclass
class Search:
    """The queries of one search, each with its nearest training images; ``summary``: one line on it;
    ``about``: where the neighbours were searched (for the JSON); ``stores``: the store names searched."""

    queries: list[Query]
    summary: str
    about: dict
    gallery: Gallery
    stores: list[str]
    inputs: list[Path] = field(default_factory=list)  # what the search read: no output may replace it


def search(head: str | os.PathLike | Classifier | None = None, features_dir: str | os.PathLike | None = None,
           backbones: Sequence[str] | None = None, images: Sequence[str | os.PathLike] | None = None,
           split: str | None = None, valid_split: str | None = None, k: int = 5,
           settings: RunSettings | None = None, trust_paths: bool = False) -> Search:
    """The training images nearest to ``images`` (files or folders), or without ``images`` to the
    validation images ``head`` misclassifies, worst first. Searched: the stores ``head`` was trained
    on (``features_dir``, its ``split``), or without a head the ``backbones`` in ``features_dir``; a
    head's stores must hold the features it records (:func:`check_stores`).
    ``trust_paths``: a fine-tuned model may name files outside its folder."""
    if k < 1:
        raise SettingsError(f"-k must be at least 1 (got {k})")
    if settings is not None:
        settings.resolved()  # a device that cannot work is refused before any work, whether or not images run
    classifier = head if isinstance(head, Classifier) or head is None else load_classifier(head, trust_paths)
    if classifier is None and not (features_dir and backbones and images):
        raise SettingsError("give --head HEAD (its mistakes, or --image), or --features DIR --backbone NAME --image "
                            "PATH")
    if classifier is not None and backbones:
        raise SettingsError("--backbone: a head searches the stores it was trained on; leave --backbone out")
    record = classifier.record if classifier else None
    features_dir = features_dir or getattr(record, "features_dir", None)
    if not features_dir:
        raise SettingsError(f"{classifier.path}: records no features folder (a fine-tuned model); give --features: "
                            "a folder of stores extracted with its trunks (extract --weights-path "
                            "STORE=MODEL/trunks/STORE.pt)")
    features_dir = Path(features_dir)
    stores = list(backbones or record.store_names)
    split = split or getattr(record, "train_split", "train")
    searched = load_features(features_dir, split, stores)
    if searched.labels is None:
        raise SettingsError(f"{searched.stores[0].path}: an unlabelled split; neighbours are shown with their classes: "
                            "search a labelled split (--split)")
    if classifier is not None:
        check_stores(classifier, searched)
    gallery = Gallery(searched, getattr(classifier.head, "scaler_", "fit") if classifier else "fit")
    warn_random([info.store_name for info in gallery.train.stores if info.header.weights == RANDOM])
    about = {"features_dir": str(features_dir), "stores": stores, "split": split,
             "head": str(classifier.path) if classifier else ""}
    if images:
        queries = image_queries(gallery, images, k, classifier, settings)
        summary = f"{len(queries)} query images, {k} nearest of {len(gallery.train)} {split} images each"
    else:
        valid_split = valid_split or getattr(record, "valid_split", None)
        if not valid_split:
            raise SettingsError(f"{classifier.path}: trained without a validation split; give --valid-split or "
                                "--image")
        queries, scored = misclassified_queries(gallery, classifier, features_dir, valid_split, k)
        summary = (f"{len(queries)} of {scored} {valid_split} images misclassified, worst first, each with its "
                   f"{k} nearest {split} images")
    searched = [info.path for info in gallery.train.stores] + [
        store_path(features_dir, valid_split, name) for name in stores if not images]
    inputs = [*(classifier.inputs() if classifier else []), *searched, *(images or []),
              *{Path(fs_path(read_header(path).data_root)) / fs_path(read_header(path).split) for path in searched}]
    return Search(queries, summary, about, gallery, stores, inputs)


def write_sheet(found: Search, path: str | os.PathLike, worst: int = 16) -> Path:
    """The contact sheet of ``found``'s first ``worst`` queries (:func:`contact_sheet`)."""
    if worst < 1:
        raise SettingsError(f"--worst must be at least 1 (got {worst})")
    check_output(path, found.inputs, flag="--sheet")
    shown = found.queries[:worst]
    title = f"{', '.join(found.stores)}: {found.summary}" + (f" (first {len(shown)})" if len(shown) < len(
        found.queries) else "")
    return contact_sheet(shown, Path(path), found.gallery.decode, title)


def image_queries(gallery: Gallery, paths: Sequence[str | os.PathLike], k: int, classifier: Classifier | None = None,
                  settings: RunSettings | None = None) -> list[Query]:
    """Queries for image files and folders (the rule of :mod:`featurekit.predict.inputs`), with the
    ``classifier``'s predictions when given. What the folders held and was left out, and each
    undecodable file, are logged."""
    classes = classifier.record.classes if classifier else gallery.train.classes
    inputs = collect_inputs(paths, classes)
    source = classifier.path if classifier else gallery.train.stores[0].path
    records = classifier.record.backbones if classifier else store_records(gallery.train)
    extracted, _ = recorded_features(source, records, inputs.files, settings, label="neighbors")
    features = np.concatenate(list(extracted.features.values()), axis=1)
    queries = [Query(inputs.files[i][1], inputs.files[i][0], truth=inputs.truth[i]) for i in extracted.kept]
    if classifier is not None and len(features):
        _predict(queries, classifier.head.predict_proba(features), classes)
    for query, neighbours in zip(queries, gallery.nearest(features, k)):
        query.neighbours = neighbours
    for line in inputs.notices + [f"skipped {name}: {reason}" for name, reason in extracted.errors]:
        logger.info(line)
    return queries


def misclassified_queries(gallery: Gallery, classifier: Classifier, features_dir: Path, valid_split: str,
                          k: int) -> tuple[list[Query], int]:
    """The validation images ``classifier`` gets wrong, worst first; returns (queries, validation rows scored)."""
    classes = classifier.record.classes
    valid = load_features(features_dir, valid_split, classifier.record.store_names)
    if valid.labels is None:
        raise SettingsError(f"{valid.stores[0].path}: an unlabelled split has no mistakes to show; give --image")
    check_same_extraction(gallery.train, valid)
    check_stores(classifier, valid)
    names = [valid.classes[label] for label in valid.labels]
    scored = [i for i, name in enumerate(names) if name in classes]
    if not scored:
        raise SettingsError(f"split {valid_split!r}: no image of a class the head knows ({', '.join(valid.classes)})")
    valid_dir = Path(fs_path(valid.stores[0].header.data_root)) / fs_path(valid_split)
    queries = [Query(f"{valid_split}/{valid.paths[i]}", str(valid_dir / fs_path(valid.paths[i])), truth=names[i])
               for i in scored]
    features = valid.features[scored]
    _predict(queries, classifier.head.predict_proba(features), classes)
    order = sorted((j for j, q in enumerate(queries) if q.predicted != q.truth),
                   key=lambda j: queries[j].truth_probability)
    wrong = [queries[j] for j in order]
    for query, neighbours in zip(wrong, gallery.nearest(features[order], k)):
        query.neighbours = neighbours
    return wrong, len(scored)


def _predict(queries: list[Query], proba: np.ndarray, classes: Sequence[str]) -> None:
    for query, row in zip(queries, proba):
        query.predicted, query.probability = classes[int(row.argmax())], float(row.max())
        if query.truth in classes:
            query.truth_probability = float(row[list(classes).index(query.truth)])


# --------------------------------------------------------------------------- output


def describe_query(query: Query) -> list[str]:
    """One line for the query, then one per neighbour."""
    said = [f"true {query.truth}"] if query.truth else []
    if query.predicted is not None:
        said.append(f"predicted {query.predicted} ({query.probability:.3f}"
                    + (f"; {query.truth} {query.truth_probability:.3f})" if query.truth_probability is not None
                       and query.predicted != query.truth else ")"))
    lines = [f"{query.name}" + (f": {', '.join(said)}" if said else "")]
    lines += [f"  {rank}. {n.similarity:.3f} {n.label}  {n.name}" for rank, n in enumerate(query.neighbours, 1)]
    return lines


def queries_json(queries: Sequence[Query], about: dict) -> str:
    """``{"neighbors_version": 1, **about, "queries": [...]}`` as one line of JSON."""
    return json.dumps({"neighbors_version": 1, **about, "queries": [asdict(q) for q in queries]})


def contact_sheet(queries: Sequence[Query], path: Path, policy: DecodePolicy, title: str) -> Path:
    """A PNG: one query per row (red frame: misclassified), then its neighbours (green frame: the
    query's class, red: another), with captions. Written atomically (:mod:`featurekit.images.sheets`)."""
    rows = []
    for query in queries:
        wrong = query.truth is not None and query.predicted is not None and query.predicted != query.truth
        said = (f"{query.truth}->{query.predicted}" if wrong else query.truth or query.predicted or "")
        cells = [Cell(query.file, [Path(query.name).name, f"{said} {query.probability:.2f}"
                                   if query.probability is not None else said], "red" if wrong else "grey")]
        expected = query.truth or query.predicted
        cells += [Cell(n.file, [Path(n.name).name, f"{n.label} {n.similarity:.2f}"],
                       "green" if n.label == expected else "red") for n in query.neighbours]
        rows.append(SheetRow(cells))
    return sheets.contact_sheet(rows, path, title, policy)


def neighbors_report(head: str | os.PathLike | None, features_dir: str | os.PathLike | None,
                     backbones: Sequence[str] | None, images: Sequence[str | os.PathLike] | None,
                     settings: NeighborsSettings = NEIGHBORS, run: RunSettings | None = None,
                     trust_paths: bool = False) -> tuple[list[str], str]:
    """``featurekit neighbors``: :func:`search`, then the contact sheet if ``settings.sheet``. Returns
    (the lines of the queries and their neighbours, or one line of JSON; the summary line)."""
    found = search(head, features_dir, backbones, images, settings.split, settings.valid_split, settings.k, run,
                   trust_paths)
    sheet = write_sheet(found, settings.sheet, settings.worst) if settings.sheet and found.queries else None
    lines = [queries_json(found.queries, found.about)] if settings.json else \
        [line for query in found.queries for line in describe_query(query)]
    return lines, found.summary + (f"; contact sheet {sheet}" if sheet else "")
