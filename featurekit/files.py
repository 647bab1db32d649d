"""Files that are whole or absent, outputs that never land on inputs, and one writer at a time.

Every file featurekit writes goes through :func:`atomic_output`: it is written under a temporary
name beside its target, fsynced, and renamed over the target, so a reader (or a rerun after a
crash) sees the old file, the new one, or none, never a cut one. :func:`check_output` and
:func:`check_output_folder` are the one rule of which paths a run may write (never one of its
inputs, a folder, a device or a FIFO). :class:`FileLock` keeps two processes from writing the
same output; :func:`folder_lock` is the lock of an output folder (train-head's, finetune's).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import hashlib
import os
import signal
import socket
import stat
import time
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator, Sequence

from .errors import LockError, SettingsError, WriteError, os_reason

__all__ = ["FileLock", "atomic_output", "atomic_write", "check_output", "check_output_folder", "crash_point",
           "file_sha256", "folder_lock", "fsync_dir", "hdf5_output", "lock_holder", "output_handle", "temporary_name",
           "temporary_prefix"]

# Testing hooks at the points of a commit protocol: FEATUREKIT_CRASH_AT=<point>[:<n>] SIGKILLs the
# process the n-th time it reaches <point>, so tests can stop a real extraction exactly there;
# FEATUREKIT_PAUSE_AT=<dir>:<point>[,<point>...] makes it create <dir>/<point>.<pid> on arrival and
# wait there until <dir>/<point>.go exists, so tests can line processes up (shards joining at once).
CRASH_ENV = "FEATUREKIT_CRASH_AT"
PAUSE_ENV = "FEATUREKIT_PAUSE_AT"
PAUSE_LIMIT_S = 120  # a test that died must not leave its children waiting forever
_crash_counts: dict[str, int] = {}

NAME_MAX = 255  # bytes in one file name (Linux, macOS, and most file systems)
# ".tmp-HOST-PID": a host name has at most 64 bytes (HOST_NAME_MAX), a pid at most 10 digits
TEMPORARY_SUFFIX_MAX = len(".tmp-") + 64 + 1 + 10
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"  # how stores and head files begin


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
    part of the name: processes of a cluster writing into one shared folder may have equal pids.
    Within :data:`NAME_MAX` bytes whatever the name's length (:func:`temporary_prefix`)."""
    return path.with_name(f"{temporary_prefix(path)}{socket.gethostname()[:64]}-{os.getpid()}")


def temporary_prefix(path: Path) -> str:
    """What every temporary name of ``path`` begins with (``.<name>.tmp-``; a name too long for that is
    cut and told apart by its hash: ``.<start of name>~<sha256[:8]>.tmp-``), the same on every host."""
    room = NAME_MAX - TEMPORARY_SUFFIX_MAX - 1
    name = os.fsencode(path.name)
    if len(name) > room:
        name = name[:room - 9] + b"~" + hashlib.sha256(name).hexdigest()[:8].encode()
    return f".{os.fsdecode(name)}.tmp-"


