"""``featurekit audit``: what is wrong with a data set, found from its cached features.

    stores of the audited splits (checked as train-head checks them, features left on disk)
      -> class balance (labels)                 -> decode oddities (file headers, skipped files)
      -> exact duplicates (sha256: recorded at extraction, or hashed on demand where sizes collide)
      -> one all-pairs top-k search over every split's rows (blockwise, bounded memory)
           -> near duplicates and leakage (pairs across splits), rescored exactly
           -> outliers (distance to the k-th nearest row)
      -> likely label errors (out-of-fold logistic regression, confident learning), each with its
         nearest training rows
      -> FEATURES/audit/<backbones>/: audit.json, audit.md, contact sheets, under the folder's lock

Every check is linear in N (the hashes, the label check) or N^2 / 2 products in blocks (the search;
faiss's approximate inverted file above ``exact_limit`` rows where faiss is installed). docs/audit.md
has the method, the thresholds with the measurements behind them, and what it finds on real sets.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..devices import AUTO, auto_precision, resolve_device
from ..errors import FeaturekitWarning
from ..files import FileLock
from ..heads.exclusions import AuditedStore
from ..heads.nearest import Neighbours, all_pairs, top_k
from ..store.format import file_stem
from . import labels as label_check
from .approximate import faiss_available, ivf_pairs
from .exact import equal_groups, row_digests
from .near import NearRule, near_duplicates
from .oddities import class_balance, header_oddities
from .outliers import knn_outliers
from .report import Findings, write_outputs
from .rows import AuditedSplit, audited_rows, open_splits, row_sources
from .settings import AUDIT_DIR, AuditSettings

__all__ = ["Audit", "audit", "audit_dir"]

logger = logging.getLogger(__name__)
FLAG_NEIGHBOURS = 5  # nearest training rows shown with each label flag
OUTLIER_NEIGHBOURS = 3  # nearest rows shown with each outlier


@dataclass
class Audit:
    """What an audit found (``report``: audit.json's content) and where it wrote it."""

    report: dict
    out_dir: Path

    def lines(self) -> list[str]:
        """What ``featurekit audit`` prints: one line per finding kind, then where the files are."""
        return [*self.report["summary_lines"], f"written to {self.out_dir}/ ({', '.join(self.report['files'])})"]


def audit_dir(features_dir: str | os.PathLike, store_names: Sequence[str]) -> Path:
    return Path(features_dir) / AUDIT_DIR / "+".join(map(file_stem, store_names))


def audit(features_dir: str | os.PathLike, store_names: Sequence[str], settings: AuditSettings | None = None) -> Audit:
    """Audit the stores of ``store_names`` (joined column-wise) over ``settings.splits`` of ``features_dir``;
    write audit.json, audit.md and contact sheets into :func:`audit_dir`, holding its lock."""
    settings = settings or AuditSettings()
    splits = open_splits(features_dir, store_names, settings.splits)
    out_dir = audit_dir(features_dir, store_names)
    with FileLock(out_dir / ".audit.lock", str(out_dir)):
        findings = Checks(splits, settings).run()
        findings.report.update(features_dir=str(features_dir), backbones=list(store_names))
        return Audit(write_outputs(findings, out_dir, settings.sheets), out_dir)


class Checks:
    """The checks of one audit over ``splits`` (rows end to end, the first split first)."""

    def __init__(self, splits: Sequence[AuditedSplit], settings: AuditSettings):
        self.splits, self.settings = list(splits), settings
        self.rows, self.normalise = audited_rows(self.splits)
        lengths = [len(split) for split in self.splits]
        self.offsets = np.cumsum([0, *lengths])
        self.split_of = np.repeat(np.arange(len(lengths)), lengths)
        self.classes = list(dict.fromkeys(c for split in self.splits for c in split.rows.classes))
        self.labels = np.concatenate([_global_labels(split, self.classes) for split in self.splits])
        self.device = resolve_device(settings.device)
        self.precision = auto_precision(self.device) if settings.precision == AUTO else settings.precision
        self.findings = Findings(self.splits, self.classes, self.labels, self.split_of, self.offsets)
        self._sources: list | None = None
        self.findings.sources = lambda: self.sources

    @property
    def sources(self) -> list:
        """What to read for each row (files, tar members), found once, on first need."""
        if self._sources is None:
            self._sources = []
            for split in self.splits:
                found, note = row_sources(split)
                self._sources += found
                if note:
                    self.findings.note(note)
        return self._sources

    def run(self) -> Findings:
        report, checks = self.findings.report, self.settings.checks
        report.update(splits=[s.split for s in self.splits], rows={s.split: len(s) for s in self.splits},
                      settings=dataclasses.asdict(self.settings), device=self.device, precision=self.precision)
        self.findings.flagged_stores = [AuditedStore(s.split, info.store_name, info.header.fingerprint,
                                                     info.header.listing_sha256)
                                        for s in self.splits for info in s.rows.stores]
        for name, check in (("balance", self.balance), ("decode", self.decode), ("exact", self.exact)):
            if name in checks:
                self._timed(name, check)
        if {"near", "outliers"} & set(checks):
            found = self._timed("search", self.search)
            if "near" in checks:
                self._timed("near", lambda: self.near(found))
            if "outliers" in checks:
                self._timed("outliers", lambda: self.outliers(found))
        if "labels" in checks:
            self._timed("labels", self.label_errors)
        return self.findings

    def _timed(self, name: str, check):
        started = time.perf_counter()
        result = check()
        seconds = time.perf_counter() - started
        self.findings.report.setdefault("timings", {})[name] = round(seconds, 3)
        logger.info(f"audit {name}: {seconds:.1f} s")
        return result

    def balance(self) -> None:
        labelled = {s.split: self.labels[a:b] for s, a, b in zip(self.splits, self.offsets, self.offsets[1:])
                    if s.rows.labels is not None}
        self.findings.report["balance"] = class_balance(labelled, self.classes) if labelled else {}

    def decode(self) -> None:
        odd = header_oddities(self.sources, self.settings.tiny)
        skipped = [(split.split, path, reason) for split in self.splits for path, reason in split.skipped]
        self.findings.decode(odd, skipped)

    def exact(self) -> None:
        sizes = np.concatenate([split.sizes for split in self.splits])
        recorded = [split.sha256 for split in self.splits]
        on_demand = [split.split for split in self.splits if split.sha256 is None]
        if on_demand:
            self.findings.note(f"{', '.join(on_demand)}: stores made before featurekit recorded file digests; "
                               "files whose size another file shares were hashed now")
        sources = self.sources if on_demand or any((d == b"").any() for d in recorded if d is not None) else []
        digests = row_digests(recorded, [len(s) for s in self.splits], sizes, sources)
        self.findings.exact(digests, equal_groups(digests.sha256))

    def search(self) -> Neighbours:
        """Each row's top lists: k + 1 for the relative test's baseline, ``outlier_k`` for the outliers."""
        settings, n = self.settings, self.rows.n
        k = max(NearRule(settings.threshold, settings.relative, settings.floor, settings.neighbours).k(n) + 1,
                settings.outlier_k)
        approximate = settings.search == "ivf" or (settings.search == "auto" and n > settings.exact_limit
                                                   and faiss_available())
        if approximate:
            found = ivf_pairs(self.rows, k, self.normalise, seed=settings.seed)
        else:
            if settings.search == "auto" and n > settings.exact_limit:
                self.findings.note(f"{n} rows searched exactly (faiss is not installed: the approximate search "
                                   "needs pip install 'featurekit[faiss]')")
            found = all_pairs(self.rows, k, self.normalise, precision=self.precision, block=settings.block,
                              device=self.device)
        self.findings.report["search"] = {"search": "ivf" if approximate else "exact", "k": k, **found.stats}
        return found

    def near(self, found: Neighbours) -> None:
        s = self.settings
        rule = NearRule(s.threshold, s.relative, s.floor, s.neighbours)
        pairs, clusters = near_duplicates(found, self.rows, self.normalise, self.split_of, rule,
                                          "fp32" if self.findings.report["search"]["search"] == "ivf" else
                                          self.precision)
        self.findings.near(rule, pairs, clusters)

    def outliers(self, found: Neighbours) -> None:
        s = self.settings
        flagged = knn_outliers(found, s.outlier_k, s.outlier_z, s.outlier_fraction)
        self.findings.outliers(flagged, found, OUTLIER_NEIGHBOURS, (s.outlier_k, s.outlier_z, s.outlier_fraction))

    def label_errors(self) -> None:
        checked = [i for i, split in enumerate(self.splits) if split.rows.labels is not None]
        classes = np.unique(self.labels[np.isin(self.split_of, checked)])
        if len(classes) < 2:
            held = ", ".join(repr(self.splits[i].split) for i in checked) or "none"
            why = (f"label checks skipped: the labelled splits ({held}) hold "
                   + (f"one class ({self.classes[classes[0]]})" if len(classes) else "no labels"))
            warnings.warn(why, FeaturekitWarning, stacklevel=2)
            self.findings.report["labels"] = {"skipped": why}
            return
        ranges = [(int(self.offsets[i]), int(self.offsets[i + 1])) for i in checked]
        members = np.concatenate([np.arange(a, b) for a, b in ranges])
        if len(members) > self.settings.pca_above:
            X = label_check.principal_features(self.rows, ranges, seed=self.settings.seed)
        else:
            X = label_check.standardised_rows(self.rows, ranges)
        y = self.labels[members]
        oof = label_check.out_of_fold_proba(X, y, len(self.classes), self.settings.folds, self.settings.C,
                                            self.settings.seed, self.device)
        del X
        flags = label_check.confident_flags(oof.proba, y)
        flagged = members[[flag.row for flag in flags]].astype(np.int64)
        train = (int(self.offsets[checked[0]]), int(self.offsets[checked[0] + 1]))  # the first labelled split
        near = (top_k(self.rows.take(flagged), self.rows, FLAG_NEIGHBOURS, self.normalise, exclude=flagged,
                      allowed=train, device=self.device) if len(flags) else None)
        self.findings.labels(oof, flags, members, near, label_check.class_thresholds(oof.proba, y),
                             (self.settings.folds, self.settings.C))


def _global_labels(split: AuditedSplit, classes: list[str]) -> np.ndarray:
    """int64[N]: the split's labels as indices of the audit's classes (matched by name); -1 unlabelled."""
    if split.rows.labels is None:
        return np.full(len(split), -1, np.int64)
    mapping = np.array([classes.index(name) for name in split.rows.classes], dtype=np.int64)
    return mapping[split.rows.labels] if len(mapping) else np.zeros(0, np.int64)
