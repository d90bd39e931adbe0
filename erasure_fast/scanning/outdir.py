"""A scan's output folder: checked before any work, locked while a scan writes to it, and owned file by
file -- a scan writes there only files it names, and removes only files a scan wrote.

The lock is an exclusive ``flock`` on ``<out>/.erasure-fast.lock``: the operating system drops it when
the holder exits, however it exits (also on SIGKILL), so a lock is never stale. The file holds a line
describing the holder (pid, host, start time, command), which a refused second scan quotes.

The manifest ``<out>/.erasure-fast-manifest.json`` lists every file scans have written there (or were
about to write: it is written before them). A folder holding any other file -- a user's notes, a model
checkpoint, the corpus itself -- is refused before any work unless the caller says to scan there anyway
(``overwrite=True``, ``--force``); even then only the scan's own names are written, and a fresh scan
removes only files the manifest lists, never anything else.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import re
import socket
import sys
from typing import FrozenSet, Iterable, List, Optional, Tuple

from ..paths import OutputDirError, atomic_write, check_output_dir as check_writable_dir, temp_name

LOCK_NAME = ".erasure-fast.lock"
MANIFEST_NAME = ".erasure-fast-manifest.json"
CHECKPOINT_DIR = "checkpoint"
# Every file a scan's report may write (plots included).
REPORT_FILES = ("summary.parquet", "summary.csv", "summary.json", "report.md", "report.html",
                "fig1_resid_pr.png", "fig2_node_pr.png", "heatmap_pr.png")
# Files that are the scan's by their name alone: the lock and the manifest (and the manifest's temporary).
_OWN_BY_NAME = frozenset({LOCK_NAME, MANIFEST_NAME, os.path.basename(temp_name(MANIFEST_NAME))})
_CHECKPOINT_FILE = re.compile(rf"{CHECKPOINT_DIR}/(\.tmp-)?rank\d+-of-\d+\.npz")
_SHOWN = 3  # stray files a refusal names


def checkpoint_file(rank: int, world: int) -> str:
    """The checkpoint of ``rank`` of ``world``, relative to the output folder."""
    return f"{CHECKPOINT_DIR}/rank{rank}-of-{world}.npz"


def scan_files(world: int) -> List[str]:
    """Every file (relative path) a scan of ``world`` ranks may write besides the lock and the
    manifest: the report, the checkpoints, and the fixed temporary file of each (`paths.temp_name`)."""
    names = list(REPORT_FILES) + [checkpoint_file(r, world) for r in range(world)]
    return names + [temp_name(n) for n in names]


def _is_scan_file(rel: str) -> bool:
    return rel in REPORT_FILES or rel.removeprefix(".tmp-") in REPORT_FILES or bool(_CHECKPOINT_FILE.fullmatch(rel))


def read_manifest(out_dir: str) -> FrozenSet[str]:
    """The files the manifest in ``out_dir`` lists (empty when there is none). A manifest that is not
    one a scan wrote -- unreadable, or listing a name no scan writes -- is an OutputDirError: it must
    never direct a removal."""
    path = os.path.join(out_dir, MANIFEST_NAME)
    if not os.path.lexists(path):
        return frozenset()
    try:
        with open(path) as f:
            data = json.load(f)
        files = data["files"]
        if not isinstance(files, list) or not all(isinstance(n, str) and _is_scan_file(n) for n in files):
            raise ValueError("it lists files no scan writes")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise OutputDirError(f"{path} is not a scan's manifest ({type(e).__name__}: {e}); remove it, or scan into "
                             "another folder") from None
    return frozenset(files)


def write_manifest(out_dir: str, files: Iterable[str]) -> None:
    """List ``files`` (relative paths) in ``out_dir``'s manifest, atomically."""
    body = json.dumps({"written_by": "erasure_fast scan", "files": sorted(set(files))}, indent=1)

    def write(temp):
        with open(temp, "w") as f:
            f.write(body + "\n")

    atomic_write(os.path.join(out_dir, MANIFEST_NAME), write)


def stray_files(out_dir: str, owned: FrozenSet[str], limit: int = _SHOWN + 1) -> List[str]:
    """Up to ``limit`` entries under ``out_dir`` (relative paths; files, links and anything else that
    is not a folder) that neither the manifest (``owned``) nor their name makes the scan's."""
    found = []

    def unreadable(error: OSError):
        raise OutputDirError(f"{error.filename}: cannot be read ({error.strerror}); a scan's output folder must be "
                             "readable to tell its own files from others") from None

    for folder, dirs, files in os.walk(out_dir, onerror=unreadable):
        dirs.sort()  # the same files named first on every run
        rel_folder = os.path.relpath(folder, out_dir)
        links = [d for d in dirs if os.path.islink(os.path.join(folder, d))]  # not walked into: listed as entries
        for name in sorted(files) + sorted(links):
            rel = name if rel_folder == "." else f"{rel_folder}/{name}"
            if rel not in owned and rel not in _OWN_BY_NAME:
                found.append(rel)
                if len(found) >= limit:
                    return found
    return found


