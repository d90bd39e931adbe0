"""Atomic checkpoints: one npz per rank (no pickle), written to a temp file, fsynced, renamed."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Dict, Optional, Tuple

import numpy as np

_META = "__meta_json__"


def save(path: str, arrays: Dict[str, np.ndarray], meta: dict) -> None:
    """Write ``arrays`` + ``meta`` (JSON) to ``path`` atomically: readers see the old or the new file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    payload = dict(arrays)
    payload[_META] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=_tmp_prefix(path), suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
        try:
            os.fsync(dfd)  # make the rename itself durable
        finally:
            os.close(dfd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _tmp_prefix(path: str) -> str:
    return f".tmp-{os.path.basename(path)}-"


def remove_stale_temporaries(path: str) -> int:
    """Delete temp files a killed writer of ``path`` left behind (only this path's own); returns how many."""
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        return 0
    stale = [f for f in os.listdir(folder) if f.startswith(_tmp_prefix(path))]
    for f in stale:
        os.unlink(os.path.join(folder, f))
    return len(stale)


def load(path: str) -> Optional[Tuple[Dict[str, np.ndarray], dict]]:
    """(arrays, meta) from ``path``, or None when there is no checkpoint."""
    if not os.path.exists(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files if k != _META}
            meta = json.loads(bytes(z[_META]).decode())
    except Exception as e:  # a file we did not write (saves are atomic): refuse, do not guess
        raise ValueError(f"{path} is not a readable scan checkpoint ({type(e).__name__}: {e}); remove it or "
                         "start afresh with resume=False (--no-resume)") from None
    return arrays, meta
