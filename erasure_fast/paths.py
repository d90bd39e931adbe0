"""Paths: expansion of ``~`` and environment variables (once, where a path enters), output folders
(one check, shared by scans, the paper's analyses and the benchmark) and atomic file writes."""

from __future__ import annotations

import os
from typing import Callable, Optional


class OutputDirError(ValueError):
    """An output folder that cannot be used (a file, not writable, locked by another scan, or holding
    files a scan did not write)."""


def expand_path(path):
    """``path`` (str or os.PathLike) as a str with ``~`` and ``$VARS`` expanded; anything else is
    returned as it is (for the caller's own type check). Every public function that takes a path
    calls this once, where the path enters, so '~/x' means the same folder to every file a job writes
    (pandas and matplotlib expand '~' themselves, os.makedirs does not)."""
    if isinstance(path, (str, os.PathLike)):
        return os.path.expandvars(os.path.expanduser(os.fspath(path)))
    return path


def check_output_dir(path, name: str = "out_dir", *, create: bool = True) -> str:
    """``path`` (expanded, `expand_path`) as a folder a job can write to; raises OutputDirError
    (TypeError for a non-path) whose message starts with ``name`` (the argument or flag). With
    ``create`` the folder is made now; without, only its nearest existing ancestor must be a writable
    folder (a refused job then leaves no trace)."""
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise TypeError(f"{name}: expected a folder path, got {path!r}")
    path = expand_path(path)
    if create:  # make it first: another process (a second rank) may be making it at the same moment
        try:
            os.makedirs(path, exist_ok=True)
        except FileExistsError:
            pass  # a file (or a dangling link) of that name: said below
        except OSError as e:
            raise OutputDirError(f"{name}: {path!r} cannot be created ({e.strerror or e})") from None
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise OutputDirError(f"{name}: {path!r} exists and is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise OutputDirError(f"{name}: {path!r} is not writable")
        return path
    if os.path.lexists(path):
        raise OutputDirError(f"{name}: {path!r} is a dangling symbolic link")
    ancestor = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise OutputDirError(f"{name}: {path!r} cannot be created, {ancestor!r} is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputDirError(f"{name}: {path!r} cannot be created, {ancestor!r} is not writable")
    return path


def temp_name(path: str) -> str:
    """The fixed temporary file `atomic_write` uses for ``path`` by default: ``.tmp-<name>`` beside it
    (the extension kept, which tells pandas and matplotlib the format)."""
    folder, name = os.path.split(path)
    return os.path.join(folder, f".tmp-{name}")


def atomic_write(path: str, write: Callable[[str], object], *, temp: Optional[str] = None,
                 durable: bool = False) -> str:
    """Call ``write(temp)`` and rename the result to ``path``: readers see the old file or the new one,
    never half of one. ``temp`` defaults to `temp_name` (one writer per path at a time); ``durable``
    also flushes the file and the rename to disk (fsync). An OSError (a full disk, a folder that went
    away) is raised again naming ``path``; the temporary file never outlives the call."""
    temp = temp or temp_name(path)
    try:
        write(temp)
        if durable:
            fd = os.open(temp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(temp, path)
        if durable:
            dfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
            try:
                os.fsync(dfd)  # make the rename itself durable
            finally:
                os.close(dfd)
    except OSError as e:
        error = OSError(f"cannot write {path} ({e.strerror or e})")
        error.errno = e.errno
        raise error from None
    finally:
        if os.path.lexists(temp):
            os.unlink(temp)
    return path
