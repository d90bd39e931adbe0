"""Output folders: one check, shared by scans, the paper's analyses and the benchmark."""

from __future__ import annotations

import os


class OutputDirError(ValueError):
    """An output folder that cannot be used (a file, not writable, or locked by another scan)."""


def check_output_dir(path, name: str = "out_dir", *, create: bool = True) -> str:
    """``path`` as a folder a job can write to; raises OutputDirError (TypeError for a non-path)
    whose message starts with ``name`` (the argument or flag). With ``create`` the folder is made
    now; without, only its nearest existing ancestor must be a writable folder (a refused job then
    leaves no trace)."""
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise TypeError(f"{name}: expected a folder path, got {path!r}")
    path = os.fspath(path)
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
