"""What an audit found, as files: audit.json (every finding, the flagged rows train-head can leave
out), audit.md (for people) and contact sheets (PNG pages, the images side by side), each written
atomically. Rows are named ``{"split", "path", "label"}`` (the stored path, the class name or None).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..files import atomic_write
from ..heads.exclusions import KINDS, Flagged
from ..heads.report import json_default
from ..images.decode import DecodePolicy
from ..images.sheets import Cell, SheetRow, contact_sheet

__all__ = ["AUDIT_VERSION", "Findings", "write_outputs"]

logger = logging.getLogger(__name__)
AUDIT_VERSION = 1
PAGE_ROWS = 12  # rows of a contact-sheet page
PAIRS_PER_ROW = 3  # near-duplicate pairs side by side in one row
SHOWN = 20  # findings of each kind listed in audit.md (audit.json lists all)


class Findings:
    """The report of one audit as its checks fill it, and the rows each kind flags (:data:`KINDS`)."""

    def __init__(self, splits: Sequence, classes: list[str], labels: np.ndarray, split_of: np.ndarray,
                 offsets: np.ndarray):
        self.names = [split.split for split in splits]
        self.paths = [path for split in splits for path in split.rows.paths]
        self.classes, self.label_of, self.split_of, self.offsets = classes, labels, split_of, offsets
        self.policy = DecodePolicy.from_dict(splits[0].header.decode)
        self.report: dict = {"audit_version": AUDIT_VERSION, "notes": []}
        self.flagged: dict[str, dict[str, set[str]]] = {kind: {} for kind in KINDS}
        self.flagged_stores: list = []
        self.sheets: dict[str, list[tuple[str, list[int], list[str]]]] = {}  # kind -> (note, rows, captions)
        self.sources: Callable[[], list] = lambda: []

    def ref(self, row: int) -> dict:
        label = int(self.label_of[row])
        return {"split": self.names[self.split_of[row]], "path": self.paths[row],
                "label": self.classes[label] if label >= 0 else None}

    def name(self, row: int) -> str:
        return f"{self.names[self.split_of[row]]}/{self.paths[row]}"

    def note(self, text: str) -> None:
        self.report["notes"].append(text)
        logger.info(text)

    def flag(self, kind: str, rows) -> None:
        for row in rows:
            self.flagged[kind].setdefault(self.names[self.split_of[row]], set()).add(self.paths[row])

    def sheet(self, kind: str, note: str, rows: Sequence[int], captions: Sequence[str]) -> None:
        self.sheets.setdefault(kind, []).append((note, [int(r) for r in rows], list(captions)))

    def decode(self, odd: list[tuple[int, str]], skipped: list[tuple[str, str, str]]) -> None:
        self.report["decode"] = {"odd": [{**self.ref(row), "what": what} for row, what in odd],
                                 "skipped": [{"split": s, "path": p, "reason": r} for s, p, r in skipped]}
        for start in range(0, len(odd), 6):
            shown = odd[start:start + 6]
            self.sheet("decode", "", [row for row, _ in shown], [what for _, what in shown])

    def exact(self, digests, groups: list[np.ndarray]) -> None:
        entries = []
        for group in sorted(groups, key=lambda g: (len(set(self.split_of[g])) == 1, int(g[0]))):
            cross, differ = len(set(self.split_of[group])) > 1, len(set(self.label_of[group])) > 1
            entries.append({"sha256": digests.sha256[group[0]].decode(), "cross_split": cross, "labels_differ": differ,
                            "rows": [self.ref(r) for r in group]})
            for split in set(self.split_of[group]):
                self.flag("exact", group[self.split_of[group] == split][1:])  # every copy but a split's first
            if cross:
                self.flag("leakage", group)
            self.sheet("exact", f"{'across splits, ' if cross else ''}{'labels differ, ' if differ else ''}"
                       f"sha256 {entries[-1]['sha256'][:16]}", group, ["same bytes"] * len(group))
        self.report["exact"] = {"groups": entries, "cross_split_groups": sum(e["cross_split"] for e in entries),
                                "digests_recorded": digests.recorded, "hashed_now": digests.hashed,
                                "hashed_bytes": digests.hashed_bytes,
                                "changed_since_extraction": [self.ref(r) for r in digests.changed],
                                "unreadable": [self.ref(r) for r in digests.unreadable]}

    def near(self, rule, pairs, clusters) -> None:
        for cluster in clusters:
            rows = np.array(cluster.rows)
            for split in set(self.split_of[rows]):
                self.flag("near", rows[self.split_of[rows] == split][1:])
            if cluster.cross_split:
                self.flag("leakage", rows)
        for pair in pairs:
            kind = "leakage" if pair.cross_split else "near"
            self.sheet(kind, "", [pair.a, pair.b], [f"cos {pair.similarity:.3f} rel {pair.relative:.2f}"] * 2)
        self.report["near"] = {
            "rule": {"threshold": rule.threshold, "relative": rule.relative, "floor": rule.floor, "k": rule.neighbours},
            "pairs_total": len(pairs), "cross_split_pairs": sum(p.cross_split for p in pairs),
            "clusters_total": len(clusters), "cross_split_clusters": sum(c.cross_split for c in clusters),
            "pairs": [{"a": self.ref(p.a), "b": self.ref(p.b), "similarity": round(p.similarity, 4),
                       "relative": round(p.relative, 4), "by": p.by, "cross_split": p.cross_split} for p in pairs],
            "clusters": [{"rows": [self.ref(r) for r in c.rows], "cross_split": c.cross_split,
                          "min_similarity": round(c.min_similarity, 4), "max_similarity": round(c.max_similarity, 4)}
                         for c in clusters]}

    def outliers(self, found, neighbours, shown: int, rule: tuple[int, float, float]) -> None:
        self.flag("outliers", found.rows)

        def entry(row: int) -> dict:
            return {**self.ref(row), "distance": round(float(found.scores[row]), 4),
                    "robust_z": round(float(found.robust_z[row]), 2)}
        flagged = []
        for row in found.rows:
            near = [(int(j), float(s)) for j, s in zip(neighbours.idx[row, :shown], neighbours.sim[row, :shown])
                    if j >= 0]
            flagged.append({**entry(row), "nearest": [{**self.ref(j), "similarity": round(s, 4)} for j, s in near]})
            self.sheet("outliers", f"distance {found.scores[row]:.3f}, z {found.robust_z[row]:.1f}",
                       [row] + [j for j, _ in near], ["outlier"] + [f"cos {s:.3f}" for _, s in near])
        self.report["outliers"] = {"k": rule[0], "z": rule[1], "fraction": rule[2], "flagged": flagged,
                                   "tail": [entry(int(r)) for r in found.tail(max(10, len(found.rows)))]}

    def labels(self, oof, flags, members: np.ndarray, near, thresholds: np.ndarray, params: tuple) -> None:
        self.flag("labels", [members[f.row] for f in flags])
        entries = []
        for i, f in enumerate(flags):
            row = int(members[f.row])
            shown = [(int(j), float(s)) for j, s in zip(near.idx[i], near.sim[i]) if j >= 0]
            entries.append({**self.ref(row), "given": self.classes[f.given], "suggested": self.classes[f.suggested],
                            "p_given": round(f.self_confidence, 4), "p_suggested": round(f.suggested_probability, 4),
                            "nearest_train": [{**self.ref(j), "similarity": round(s, 4)} for j, s in shown]})
            self.sheet("labels", f"{self.name(row)}: given {entries[-1]['given']} (p {f.self_confidence:.2f}), "
                       f"suggested {entries[-1]['suggested']} (p {f.suggested_probability:.2f})",
                       [row] + [j for j, _ in shown], ["flagged"] + [f"cos {s:.3f}" for _, s in shown])
        self.report["labels"] = {
            "folds": params[0], "C": params[1], "checked_rows": len(members), "oof_accuracy": round(oof.accuracy, 4),
            "flags_total": len(flags), "flag_rate": round(len(flags) / max(1, len(members)), 5),
            "class_thresholds": {c: round(float(t), 4) for c, t in zip(self.classes, thresholds) if np.isfinite(t)},
            "flags": entries}

    def finish(self) -> None:
        """The flagged rows, how many rows each kind touches per split, and the summary lines."""
        self.report["flagged"] = Flagged(self.flagged_stores, self.flagged).to_dict()
        self.report["rows_flagged"] = {kind: {split: len(paths) for split, paths in by_split.items()}
                                       for kind, by_split in self.flagged.items()}
        self.report["summary_lines"] = summary_lines(self.report)


def summary_lines(report: dict) -> list[str]:
    """One line per check that ran, as ``featurekit audit`` prints them."""
    lines = [f"rows: {', '.join(f'{split} {n}' for split, n in report['rows'].items())}"]
    if "exact" in report:
        e = report["exact"]
        lines.append(f"exact duplicates: {len(e['groups'])} groups ({e['cross_split_groups']} across splits); "
                     f"digests recorded at extraction for {e['digests_recorded']} rows, {e['hashed_now']} files "
                     "hashed now")
    if "near" in report:
        n = report["near"]
        lines.append(f"near duplicates: {n['pairs_total']} pairs in {n['clusters_total']} clusters; leakage: "
                     f"{n['cross_split_pairs']} pairs across splits")
    if "labels" in report:
        lab = report["labels"]
        lines.append(lab.get("skipped") or f"likely label errors: {lab['flags_total']} of {lab['checked_rows']} rows "
                     f"(out-of-fold accuracy {lab['oof_accuracy']:.3f})")
    if "outliers" in report:
        flagged = report["outliers"]["flagged"]
        lines.append(f"outliers: {len(flagged)}" + (": " + ", ".join(f"{o['split']}/{o['path']}" for o in
                                                                     flagged[:5]) if flagged else ""))
    if "decode" in report:
        d = report["decode"]
        lines.append(f"odd files: {len(d['odd'])}" + "".join(f"; {o['split']}/{o['path']} ({o['what']})"
                                                             for o in d["odd"][:3]) + f"; skipped at extraction: "
                     f"{len(d['skipped'])}")
    for split, counts in report.get("balance", {}).items():
        ratio = f", largest/smallest class {counts['ratio']:.1f}" if counts["ratio"] else ""
        lines.append(f"balance {split}: {counts['rows']} rows in {sum(n > 0 for n in counts['counts'].values())} "
                     f"classes{ratio}" + (f", missing {', '.join(counts['missing'])}" if counts["missing"] else ""))
    flagged = [f"{kind} " + ", ".join(f"{split} {n}" for split, n in by_split.items())
               for kind, by_split in report.get("rows_flagged", {}).items() if by_split]
    lines.append(f"rows flagged (train-head --exclude): {'; '.join(flagged) or 'none'}")
    return lines + [f"note: {note}" for note in report["notes"]]


def write_outputs(findings: Findings, out_dir: Path, per_kind: int) -> dict:
    """audit.json, audit.md and the contact sheets (``per_kind`` findings of each kind) into ``out_dir``;
    sheets of an earlier audit that this one does not write are removed. Returns the report as written."""
    findings.finish()
    out_dir.mkdir(parents=True, exist_ok=True)
    sheets = _write_sheets(findings, out_dir, per_kind) if per_kind else []
    for old in out_dir.glob("sheet_*.png"):
        if old.name not in sheets:
            old.unlink()
    report = {**findings.report, "files": ["audit.json", "audit.md", *sheets]}
    atomic_write(out_dir / "audit.md", markdown(report))
    atomic_write(out_dir / "audit.json", json.dumps(report, indent=1, default=json_default) + "\n")
    return report


def _write_sheets(findings: Findings, out_dir: Path, per_kind: int) -> list[str]:
    """Pages of :data:`PAGE_ROWS` rows: one finding per row, or pairs three to a row (leakage, near)."""
    sources, written = findings.sources(), []
    for kind, entries in findings.sheets.items():
        entries, per_row = entries[:per_kind], PAIRS_PER_ROW if kind in ("leakage", "near") else 1
        rows = []
        for start in range(0, len(entries), per_row):
            shown = entries[start:start + per_row]
            rows.append(SheetRow([Cell(sources[r], [findings.name(r).rsplit("/", 1)[-1], _label(findings, r),
                                                    caption], _frame(findings, kind, members[0], r))
                                  for _, members, captions in shown for r, caption in zip(members, captions)],
                                 shown[0][0]))
        gaps = (2, 4) if per_row > 1 else (1,) if kind in ("labels", "outliers") else ()
        for page, start in enumerate(range(0, len(rows), PAGE_ROWS), 1):
            name = f"sheet_{kind}_p{page}.png"
            first, last = start * per_row + 1, min(len(entries), (start + PAGE_ROWS) * per_row)
            title = f"audit: {kind}, findings {first}-{last} of {len(findings.sheets[kind])}"
            contact_sheet(rows[start:start + PAGE_ROWS], out_dir / name, title, findings.policy, gaps)
            written.append(name)
    return written


def _label(findings: Findings, row: int) -> str:
    label = int(findings.label_of[row])
    return f"{findings.names[findings.split_of[row]]}: {findings.classes[label] if label >= 0 else '(no label)'}"


def _frame(findings: Findings, kind: str, first: int, row: int) -> str:
    """Red: the finding itself (a flagged label, an outlier) or a copy in another split; a flagged label's
    neighbours green where they carry its given class, orange where not; grey otherwise."""
    if row == first and kind in ("labels", "outliers"):
        return "red"
    if kind == "labels":
        return "green" if findings.label_of[row] == findings.label_of[first] else "orange"
    copies = kind in ("exact", "near", "leakage")
    return "red" if copies and findings.split_of[row] != findings.split_of[first] else "grey"


def markdown(report: dict) -> str:
    """audit.md: the summary, then the first findings of each kind and the contact sheets."""
    out = [f"# Audit of {' + '.join(report.get('backbones', []))} ({', '.join(report['splits'])})", ""]
    out += [f"- {line}" for line in report["summary_lines"]] + [""]
    sections = [("Leakage and near duplicates (cross-split first)", report.get("near", {}).get("pairs", []),
                 lambda p: f"{p['similarity']:.3f} (rel {p['relative']:.2f}, {p['by']}) | {_md(p['a'])} | "
                           f"{_md(p['b'])}",
                 "cosine | a | b"),
                ("Exact duplicates", report.get("exact", {}).get("groups", []),
                 lambda g: f"{g['sha256'][:16]} | {' = '.join(_md(r) for r in g['rows'])}", "sha256 | rows"),
                ("Likely label errors", report.get("labels", {}).get("flags", []),
                 lambda f: f"{_md(f)} | {f['given']} ({f['p_given']:.3f}) | {f['suggested']} ({f['p_suggested']:.3f})",
                 "row | given (p) | suggested (p)"),
                ("Outliers", report.get("outliers", {}).get("flagged", []),
                 lambda o: f"{_md(o)} | {o['distance']:.3f} | {o['robust_z']:.1f}", "row | distance | robust z"),
                ("Odd files", report.get("decode", {}).get("odd", []), lambda o: f"{_md(o)} | {o['what']}",
                 "row | what"),
                ("Skipped at extraction", report.get("decode", {}).get("skipped", []),
                 lambda s: f"{s['split']}/{s['path']} | {s['reason']}", "file | reason")]
    for title, items, line, head in sections:
        if items:
            out += [f"## {title}", "", f"| {head} |", "|" + "---|" * (head.count("|") + 1)]
            out += [f"| {line(item)} |" for item in items[:SHOWN]]
            out += (["", f"({len(items) - SHOWN} more in audit.json)"] if len(items) > SHOWN else []) + [""]
    sheets = [name for name in report["files"] if name.endswith(".png")]
    if sheets:
        out += ["## Contact sheets", ""] + [f"![{name}]({name})" for name in sheets] + [""]
    return "\n".join(out)


def _md(ref: dict) -> str:
    return f"{ref['split']}/{ref['path']}" + (f" ({ref['label']})" if ref.get("label") else "")
