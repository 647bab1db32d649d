"""Files that are whole or absent, and one writer at a time.

Every file featurekit writes goes through :func:`atomic_output`: it is written under a temporary
name beside its target, fsynced, and renamed over the target, so a reader (or a rerun after a
crash) sees the old file, the new one, or none, never a cut one. :class:`FileLock` keeps two
processes from writing the same output.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import signal
import socket
import time
from pathlib import Path
from typing import Iterator

from .errors import LockError, WriteError, os_reason

# Testing hooks at the points of a commit protocol: FEATUREKIT_CRASH_AT=<point>[:<n>] SIGKILLs the
# process the n-th time it reaches <point>, so tests can stop a real extraction exactly there;
# FEATUREKIT_PAUSE_AT=<dir>:<point>[,<point>...] makes it create <dir>/<point>.<pid> on arrival and
# wait there until <dir>/<point>.go exists, so tests can line processes up (shards joining at once).
CRASH_ENV = "FEATUREKIT_CRASH_AT"
PAUSE_ENV = "FEATUREKIT_PAUSE_AT"
PAUSE_LIMIT_S = 120  # a test that died must not leave its children waiting forever
_crash_counts: dict[str, int] = {}




def crash_point(point: str) -> None:
    """A point of a commit protocol, where the testing hooks (CRASH_ENV, PAUSE_ENV) act."""
    _pause(point)
    wanted = os.environ.get(CRASH_ENV)
    if not wanted or wanted.partition(":")[0] != point:
        return
    _crash_counts[point] = _crash_counts.get(point, 0) + 1
    if _crash_counts[point] == int(wanted.partition(":")[2] or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def _pause(point: str) -> None:
    folder, _, points = os.environ.get(PAUSE_ENV, "").rpartition(":")
    if not folder or point not in points.split(","):
        return
    Path(folder, f"{point}.{os.getpid()}").touch()
    deadline = time.monotonic() + PAUSE_LIMIT_S
    while not Path(folder, f"{point}.go").exists() and time.monotonic() < deadline:
        time.sleep(0.02)


def temporary_name(path: Path) -> Path:
    """Where ``path`` is written before its rename: hidden, and owned by this process. The host is
    part of the name: processes of a cluster writing into one shared folder may have equal pids."""
    return path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, what: str = "cannot write", hint: str = "",
                  crash_at: str | None = None) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s content to; then fsync it and rename it into place.

    If the block fails the temporary file is deleted and ``path`` is untouched; OS errors become a
    one-line :class:`WriteError`: ``<path>: <what> (<reason>)<hint>`` (``hint``: what was kept, what to do).
    ``crash_at`` names the :func:`crash_point` between the fsync and the rename.
    """
    path = Path(path)
    temporary = temporary_name(path)
    try:
        yield temporary
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        if crash_at:
            crash_point(crash_at)
        os.replace(temporary, path)
        fsync_dir(path.parent)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise WriteError(f"{path}: {what} ({os_reason(error)}){hint}") from None
        raise


def check_output_path(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """``path`` as an output that may be written: the one check every output of export and predict passes
    before any work (rules on what an output may replace belong here). An existing file is refused
    unless ``overwrite``; it then stays whole until :func:`atomic_output` renames its successor over it."""
    path = Path(path)
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise WriteError(f"{path}: exists; pass --overwrite to replace it")
    return path


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` through :func:`atomic_output`."""
    with atomic_output(path) as temporary:
        Path(temporary).write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (the directory entry, not only the file's data)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)



class FileLock:
    """An exclusive, non-blocking lock: a ``flock`` on ``path``, which is removed on release.

    ``owner`` is what the lock protects, named in the refusal. The lock file is opened with
    ``O_NOFOLLOW`` (a planted symbolic link is refused, its target never written). Since every
    holder removes the file before it unlocks, a process that opened the old file re-checks,
    once it holds the lock, that the path still names the file it locked, and retries if not.
    flock is advisory and may not work on NFS. ``wait``: seconds to keep trying while another
    process holds it (for locks held only for a moment), 0: refuse at once.
    """

    def __init__(self, path: str | os.PathLike, owner: str, wait: float = 0.0):
        self.path = Path(path)
        self.owner = owner
        self.wait = wait
        self._descriptor: int | None = None

    def __enter__(self) -> "FileLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.wait
        while self._descriptor is None:
            descriptor = self._open()
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(descriptor, 64).decode(errors="replace").strip() or "?"
                os.close(descriptor)
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                raise LockError(f"{self.owner}: another featurekit process (pid {holder}) is writing it") from None
            if self._still_named(descriptor):
                self._descriptor = descriptor
            else:  # its previous holder removed it between our open and our flock
                os.close(descriptor)
        os.ftruncate(self._descriptor, 0)
        os.write(self._descriptor, str(os.getpid()).encode())
        return self

    def __exit__(self, *exc) -> None:
        if self._descriptor is not None:
            self.path.unlink(missing_ok=True)
            fcntl.flock(self._descriptor, fcntl.LOCK_UN)
            os.close(self._descriptor)
            self._descriptor = None

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise LockError(f"{self.path}: lock file is a symbolic link; refusing to follow it (remove it)"
                                ) from None
            raise

    def _still_named(self, descriptor: int) -> bool:
        try:
            current = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return False
        opened = os.fstat(descriptor)
        return (current.st_dev, current.st_ino) == (opened.st_dev, opened.st_ino)


def lock_holder(path: str | os.PathLike) -> str | None:
    """Who holds the :class:`FileLock` at ``path``: its pid as the holder wrote it, or None when no process
    holds it (the file is a leftover, or absent). Only looks: the file is neither created nor removed."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(descriptor, fcntl.LOCK_UN)
        return None
    except BlockingIOError:
        return os.read(descriptor, 64).decode(errors="replace").strip() or "?"
    finally:
        os.close(descriptor)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
