"""``featurekit verify``, ``info`` and ``list-backbones``."""

from __future__ import annotations

from pathlib import Path

from ..backbones.registry import SOURCES, describe_registry
from ._options import command, say


def add_verify(commands) -> None:
    p = command(commands, "verify", "check stores: complete, sound, unedited, and current with their image folder",
                description="Check feature stores. Exit status 1 if any store is incomplete or damaged, has wrong "
                            "shapes or dtypes, NaN/Inf features, was edited, or no longer matches its image folder "
                            "(images added, removed or modified are named), or if stores of one split do not align.")
    p.add_argument("store", type=Path, nargs="+", help="store files (OUT/<split>/<backbone>.h5)")
    p.add_argument("--data-root", type=Path, help="check against this folder (default: the data root recorded in "
                                                  "each store)")
    p.set_defaults(run=run_verify)


def run_verify(args) -> int:
    from ..store.verify import verify_stores

    reports = verify_stores(args.store, args.data_root)
    say(line for report in reports for line in report.lines())
    failed = sum(not report.ok for report in reports)
    if failed:
        say(f"featurekit: verify: {failed} of {len(reports)} stores have problems", error=True)
    return 1 if failed else 0


def add_info(commands) -> None:
    p = command(commands, "info", "describe feature stores: rows, classes, backbone, weights, how they were made")
    p.add_argument("store", type=Path, nargs="+", help="store files (OUT/<split>/<backbone>.h5)")
    p.add_argument("--json", action="store_true", help="print each store's attributes as one line of JSON")
    p.set_defaults(run=lambda args: say(line for path in args.store for line in describe(path, args.json)))


def describe(path: Path, as_json: bool) -> list[str]:
    from ..store.info import describe_store

    return describe_store(path, as_json)


def add_list_backbones(commands) -> None:
    p = command(commands, "list-backbones", "list the backbones extract knows: the registry, torchvision's models, "
                "and with --source another library's")
    p.add_argument("--source", choices=SOURCES, help="list that library's model names, without downloading anything "
                   "(default: none: the registry and torchvision)")
    p.add_argument("pattern", nargs="?", help="only names matching it (shell-style; a word matches anywhere)")
    p.set_defaults(run=lambda args: say(describe_registry(args.source, args.pattern)))
