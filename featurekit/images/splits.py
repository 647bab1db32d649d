"""A class folder without splits (``root/<class>/<image>``) cut into train and valid by a seeded hash.

Each image's side is decided by ``sha256(seed, its path within its class)`` read as a number
``u`` in [0, 1): ``--valid-fraction F`` puts it in valid when ``u < F``; ``--folds K --fold I``
puts it in valid when ``floor(u K) == I`` (fold I of a K-fold cross-validation; the other folds
train). An image's side depends only on its own path and the seed, so adding or removing images
never moves another, and every class is cut in the same proportion (stratified, in expectation).
Two exceptions, each reported: a class of one image goes to train (a valid row of a class the
head never saw cannot be scored), and under ``--valid-fraction`` a class of two or more images
whose images all fell on one side gives one image, the one nearest the threshold, to the other
side, so that every such class is in both splits.

The rule (fraction or folds, seed, and which side) is the listing's ``source``: stores record it
and include it in their fingerprint, so the train and valid stores of one cut are told from those
of another, and ``verify`` cuts the folder again the same way.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

from ..errors import DataError, SettingsError
from .listing import SPLIT_NAMES, SplitListing, list_split
from .names import counted, printable_path

__all__ = ["PARTS", "check_rule", "cut_class_folder", "side"]

PARTS = ("train", "valid")  # the splits a cut makes


def check_rule(valid_fraction: float | None, folds: int | None, fold: int | None) -> None:
    """Refuse values a cut cannot work with, in one line each."""
    if valid_fraction is not None and folds is not None:
        raise SettingsError("--valid-fraction and --folds both choose the valid images; give one of them")
    if valid_fraction is not None and not 0 < valid_fraction < 1:
        raise SettingsError(f"--valid-fraction {valid_fraction:g}: expected a fraction between 0 and 1 (e.g. 0.2)")
    if (folds is None) != (fold is None):
        raise SettingsError("--folds K and --fold I go together (fold I of K, I from 0)")
    if folds is not None and (folds < 2 or not 0 <= fold < folds):
        raise SettingsError(f"--folds {folds} --fold {fold}: expected K >= 2 folds and 0 <= I < K")


def side(path_in_class: str, seed: int, valid_fraction: float | None, folds: int | None = None,
         fold: int | None = None) -> str:
    """``"valid"`` or ``"train"`` for an image at ``path_in_class`` (printable, below its class folder)."""
    position = _position(path_in_class, seed)
    if folds is not None:
        return "valid" if int(position * folds) == fold else "train"
    return "valid" if position < valid_fraction else "train"


def cut_class_folder(root: str | Path, splits: Sequence[str], seed: int = 0, valid_fraction: float | None = None,
                     folds: int | None = None, fold: int | None = None) -> list[SplitListing]:
    """The listings of ``splits`` (train and/or valid) cut from the class folder ``root``: every class
    in each (a class may have no rows in valid), records in listing order, the rule as ``source``."""
    check_rule(valid_fraction, folds, fold)
    if valid_fraction is None and folds is None:
        raise SettingsError("a class folder is cut by --valid-fraction F or --folds K --fold I")
    unknown = [split for split in splits if split not in PARTS]
    if unknown:
        raise SettingsError(f"--split {' '.join(unknown)}: a cut class folder has the splits {' and '.join(PARTS)}")
    root = Path(root)
    whole = list_split(root.parent, root.name)
    shown = printable_path(str(root))
    if not whole.labelled:
        raise DataError(f"{shown}: holds images directly, no class folders to cut into train and valid")
    splits_there = [c for c in whole.classes if c in SPLIT_NAMES]
    if splits_there:
        raise DataError(f"{shown}: its folders {', '.join(splits_there)} look like splits, not classes; a class "
                        f"folder without splits is cut (root/<class>/<image>); give --split instead")
    rule = {"kind": "class-folder", "seed": seed,
            **({"valid_fraction": valid_fraction} if folds is None else {"folds": folds, "fold": fold})}
    sides, notes = _sides(whole, rule)
    described = f"valid fraction {valid_fraction:g}" if folds is None else f"fold {fold} of {folds}"
    described += f", seed {seed}"
    said = {"ignored": whole.ignored, "empty_classes": whole.empty_classes, "outside_classes": whole.outside_classes,
            "hidden": whole.hidden, "unreadable": whole.unreadable, "links_not_followed": whole.links_not_followed,
            "notes": tuple(notes)}  # by the first split only: one folder, said once
    return [SplitListing(root, part, whole.classes, tuple(r for r, s in zip(whole.records, sides) if s == part),
                         source={**rule, "part": part}, folder=root, name=f"{shown} [{part}: {described}]",
                         **(said if index == 0 else {})) for index, part in enumerate(splits)]


def _position(path_in_class: str, seed: int) -> float:
    """``path_in_class`` and ``seed`` -> a number in [0, 1), fixed for them (sha256, not Python's hash)."""
    digest = hashlib.sha256(f"{seed}\0{path_in_class}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64


def _sides(whole: SplitListing, rule: dict) -> tuple[list[str], list[str]]:
    """Each record's side, and the notes on what the exceptions moved."""
    within = [printable_path(record.path).split("/", 1)[1] for record in whole.records]
    seed, fraction, folds, fold = rule["seed"], rule.get("valid_fraction"), rule.get("folds"), rule.get("fold")
    sides = [side(path, seed, fraction, folds, fold) for path in within]
    by_class: dict[int, list[int]] = {}
    for index, record in enumerate(whole.records):
        by_class.setdefault(record.label, []).append(index)
    alone, moved = [], []
    for label, rows in by_class.items():
        name = printable_path(whole.classes[label])
        if len(rows) == 1:
            sides[rows[0]] = "train"
            alone.append(name)
        elif fraction is not None and len({sides[i] for i in rows}) == 1:
            # all on one side: the image nearest the threshold crosses it
            nearest = min(rows, key=lambda i: abs(_position(within[i], seed) - fraction))
            sides[nearest] = "train" if sides[nearest] == "valid" else "valid"
            moved.append(f"{name} ({printable_path(whole.records[nearest].path)} to {sides[nearest]})")
    valid, total = sides.count("valid"), len(sides)
    notes = [f"the cut of {total} images: {total - valid} in train, {valid} in valid ({valid / total:.1%}); each "
             "image's side is its own hash's (adding images moves no other): small classes stray from the rule"]
    notes += [counted(alone, "class", "classes", "of one image kept in train (nothing to score it against)")] \
        if alone else []
    notes += [counted(moved, "class", "classes", "with every image on one side, one image moved")] if moved else []
    return sides, notes
