"""A scan's output folder: checked before any work, locked while a scan writes to it, cleared of a
previous scan's outputs when a fresh scan starts there.

The lock is an exclusive ``flock`` on ``<out>/.erasure-fast.lock``: the operating system drops it when
the holder exits, however it exits (also on SIGKILL), so a lock is never stale. The file holds a line
describing the holder (pid, host, start time, command), which a refused second scan quotes.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import shutil
import socket
import sys
from typing import Optional

from ..paths import OutputDirError, check_output_dir as check_writable_dir

LOCK_NAME = ".erasure-fast.lock"
CHECKPOINT_DIR = "checkpoint"
# Every file a scan's report may write (plots included), removed when a fresh scan starts in the folder.
REPORT_FILES = ("summary.parquet", "summary.csv", "summary.json", "report.md",
                "fig1_resid_pr.png", "fig2_node_pr.png", "heatmap_pr.png")


def check_output_dir(path, name: str = "out_dir") -> str:
    """Create ``path`` if needed and make sure a scan can write there (`erasure_fast.paths`), with
    no file where the checkpoints go; returns it as a str."""
    path = check_writable_dir(path, name, create=True)
    ck = os.path.join(path, CHECKPOINT_DIR)
    if os.path.exists(ck) and not os.path.isdir(ck):
        raise OutputDirError(f"{name}: {path!r} holds a file named {CHECKPOINT_DIR!r} where the checkpoints go")
    return path


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


def clear_previous_outputs(out_dir: str, rank: int, world: int) -> None:
    """Remove a previous scan's outputs from ``out_dir`` before a fresh scan writes there: this
    rank's checkpoint (every rank its own), and on rank 0 the report files and the checkpoints of
    other world sizes -- so the folder never mixes two scans' files."""
    ck_dir = os.path.join(out_dir, CHECKPOINT_DIR)
    if rank == 0:
        for name in REPORT_FILES:
            p = os.path.join(out_dir, name)
            if os.path.isfile(p):
                os.unlink(p)
        if os.path.isdir(ck_dir):
            for f in os.listdir(ck_dir):
                if not f.endswith(f"-of-{world}.npz") or f.startswith(".tmp-"):
                    p = os.path.join(ck_dir, f)
                    shutil.rmtree(p) if os.path.isdir(p) else os.unlink(p)
    own = os.path.join(ck_dir, f"rank{rank}-of-{world}.npz")
    if os.path.exists(own):
        os.unlink(own)
