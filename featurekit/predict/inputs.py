"""What ``featurekit predict`` reads: image files, plain folders and labelled folders.

The rule, for each PATH given:

- a file is classified as given;
- a folder whose subfolders are all named after classes of the head is a **labelled folder**
  ``<folder>/<class>/<image>`` (a split folder such as ``data/valid``). It is listed exactly as
  ``extract`` lists a split (:func:`featurekit.images.list_split`: images below each class folder,
  hidden entries and repeated links left out, and said so); each image's true class is its class
  folder, so predict can report accuracy;
- any other folder: only the images directly in it. A folder is never searched recursively: its
  subfolders, files without an image extension and hidden entries are left out, each kind in one
  notice line, and a subfolder given as a PATH of its own is classified;
- ``@FILE`` (``predict --list FILE``; ``@-``: standard input): the files a list names
  (:func:`featurekit.images.lists.read_list`: paths, or a CSV ``path[,label]`` whose labels are the
  true classes); a listed file that does not exist is reported as skipped, with its line number.

An HDF5 file (a feature store) is refused: ``predict --features FEATURES --split SPLIT`` scores stores.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..errors import DataError
from ..images.listing import is_dir, is_image_name, list_split
from ..images.lists import is_list_reference, read_list
from ..images.names import NAMES_SHOWN, counted, printable_path

__all__ = ["Inputs", "collect_inputs"]


@dataclass
class Inputs:
    """The files to classify, in order: ``files`` (what to read: an OS path, or for a listed file that
    does not exist an :class:`~featurekit.images.decode.Unavailable`; printable name); ``truth``: the true
    class name of each file from a labelled folder, else None; ``notices``: one line per kind of
    entry left out; ``labelled``: the labelled folders, printable."""

    files: list[tuple[str, str]] = field(default_factory=list)
    truth: list[str | None] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    labelled: list[str] = field(default_factory=list)


def collect_inputs(paths: Sequence[str | os.PathLike], classes: Sequence[str]) -> Inputs:
    """The files ``paths`` stand for, under the rule above; ``classes``: the head's class names.
    Raises :class:`DataError` for a path that does not exist, or when no image is found at all."""
    found = Inputs()
    for given in paths:
        if is_list_reference(given):
            _add_list(found, str(given)[1:], classes)
            continue
        path = Path(given)
        if path.suffix.lower() in (".h5", ".hdf5") and path.is_file():
            raise DataError(f"{printable_path(str(path))}: an HDF5 file (a feature store?), not an image; score the "
                            "stores of a split with --features FEATURES --split SPLIT")
        if path.is_dir():
            _add_folder(found, path, classes)
        elif path.exists():
            found.files.append((str(path), printable_path(str(path))))
            found.truth.append(None)
        else:
            raise DataError(f"{printable_path(str(path))}: no such file or folder")
    if not found.files:
        raise DataError(f"no image files in {', '.join(printable_path(str(p)) for p in paths)}"
                        + "".join(f"; {line}" for line in found.notices))
    return found


def _add_folder(found: Inputs, folder: Path, classes: Sequence[str]) -> None:
    shown = printable_path(str(folder))
    with os.scandir(folder) as scan:
        entries = sorted(scan, key=lambda entry: os.fsencode(entry.name))
    visible = [e for e in entries if not e.name.startswith(".")]
    subfolders = [e.name for e in visible if is_dir(e)]
    if subfolders and {printable_path(name) for name in subfolders} <= set(classes):  # as heads record them
        _add_labelled(found, folder)
        return
    images = [e for e in visible if not is_dir(e) and is_image_name(e.name)]
    found.files += [(e.path, f"{shown}/{printable_path(e.name)}") for e in images]
    found.truth += [None] * len(images)
    if subfolders:
        strangers = [printable_path(name) for name in subfolders if printable_path(name) not in classes]
        named = counted([printable_path(name) for name in subfolders], "subfolder", "subfolders", "not searched")
        found.notices.append(f"{shown}: {named} (not a labelled folder <class>/<image>: the head has no class "
                             f"{', '.join(strangers[:NAMES_SHOWN])}{' ...' if len(strangers) > NAMES_SHOWN else ''}; "
                             "give a subfolder as a PATH to classify its images)")
    others = [printable_path(e.name) for e in visible if not is_dir(e) and not is_image_name(e.name)]
    if others:
        found.notices.append(f"{shown}: {counted(others, 'file', 'files', 'without an image extension ignored')}")
    hidden = [printable_path(e.name) for e in entries if e.name.startswith(".") and e.name != ".DS_Store"]
    if hidden:
        found.notices.append(f"{shown}: {counted(hidden, 'hidden entry', 'hidden entries', 'ignored')}")


def _add_list(found: Inputs, list_file: str, classes: Sequence[str]) -> None:
    listing = read_list(list_file)
    found.files += listing.files()
    truth = [listing.classes[record.label] if listing.labelled else None for record in listing.records]
    strangers = [name for name in truth if name is not None and name not in classes]
    found.truth += [name if name in classes else None for name in truth]
    found.notices += listing.notices() + ([f"{listing.display}: {len(strangers)} rows of classes the head does not "
                                          f"have are not scored ({', '.join(sorted(set(strangers))[:NAMES_SHOWN])})"]
                                          if strangers else [])
    if listing.labelled:
        found.labelled.append(listing.display)


def _add_labelled(found: Inputs, folder: Path) -> None:
    folder = folder if folder.name not in ("", "..") else folder.resolve()
    listing = list_split(folder.parent, folder.name)
    found.files += listing.files()
    found.truth += [printable_path(listing.classes[record.label]) for record in listing.records]
    found.notices += listing.notices()
    found.labelled.append(listing.display_dir)