def remove_stale_temporaries(path: Path) -> int:
    """Delete the temporaries of ``path`` left by processes of this host that are gone (killed while
    writing it); a live process's, or another host's, are kept. Returns how many were deleted."""
    prefix, host = temporary_prefix(path), socket.gethostname()[:64]
    removed = 0
    for leftover in path.parent.glob(glob.escape(prefix) + "*"):
        owner, _, pid = leftover.name[len(prefix):].rpartition("-")
        if owner == host and pid.isdigit() and not _alive(int(pid)):
            leftover.unlink(missing_ok=True)
            removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, what: str = "cannot write", hint: str = "",
                  crash_at: str | None = None, tidy: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s content to; then fsync it and rename it into place.

    If the block fails the temporary file is deleted and ``path`` is untouched; OS errors become a
    one-line :class:`WriteError`: ``<path>: <what> (<reason>)<hint>`` (``hint``: what was kept, what to do).
    ``crash_at`` names the :func:`crash_point` between the fsync and the rename. ``tidy``: first delete
    the temporaries of ``path`` that killed processes left (:func:`remove_stale_temporaries`; a
    protocol that counts them itself, as the store's chunks do, passes False).
    """
    path = Path(path)
    temporary = temporary_name(path)
    try:
        if tidy:
            remove_stale_temporaries(path)
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


@contextlib.contextmanager
def output_handle(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """``path`` opened for writing (and reading back), unbuffered, for libraries that write through a
    file object (``torch.save``, ``h5py.File``): an OS error of theirs (a full disk) comes out as that
    :class:`OSError` even where the library turns it into its own error (torch's ``RuntimeError``),
    and h5py never holds data it could not write (on a full disk its own file driver leaves objects
    whose cleanup crashes the process)."""
    with open(path, "w+b", buffering=0) as raw:
        handle = _Remembering(raw)
        try:
            yield handle  # type: ignore[misc]
        except Exception:
            if handle.error is not None:
                raise handle.error from None
            raise


class _Remembering:
    """A raw file whose ``write`` writes every byte or raises, remembering the OS error."""

    def __init__(self, raw: BinaryIO):
        self.raw, self.error = raw, None

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        size = view.nbytes
        try:
            while view:
                view = view[self.raw.write(view):]
        except OSError as error:
            self.error = error
            raise
        return size

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)


@contextlib.contextmanager
def hdf5_output(path: str | os.PathLike, what: str = "cannot write", hint: str = "",
                crash_at: str | None = None) -> Iterator[Any]:
    """An ``h5py.File`` to write ``path``'s content into, through :func:`atomic_output` and
    :func:`output_handle`: whole or absent, a full disk one line."""
    import h5py

    with atomic_output(path, what, hint, crash_at) as temporary, output_handle(temporary) as handle, \
            h5py.File(handle, "w") as h5:
        yield h5


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


# --------------------------------------------------------------------------- where outputs may go


def check_output(path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (), *, flag: str = "--out",
                 side_suffixes: Sequence[str] = (), hdf5: bool = False, overwrite: bool = True) -> Path:
    """``path`` as a file a run may write (replace), or a one-line error naming ``flag``: the one rule
    of what an output may be, which every command that writes passes before any work.

    Refused (:class:`SettingsError`): an empty name, a name over :data:`NAME_MAX` bytes, an existing
    folder, device, FIFO or socket (anything but a regular file: the output replaces it by a new
    file), any of ``inputs`` (the run's input files, also under another name or link; its input
    folders, such as image folders: anything inside them), and, unless the output is itself HDF5
    (``hdf5``), an existing HDF5 file (a store or a head). ``overwrite=False``: an existing ``path`` is
    refused too (:class:`WriteError`, "pass --overwrite"); it otherwise stays whole until
    :func:`atomic_output` renames its successor over it. ``side_suffixes``: the files written beside
    it, named ``<name><suffix>`` (``predictions.csv.json``), checked alike. Returns ``Path(path)``.
    """
    if not os.fspath(path):
        raise SettingsError(f"{flag} is empty: give a file name")
    path = Path(path)
    files, folders = _inputs(inputs)
    for target in [path, *(path.with_name(path.name + suffix) for suffix in side_suffixes if path.name)]:
        problem = _output_problem(target, files, folders, hdf5)
        if problem:
            raise SettingsError(f"{target}: {problem}; give another {flag}")
        if not overwrite and target == path and (target.exists() or target.is_symlink()):
            raise WriteError(f"{target}: exists; pass --overwrite to replace it")
    return path


def check_output_folder(folder: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (),
                        flag: str = "--out") -> Path:
    """``folder`` as a folder a run may write into (created if absent), or a one-line :class:`SettingsError`:
    an empty name, an existing file that is not a folder, and a folder inside an input folder of the
    run (``inputs``, as :func:`check_output` takes them) are refused. Returns ``Path(folder)``."""
    if not os.fspath(folder):
        raise SettingsError(f"{flag} is empty: give a folder")
    folder = Path(folder)
    problem = None
    if folder.exists() and not folder.is_dir():
        problem = f"not a folder ({_kind(folder.stat().st_mode)})"
    else:
        problem = _inside(folder, _inputs(inputs)[1])
    if problem:
        raise SettingsError(f"{folder}: {problem}; give another {flag}")
    return folder


def _inputs(inputs: Iterable[str | os.PathLike]) -> tuple[dict[tuple[int, int], Path], list[Path]]:
    """The existing inputs: files by (device, inode), folders resolved."""
    files, folders = {}, []
    for entry in map(Path, inputs):
        try:
            status = entry.stat()
        except (OSError, ValueError):
            continue
        if stat.S_ISDIR(status.st_mode):
            folders.append(entry.resolve())
        else:
            files[(status.st_dev, status.st_ino)] = entry
    return files, folders


def _output_problem(path: Path, files: dict, folders: list[Path], hdf5: bool) -> str | None:
    if len(os.fsencode(path.name)) > NAME_MAX:
        return f"file name too long ({len(os.fsencode(path.name))} bytes; at most {NAME_MAX})"
    try:
        status = path.stat()
    except FileNotFoundError:
        status = None
    except OSError as error:
        return os_reason(error)
    if status is not None and stat.S_ISDIR(status.st_mode) or not path.name:
        return "a folder, not a file"
    if status is not None and not stat.S_ISREG(status.st_mode):
        return f"not a regular file ({_kind(status.st_mode)}); the output would replace it by a new file"
    if status is not None and (status.st_dev, status.st_ino) in files:
        return f"an input of this run ({files[(status.st_dev, status.st_ino)]}), which the output would replace"
    inside = _inside(path, folders)
    if inside:
        return inside
    if status is not None and not hdf5 and _starts_with(path, HDF5_SIGNATURE):
        return "an HDF5 file (a feature store or a head?), which the output would replace"
    return None


def _inside(path: Path, folders: list[Path]) -> str | None:
    resolved = path.resolve()
    folder = next((f for f in folders if f == resolved or f in resolved.parents), None)
    return f"inside {folder}, an input folder of this run" if folder else None


def _kind(mode: int) -> str:
    kinds = [(stat.S_ISREG, "a file"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"),
             (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")]
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def _starts_with(path: Path, signature: bytes) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(len(signature)) == signature
    except OSError:
        return False


def folder_lock(folder: str | os.PathLike) -> "FileLock":
    """The lock of an output folder that one command writes as a whole (train-head's, finetune's):
    ``.<folder name>.lock`` beside it (so that taking it creates nothing inside), removed on release."""
    resolved = Path(folder).resolve()
    return FileLock(resolved.with_name(f".{resolved.name}.lock"), str(folder))


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
