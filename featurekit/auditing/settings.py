"""What ``featurekit audit`` checks and how: :class:`AuditSettings` (no torch here: the command line
builds its options from it). The defaults were measured on real features (efficientnet_lite0 on
hymenoptera and caltech101, planted copies and flipped labels): docs/audit.md gives the figures."""

from __future__ import annotations

from dataclasses import dataclass

from ..devices import AUTO
from ..errors import SettingsError
from ..options import setting

__all__ = ["AUDIT_DIR", "CHECKS", "SEARCHES", "AuditSettings"]

AUDIT_DIR = "audit"  # FEATURES/audit/<backbones>/ holds audit.json, audit.md and the contact sheets
CHECKS = ("exact", "near", "labels", "outliers", "decode", "balance")
SEARCHES = ("auto", "exact", "ivf")  # auto: exact up to exact_limit rows (or without faiss), else ivf
SEARCH_PRECISIONS = ("auto", "bf16", "fp32")


@dataclass(frozen=True)
class AuditSettings:
    """The splits audited together, the checks, and their thresholds (docs/audit.md: the method and
    the measurements behind each default)."""

    splits: tuple[str, ...] = setting(("train", "valid"), "splits audited together (leakage: near copies across them)",
                                      flag="--split", metavar="SPLIT")
    checks: tuple[str, ...] = setting(CHECKS, "which checks to run", choices=CHECKS)
    threshold: float = setting(0.95, "near duplicates: a pair at or above this cosine similarity always counts")
    relative: float = setting(0.45, "near duplicates: a pair also counts if (cos - b) / (1 - b) reaches this, b the "
                              "two rows' k-th nearest other similarity: far closer than their usual neighbours")
    floor: float = setting(0.70, "near duplicates: the relative test applies only at or above this cosine")
    neighbours: int = setting(10, "near duplicates: k of the relative test's neighbourhood (at most rows / 40)")
    folds: int = setting(5, "label check: stratified folds of the out-of-fold logistic regression")
    C: float = setting(1e-3, "label check: the logistic regression's C (scikit-learn's units)", flag="--C")
    outlier_k: int = setting(5, "outliers: distance to the k-th nearest other row")
    outlier_z: float = setting(2.0, "outliers: robust z (median, MAD) the distance must pass")
    outlier_fraction: float = setting(0.01, "outliers: at most this fraction of rows, farthest first")
    tiny: int = setting(32, "decode check: images whose shorter side is below this many pixels are listed")
    search: str = setting("auto", "nearest-row search: exact blocks, or faiss's approximate inverted file (ivf); "
                          "auto: exact up to --exact-limit rows", choices=SEARCHES)
    exact_limit: int = setting(300_000, "auto search: rows up to which the all-pairs search is exact")
    precision: str = setting(AUTO, "exact search's products: bf16 (then near-duplicate candidates are rescored "
                             "in float32), fp32; auto: bf16 where the device computes it", choices=SEARCH_PRECISIONS)
    device: str = setting(AUTO, "where the search and the label check run: auto (cuda if available), cpu, cuda")
    block: int = setting(4096, "rows per block of the search (memory: block x block scores)")
    pca_above: int = setting(200_000, "label check: above this many rows, fit on 256 principal axes (memory)")
    sheets: int = setting(24, "findings of each kind drawn on contact sheets (0: no sheets)")
    seed: int = setting(0, "seed of the folds and of the approximate search")

    def __post_init__(self) -> None:
        unknown = sorted(set(self.checks) - set(CHECKS))
        if unknown:
            raise SettingsError(f"unknown audit check {', '.join(unknown)} (choose from {', '.join(CHECKS)})")
        for name, low in (("folds", 2), ("neighbours", 1), ("outlier_k", 1), ("block", 1), ("sheets", 0)):
            if getattr(self, name) < low:
                raise SettingsError(f"audit: --{name.replace('_', '-')} must be at least {low} "
                                    f"(got {getattr(self, name)})")
        if not self.splits:
            raise SettingsError("audit: give at least one --split")
