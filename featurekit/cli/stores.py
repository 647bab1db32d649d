"""``featurekit verify``, ``info``, ``du``, ``clean``, ``export``, ``audit`` and ``list-backbones``."""

from __future__ import annotations

from pathlib import Path

from ..auditing.settings import AuditSettings
from ..backbones.registry import SOURCES, describe_registry
from ..cache.settings import CleanSettings
from ..options import add_settings, from_args
from ..store.settings import ExportSettings
from ._options import add_backbones, command, library, say

__all__ = ["add_audit", "add_export", "add_housekeeping", "add_info", "add_list_backbones", "add_verify"]

PATHS = "stores (OUT/<split>/<backbone>.h5), head files, fine-tuned model folders, or folders holding them"


def add_verify(commands) -> None:
    p = command(commands, "verify", "check stores, heads and models: complete, sound, unedited, current",
                description="Check feature stores, heads and fine-tuned models. Exit status 1 if any store is "
                            "incomplete or damaged, has wrong shapes or dtypes, NaN/Inf features, was edited, or no "
                            "longer matches its images (added, removed or modified images are named), if stores of "
                            "one split do not align, or if a head or model does not load or its stores changed.")
    p.add_argument("store", type=Path, nargs="+", help=PATHS)
    p.add_argument("--data-root", type=Path, help="check against this folder (default: the data root recorded in "
                                                  "each store)")
    p.set_defaults(run=run_verify)


def run_verify(args) -> int:
    from ..cache.artifacts import verify_paths

    checked = verify_paths(args.store, args.data_root)
    say(checked.lines)
    if checked.failed:
        say(checked.summary, error=True)
    return 1 if checked.failed else 0


def add_info(commands) -> None:
    p = command(commands, "info", "describe stores, heads and models: rows, classes, backbone, how they were made")
    p.add_argument("store", type=Path, nargs="+", help=PATHS)
    p.add_argument("--json", action="store_true", help="print each one's attributes as one line of JSON")
    p.set_defaults(run=lambda args: say(library("cache").info_paths(args.store, args.json)))


def add_housekeeping(commands) -> None:
    p = command(commands, "du", "list the stores, heads, partial chunks, locks and temporaries of a features folder, "
                "with sizes and ages")
    p.add_argument("paths", type=Path, nargs="+", metavar="FEATURES", help="extract's --out folders")
    p.set_defaults(run=lambda args: say(library("cache").disk_usage(args.paths)))
    p = command(commands, "clean", "remove the leftovers of runs (chunks of finished or stale runs, free locks) under "
                "each store's lock; a store, head or model only when named", epilog="docs/reliability.md")
    p.add_argument("paths", type=Path, nargs="+", metavar="PATH", help="features folders (leftovers only), or stores, "
                   "head files and model.json files to remove")
    add_settings(p, CleanSettings)
    p.set_defaults(run=lambda args: say(library("cache").clean(args.paths, from_args(CleanSettings, args))))


def add_export(commands) -> None:
    p = command(commands, "export", "write a split's features as parquet or npy for other tools (pandas, polars, "
                "HF datasets, Ray Data, clip-retrieval)")
    p.add_argument("features_dir", metavar="FEATURES_DIR", type=Path, help="extract's --out folder")
    p.add_argument("--split", required=True, help="the split to export")
    add_backbones(p, "stores to concatenate, in this order (backbone, or backbone@node)")
    p.add_argument("--out", required=True, type=Path, help="parquet file, or npy folder")
    add_settings(p, ExportSettings)
    p.set_defaults(run=lambda args: say(library("store.export").export(
        args.features_dir, args.split, args.backbone, args.out, from_args(ExportSettings, args))))


def add_audit(commands) -> None:
    p = command(commands, "audit", "find duplicates, train/valid leakage, likely label errors, outliers and odd files "
                "from cached features", epilog="writes FEATURES/audit/<backbones>/: audit.json, audit.md, contact "
                "sheets; docs/audit.md")
    p.add_argument("features_dir", metavar="FEATURES", type=Path, help="extract's --out folder")
    add_backbones(p, "stores to audit, concatenated (backbone, or backbone@node)")
    add_settings(p, AuditSettings)
    p.set_defaults(run=lambda args: say(library("auditing").audit(args.features_dir, args.backbone,
                                                                from_args(AuditSettings, args)).lines()))


def add_list_backbones(commands) -> None:
    p = command(commands, "list-backbones", "list the backbones extract knows: the registry, torchvision's models, "
                "and with --source another library's")
    p.add_argument("--source", choices=SOURCES, help="list that library's model names, without downloading anything "
                   "(default: none: the registry and torchvision)")
    p.add_argument("pattern", nargs="?", help="only names matching it (shell-style; a word matches anywhere)")
    p.set_defaults(run=lambda args: say(describe_registry(args.source, args.pattern)))
