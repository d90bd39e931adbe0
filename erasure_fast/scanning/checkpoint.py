"""Atomic checkpoints: one npz per rank (no pickle), written to a temp file, fsynced, renamed.

int64 arrays whose values all lie in [0, 2^32) -- the histogram counts, most of a scan's state -- are
stored as uint32 and widened back on load (exact), which halves what every checkpoint writes; the
names of the narrowed arrays are in the file's metadata."""

from __future__ import annotations

import json
import os
from typing import Dict, Optional, Tuple

import numpy as np

from ..paths import atomic_write

_META = "__meta_json__"
_NARROWED = "narrowed_to_uint32"  # metadata key: arrays stored as uint32, int64 in memory
_U32_MAX = np.iinfo(np.uint32).max


def save(path: str, arrays: Dict[str, np.ndarray], meta: dict) -> None:
    """Write ``arrays`` + ``meta`` (JSON) to ``path`` atomically and durably (`erasure_fast.paths.atomic_write`,
    through its fixed temporary file): readers see the old or the new file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    payload, narrowed = {}, []
    for name, arr in arrays.items():
        if arr.dtype == np.int64 and arr.size and arr.min() >= 0 and arr.max() <= _U32_MAX:
            arr = arr.astype(np.uint32)
            narrowed.append(name)
        payload[name] = arr
    if _NARROWED in meta:
        raise ValueError(f"checkpoint metadata may not use the key {_NARROWED!r}")
    meta = dict(meta, **{_NARROWED: narrowed})
    payload[_META] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)

    def write(temp):
        with open(temp, "wb") as f:
            np.savez(f, **payload)

    atomic_write(path, write, durable=True)


def load(path: str) -> Optional[Tuple[Dict[str, np.ndarray], dict]]:
    """(arrays, meta) from ``path``, or None when there is no checkpoint."""
    if not os.path.exists(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files if k != _META}
            meta = json.loads(bytes(z[_META]).decode())
        for name in meta.pop(_NARROWED, []):
            if arrays[name].dtype != np.uint32:
                raise TypeError(f"{name} is listed as narrowed but stored as {arrays[name].dtype}")
            arrays[name] = arrays[name].astype(np.int64)
    except Exception as e:  # a file we did not write (saves are atomic): refuse, do not guess
        raise ValueError(f"{path} is not a readable scan checkpoint ({type(e).__name__}: {e}); remove it or "
                         "start afresh with resume=False (--no-resume)") from None
    return arrays, meta
