"""Crash-safe file output: write to a temporary file in the target folder, then rename.

``os.replace`` is atomic on POSIX and Windows when source and target are on the same file system,
so a reader (or a resumed run) sees either the old complete file or the new complete file, never a
half-written one. Whole folders: built aside and swapped in (``new_staging_folder``, ``swap_in_folder``,
``recover_folder_swap``), written by one process at a time (``folder_lock``).

A write that fails (full disk, no permission) leaves no temporary file and raises ``SKCDFWriteError`` whose message
names the path, the OS error and the free space on its disk (``write_error_message``), so that console scripts print
it instead of a traceback.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from typing import Iterator, List

from nnunetv2_skcdf.utilities.dataset_files import SKCDFInputError, SKCDFWriteError

#: errno values that mean "the disk (or the user's quota on it) is full"
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_NO_PERMISSION = {errno.EACCES, errno.EPERM, errno.EROFS}


def free_space(path: str) -> str:
    """Free space on the disk that holds ``path`` (or its closest existing parent), e.g. ``'96.0 KiB'``."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    try:
        free = float(shutil.disk_usage(existing).free)
    except OSError:
        return "unknown space"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if free < 1024:
            return f"{free:.0f} {unit}" if unit == "B" else f"{free:.1f} {unit}"
        free /= 1024
    return f"{free:.1f} TiB"


def write_error_message(path: str, error: BaseException) -> str:
    """``<path>: cannot be written, out of disk space (OSError: [Errno 28] ...); 96.0 KiB free on its disk. <fix>``.

    ``error`` is what the writer raised: an ``OSError`` says what happened (its errno); anything else (blosc2 raises
    ``RuntimeError: Error while creating the NDArray`` on a full disk) is a failed write, for which the free space is
    the first thing to look at."""
    errno_value = getattr(error, "errno", None) if isinstance(error, OSError) else None
    if errno_value in _DISK_FULL:
        what, fix = "out of disk space", "Free disk space there (or move the folder to a larger disk) and rerun."
    elif errno_value in _NO_PERMISSION:
        what, fix = "no permission", "Make the folder writable for you (or write elsewhere) and rerun."
    else:
        what, fix = "write failed", ("Free disk space (a full disk is the usual cause) or check the folder's "
                                     "permissions, and rerun.")
    return (f"{path}: cannot be written, {what} ({type(error).__name__}: {error}); {free_space(path)} free on its "
            f"disk. {fix}")


@contextmanager
def atomic_output(path: str, suffix: str | None = None) -> Iterator[str]:
    """Yield a temporary path next to ``path``; on success rename it to ``path``, on error delete it.

    ``suffix`` defaults to the extension of ``path`` (some writers, e.g. SimpleITK or blosc2, choose
    the format from the file name, so the temporary file keeps the real ending: ``.nii.gz`` etc.).
    An ``OSError`` of the writer or the rename becomes ``SKCDFWriteError`` (``write_error_message``); ``path`` is
    left as it was.
    """
    folder = os.path.dirname(os.path.abspath(path))
    if suffix is None:
        base = os.path.basename(path)
        suffix = base[base.index("."):] if "." in base else ""
    tmp = None
    try:
        try:
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=suffix, dir=folder)
            os.close(fd)
            os.remove(tmp)  # writers that refuse to overwrite (blosc2) must find the name free
            yield tmp
            os.replace(tmp, path)
        except OSError as e:
            if not _is_write_error(e, (tmp, path, folder)):
                raise  # e.g. an input file the caller reads inside the block: its own message
            shown = path if e.filename in (None, tmp) else e.filename
            raise SKCDFWriteError(write_error_message(shown, e)) from e
    finally:
        if tmp is not None and os.path.isdir(tmp) and not os.path.islink(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp is not None and os.path.lexists(tmp):
            os.remove(tmp)


def _is_write_error(error: OSError, own_paths) -> bool:
    """An OS error of writing (a full disk, or about one of ``own_paths``), not of reading an input file."""
    return error.errno in _DISK_FULL or error.filename is None or error.filename in own_paths


def atomic_save_json(obj, path: str, indent: int = 2) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (``sort_keys`` off: list order is meaningful)."""
    with atomic_output(path, suffix=".json") as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=indent)
            f.write("\n")


def read_json(path: str, fix: str, missing: str = "") -> object:
    """The JSON value in ``path``. A missing, unreadable or malformed file is refused with ``SKCDFInputError``
    naming the file and its fault, then ``fix`` (what to do about it); ``missing`` says, for a missing file, why it
    should be there."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise SKCDFInputError(f"{path} does not exist{': ' + missing if missing else ''}. {fix}") from None
    except json.JSONDecodeError as e:
        raise SKCDFInputError(f"{path} is not valid JSON ({e}). {fix}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SKCDFInputError(f"{path} cannot be read ({e}). {fix}") from None


# ------------------------------------------------------------------------------------- whole folders, one writer
@contextmanager
def folder_lock(folder: str, command: str) -> Iterator[None]:
    """Hold an exclusive lock for writing ``folder`` (``fcntl.flock`` on ``<parent>/.<name>.lock``).

    The lock file sits in the parent because ``folder`` itself may be swapped (``swap_in_folder``). A second process
    waits, saying which process holds the lock; the kernel releases a lock when its holder ends, even by SIGKILL, so
    no stale lock survives a crash. (No ``fcntl`` on Windows: there the lock is skipped.)
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    parent, name = os.path.split(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    path = os.path.join(parent, f".{name}.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            print(f"{folder} is being written by another {command} run (pid {holder}, lock {path}); waiting for it "
                  f"to finish ...", file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _aside(folder: str, kind: str, pid: int | None = None) -> str:
    parent, name = os.path.split(os.path.abspath(folder))
    return os.path.join(parent, f".{name}.{kind}-{os.getpid() if pid is None else pid}")


def new_staging_folder(folder: str) -> str:
    """An empty folder next to ``folder`` in which to build its replacement (then ``swap_in_folder``)."""
    staging = _aside(folder, "new")
    if os.path.isdir(staging):
        shutil.rmtree(staging)
    os.makedirs(staging)
    return staging


def swap_in_folder(staging: str, folder: str) -> None:
    """Replace ``folder`` by the complete ``staging``: rename the old folder aside, rename ``staging`` in, delete the
    old one. A crash between the two renames leaves the old folder aside, which ``recover_folder_swap`` puts back, so
    any interruption ends in either the old or the new folder, never in a mix."""
    old = _aside(folder, "old")
    if os.path.isdir(folder):
        os.rename(folder, old)
    os.rename(staging, folder)
    if os.path.isdir(old):
        shutil.rmtree(old)


def recover_folder_swap(folder: str) -> List[str]:
    """Undo what an interrupted build or swap left next to ``folder`` (call it holding ``folder_lock``): an old folder
    renamed aside goes back if ``folder`` is missing; staging folders and other leftovers are deleted. Returns the
    paths removed or restored."""
    parent, name = os.path.split(os.path.abspath(folder))
    if not os.path.isdir(parent):
        return []
    leftovers = sorted(os.path.join(parent, f) for f in os.listdir(parent)
                       if f.startswith((f".{name}.new-", f".{name}.old-")))
    olds = [p for p in leftovers if os.path.basename(p).startswith(f".{name}.old-")]
    if not os.path.isdir(folder) and olds:
        os.rename(olds[-1], folder)
    for path in leftovers:
        if os.path.isdir(path):
            shutil.rmtree(path)
    return leftovers
