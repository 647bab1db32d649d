"""``featurekit du`` and ``clean``: the disk a features folder takes, and its leftovers removed safely.

:func:`disk_usage` lists every store, head, model, partial chunk folder, lock and temporary file
under the paths, with its size and age (since it was last written), and what ``clean`` would do.

:func:`clean` removes, under each store's lock (a store whose lock another process holds, a
running extraction, is left alone and said so):

- the partial chunks of a run whose store is complete (the chunks are that very store's: its
  fingerprint), and store temporaries of a killed join;
- with ``older_than``, also the partial chunks of an unfinished run not written to for that long
  (shards of ``--shard I/N`` commit without holding the lock, so their age is what protects them);
- lock files no process holds (taking the lock and letting it go removes the file);
- other temporary files (``.<name>.tmp-HOST-PID`` of a killed writer) older than ``older_than``.

A complete store, a head file or a model file is removed only when named itself (a store under
its lock, with its leftovers); a folder given is searched for leftovers only.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Sequence

from ..errors import LockError
from ..files import lock_holder
from ..store.chunks import PartialStore, store_lock
from ..store.format import read_header
from .artifacts import CLASSIFIERS, LEFTOVERS, Artifact, find_artifacts
from .settings import CleanSettings

__all__ = ["clean", "disk_usage"]

EVERYTHING = ("store", *CLASSIFIERS, *LEFTOVERS)


def disk_usage(paths: Sequence[str | os.PathLike], now: float | None = None) -> list[str]:
    """One line per artifact under ``paths``: kind, size, age, path and what it is; then the totals."""
    now = time.time() if now is None else now
    lines, totals = [], {}
    for artifact in find_artifacts(paths, EVERYTHING, empty_ok=True):
        size, written = _size_and_time(artifact.path)
        totals[artifact.kind] = [a + b for a, b in zip(totals.get(artifact.kind, [0, 0]), [1, size])]
        lines.append(f"{artifact.kind:<9} {_bytes(size):>9} {_age(now - written):>9}  {artifact.path}"
                     f"{_about(artifact)}")
    sizes = ", ".join(f"{count} {kind}{'s' if count > 1 else ''} {_bytes(size)}" for kind, (count, size)
                      in totals.items())
    lines.append(f"total {_bytes(sum(size for _, size in totals.values()))}: {sizes}")
    return lines


def clean(paths: Sequence[str | os.PathLike], settings: CleanSettings | None = None,
          now: float | None = None) -> list[str]:
    """Remove the leftovers under ``paths`` by the rules above (named stores, heads and models too);
    returns one line per thing removed (or, ``dry_run``, that would be) or left alone, then a total."""
    settings, now = settings or CleanSettings(), time.time() if now is None else now
    lines, freed = [], 0
    found = find_artifacts(paths, EVERYTHING, empty_ok=True)
    for artifact in sorted(found, key=lambda a: a.kind != "lock"):  # a lock taken for its partial would go unsaid
        if (artifact.kind in ("store", *CLASSIFIERS) and not artifact.named) or not os.path.lexists(artifact.path):
            continue  # kept; or gone with the partial before it (its lock)
        size, written = _size_and_time(artifact.path)
        old = settings.older_than is not None and now - written > settings.older_than
        reason = _removal(artifact, old, settings.dry_run)
        if reason is not None:
            verb = "would remove" if settings.dry_run else "removed"
            lines.append(f"{verb} {artifact.path} ({_bytes(size)}; {reason})")
            freed += size
        elif artifact.kind in LEFTOVERS:
            holder = lock_holder(_lock_of(artifact)) if artifact.store else None
            kept = (f"in use by pid {holder}" if holder else "an unfinished run's" if artifact.store else
                    f"written {_age(now - written)} ago") + ("" if holder else ": give --older-than to remove it")
            lines.append(f"kept {artifact.path} ({kept})")
    lines.append(f"{'would free' if settings.dry_run else 'freed'} {_bytes(freed)}")
    return lines


def _removal(artifact: Artifact, old: bool, dry_run: bool) -> str | None:
    """Why ``artifact`` goes (removing it unless ``dry_run``), or None if it stays."""
    final = artifact.store
    if artifact.kind in CLASSIFIERS:
        if not dry_run:
            artifact.path.unlink()
        return "named"
    if final is None:  # a temporary of another output: only its age tells that its writer is gone
        if old and not dry_run:
            artifact.path.unlink(missing_ok=True)
        return "a killed writer's temporary file" if old else None
    if dry_run:  # look only: taking the lock would remove a leftover lock file
        return None if lock_holder(_lock_of(artifact)) else _reason(artifact, final, old)
    try:
        with store_lock(final):  # a running extraction holds it: never touched
            reason = _reason(artifact, final, old)
            if reason is not None and artifact.kind in ("store", "partial", "temporary"):
                partial = _partial(final)
                if artifact.kind == "store":
                    final.unlink()
                if artifact.kind != "temporary":
                    partial.discard()
                partial.remove_temporaries(chunks=False)
            return reason  # a lock file goes as the lock is let go
    except LockError:
        return None


def _reason(artifact: Artifact, final: Path, old: bool) -> str | None:
    """Why a store's leftover (or the store, named) may go, its lock free; None: it stays."""
    if artifact.kind == "store":
        return "named"
    if artifact.kind == "partial":
        if final.is_file() and _partial(final).holds():
            return "its store is complete"
        return "unfinished, not written to for --older-than" if old else None
    return "a killed join's store temporary" if artifact.kind == "temporary" else "a lock no process holds"


def _partial(final: Path) -> PartialStore:
    """The chunks of ``final``, for the fingerprint of the store there (if any)."""
    return PartialStore(final, read_header(final).fingerprint if final.is_file() else "")


def _lock_of(artifact: Artifact) -> Path:
    final = artifact.store
    return final.with_name(f".{final.stem}.lock")


def _about(artifact: Artifact) -> str:
    """What ``du`` says of an artifact beyond its size and age."""
    if artifact.kind == "lock":
        holder = lock_holder(artifact.path)
        return f"  (held by pid {holder})" if holder else "  (no process holds it: clean removes it)"
    if artifact.kind == "partial":
        final, partial = artifact.store, _partial(artifact.store)
        holder = lock_holder(_lock_of(artifact))
        state = (f"being written by pid {holder}" if holder else "of the complete store: clean removes them"
                 if final.is_file() and partial.holds() else "an unfinished run: rerun it, or clean --older-than")
        return f"  ({len(partial.committed())} chunks, {state})"
    if artifact.kind == "store":
        header = read_header(artifact.path)
        return f"  ({header.backbone}, split {header.split}, {header.n_listed} images listed)"
    return ""


def _size_and_time(path: Path) -> tuple[int, float]:
    """Bytes under ``path`` (a file or a folder) and when any of it was last written."""
    if not path.is_dir():
        info = path.lstat()
        return info.st_size, info.st_mtime
    size, written = 0, path.lstat().st_mtime
    for folder, _, files in os.walk(path):
        for name in files:
            with_info = os.lstat(os.path.join(folder, name))
            size, written = size + with_info.st_size, max(written, with_info.st_mtime)
    return size, written


def _bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def _age(seconds: float) -> str:
    for unit, length in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= length:
            return f"{seconds / length:.1f} {unit}"
    return f"{max(seconds, 0):.0f} s"