def check_scan_dir(path, name: str = "out_dir", *, overwrite: bool = False,
                   create: bool = True) -> Tuple[str, FrozenSet[str]]:
    """Make sure a scan can write to ``path`` (`erasure_fast.paths.check_output_dir`; ``create`` makes
    the folder now), with a real folder where the checkpoints go, and that every file in it is a
    scan's own (listed in its manifest) unless ``overwrite``. Returns (the folder as a str, the files
    the manifest lists)."""
    path = check_writable_dir(path, name, create=create)
    if not os.path.isdir(path):
        return path, frozenset()  # to be created: nothing in it yet
    ck = os.path.join(path, CHECKPOINT_DIR)
    if os.path.islink(ck) or (os.path.lexists(ck) and not os.path.isdir(ck)):
        what = "symbolic link" if os.path.islink(ck) else "file"
        raise OutputDirError(f"{name}: {path!r} holds a {what} named {CHECKPOINT_DIR!r} where the checkpoints go")
    if overwrite:
        try:
            owned = read_manifest(path)
        except OutputDirError:
            owned = frozenset()  # told to scan here: a manifest that is not a scan's owns nothing
        return path, owned
    owned = read_manifest(path)
    stray = stray_files(path, owned)
    if stray:
        shown = ", ".join(repr(s) for s in stray[:_SHOWN]) + (", ..." if len(stray) > _SHOWN else "")
        raise OutputDirError(
            f"{name}: {path!r} holds files no scan wrote there ({shown}); scan into a new or empty folder, or pass "
            "--force (overwrite=True) to scan there anyway (a scan only ever writes its own file names and removes "
            "only files a scan wrote)")
    return path, owned


def check_corpus_outside(out_dir: str, corpus_source: str, name: str = "corpus") -> None:
    """Refuse a corpus that is the output folder, its checkpoint folder or one of the files a scan
    writes there (a scan would overwrite or write into it), whatever ``overwrite`` says."""
    if not os.path.exists(corpus_source):
        return  # an array in memory or a hub dataset: nothing on disk to protect
    corpus = os.path.realpath(corpus_source)
    out = os.path.realpath(out_dir)
    ours = {out, os.path.join(out, CHECKPOINT_DIR)} | {os.path.join(out, n) for n in _OWN_BY_NAME}
    ours |= {os.path.join(out, n) for n in scan_files(1)}
    if corpus in ours or _CHECKPOINT_FILE.fullmatch(os.path.relpath(corpus, out)):
        raise OutputDirError(f"{name}: {corpus_source!r} is where the scan writes its outputs ({out_dir!r}); "
                             "keep the corpus outside the output folder's scan files")


class OutputLock:
    """Exclusive lock on a scan's output folder (context manager). A second scan into the same
    folder -- in this process or another -- gets an OutputDirError naming the holder."""

    def __init__(self, out_dir: str):
        self.path = os.path.join(out_dir, LOCK_NAME)
        self._fd: Optional[int] = None

    def acquire(self) -> "OutputLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown holder"
            os.close(fd)
            raise OutputDirError(
                f"{os.path.dirname(self.path)!r} is in use by another scan ({holder}); wait for it to finish "
                "or choose another output folder"
            ) from None
        except OSError as e:
            os.close(fd)
            raise OutputDirError(f"cannot lock {self.path!r} ({e.strerror or e})") from None
        info = dict(pid=os.getpid(), host=socket.gethostname(),
                    started=datetime.datetime.now().isoformat(timespec="seconds"), command=" ".join(sys.argv)[:300])
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def clear_previous_outputs(out_dir: str, owned: FrozenSet[str], rank: int, world: int) -> None:
    """Remove a previous scan's outputs from ``out_dir`` before a fresh scan writes there -- only files
    the manifest listed (``owned``): this rank's checkpoint (every rank its own), and on rank 0 the
    report files and the checkpoints of other world sizes, so the folder never mixes two scans' files."""
    own = {checkpoint_file(rank, world), temp_name(checkpoint_file(rank, world))}
    for rel in sorted(owned):
        mine = rel in own or (rank == 0 and not _CHECKPOINT_FILE.fullmatch(rel))
        others = rank == 0 and _CHECKPOINT_FILE.fullmatch(rel) and not rel.endswith(f"-of-{world}.npz")
        p = os.path.join(out_dir, rel)
        if (mine or others) and os.path.lexists(p) and not os.path.isdir(p):
            os.unlink(p)
