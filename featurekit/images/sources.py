"""Where a split's images come from, as extract, predict and verify name them: one place that decides.

- a folder ``root/<split>/<class>/<image>`` (or ``root/<split>/<image>``: unlabelled), :mod:`.listing`;
- a class folder without splits ``root/<class>/<image>`` cut by ``--valid-fraction`` or
  ``--folds/--fold`` into train and valid, :mod:`.splits`;
- a list of files (``--list FILE``, ``-`` for standard input), :mod:`.lists`;
- WebDataset tar shards (a ``.tar`` pattern, a URL), :mod:`.shards`.

:class:`SourceSettings` holds the options (torch-free, for the command line); :func:`list_sources`
lists the splits of a run; :func:`relist` lists a store's split again from what it recorded
(``StoreHeader.listing_rule``: None for a split folder), for ``verify``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..errors import SettingsError
from ..options import setting
from .listing import SplitListing, list_split
from .lists import read_list
from .names import fs_path, printable_path
from .shards import is_shard_pattern, list_shards
from .splits import check_rule, cut_class_folder

__all__ = ["SourceSettings", "list_sources", "relist"]


@dataclass(frozen=True)
class SourceSettings:
    """How the rows of a run's splits are listed, beyond ``root/<split>/<class>/<image>``."""

    valid_fraction: float | None = setting(None, "DATA_ROOT is a class folder without splits (<class>/<image>): cut "
                                           "it into train and valid, this fraction of each class in valid, by a "
                                           "seeded hash of each image's path (adding images moves no other)",
                                           metavar="F", help_default="DATA_ROOT has split folders")
    split_seed: int = setting(0, "seed of the train/valid cut of --valid-fraction and --folds")
    folds: int | None = setting(None, "cut the class folder into K folds (cross-validation): --fold I is valid, the "
                                "others train", metavar="K", help_default="no folds")
    fold: int | None = setting(None, "which fold of --folds is valid, from 0", metavar="I",
                               help_default="none")
    list_file: str | None = setting(None, "a list of image files instead of a folder: paths one per line, or a CSV "
                                    "with path[,label] columns; paths relative to the list's folder; - reads "
                                    "standard input", flag="--list", metavar="FILE", help_default="none")
    label_key: str | None = setting(None, "WebDataset shards: the label is this field of each sample's .json",
                                    metavar="KEY", help_default="the .cls member")

    def __post_init__(self) -> None:
        check_rule(self.valid_fraction, self.folds, self.fold)

    @property
    def cuts(self) -> bool:
        """Whether the source is a class folder to cut into train and valid."""
        return self.valid_fraction is not None or self.folds is not None


def list_sources(root: str | os.PathLike | None, splits: Sequence[str],
                 options: SourceSettings | None = None) -> list[SplitListing]:
    """The listing of each split of ``root`` (a folder or a shard pattern; None with ``options.list_file``)."""
    options = options or SourceSettings()
    if options.list_file is not None:
        if root is not None or len(splits) != 1:
            raise SettingsError(f"--list {options.list_file} is one split: give it one --split name and no DATA_ROOT")
        return [read_list(options.list_file, splits[0])]
    if root is None:
        raise SettingsError("no images given: a DATA_ROOT folder, a shard pattern, or --list FILE")
    if is_shard_pattern(root):
        if len(splits) != 1 or options.cuts:
            raise SettingsError(f"{printable_path(str(root))}: shards are one split; give one --split name "
                                "(and no --valid-fraction or --folds)")
        return [list_shards(str(root), splits[0], options.label_key)]
    if options.label_key is not None:
        raise SettingsError("--label-key reads the labels of WebDataset shards; DATA_ROOT is a folder")
    if options.cuts:
        return cut_class_folder(root, splits, options.split_seed, options.valid_fraction, options.folds, options.fold)
    return [list_split(root, split) for split in splits]


def relist(source: dict | None, data_root: str, split: str, moved_to: str | os.PathLike | None = None) -> SplitListing:
    """List a store's split again as it was listed: ``source`` and ``data_root`` as the store recorded them
    (printable), ``moved_to``: where that folder (or list's folder, or shards' folder) is now."""
    root = Path(moved_to) if moved_to is not None else Path(fs_path(data_root))
    if source is None:
        return list_split(root, split)
    kind = source.get("kind")
    if kind == "class-folder":
        return cut_class_folder(root, [source["part"]], source["seed"], source.get("valid_fraction"),
                                source.get("folds"), source.get("fold"))[0]
    if kind == "list":
        if source["list"] == "-":
            raise SettingsError("its rows were listed from standard input: there is no list to read again")
        recorded = Path(fs_path(source["list"]))
        return read_list(root / recorded.name if moved_to is not None else recorded, split)
    if kind == "webdataset":
        pattern = source["pattern"]
        if moved_to is not None:
            pattern = str(Path(moved_to) / os.path.relpath(fs_path(pattern), fs_path(data_root)))
        return list_shards(pattern, split, source.get("label_key"))
    raise SettingsError(f"a listing rule this featurekit does not know ({kind!r}): upgrade featurekit")
